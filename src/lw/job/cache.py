"""The activation cache (`extraction.cache=true`): what a job's forward pass produced, on disk.

An entry is keyed by ``forward_hash`` (model and weights, data, perturbation, extraction knobs,
seed) and holds the forward products: pooled vectors, pooled augmented views, per-prompt Gram
spectra (prompt entropy for any alpha, normalization; per compat mode computed), curvature in
both compat modes and the token-norm diagnostic. A job whose key is cached with every product
it needs loads no model and runs no forward pass; otherwise it says what is missing, runs the
pass, and stores the union.

Entries live in ``$LW_CACHE_DIR/activations/<key>/`` (beside the model cache): ``products.pt``
and ``meta.json`` (the model description, what is held, and the sha256 of ``products.pt``).
Safe with any number of processes:
- an entry is written whole in a temporary folder (a name starting with "."), then renamed
  into place: a reader sees a whole entry or none, and a temporary folder is never taken for an
  entry; one untouched for ``STALE_TMP_S`` belongs to a killed job and is removed;
- a read checks the products against their sha256 through the one open file it loads them
  from, so an entry replaced, evicted or corrupted meanwhile is a miss that says why, never
  wrong values;
- the least recently used entries are evicted beyond ``LW_CACHE_MAX_GB`` (default 20; writing
  temporary folders count towards it), one evicting process at a time (a lock file beside the
  folder); every file operation tolerates the entry vanishing under it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lw.errors import LwError
from lw.job.extract import Extraction
from lw.loading.models import ModelInfo
from lw.loading.paths import cache_dir

DEFAULT_MAX_GB = 20.0
STALE_TMP_S = 3600.0    # a temporary folder untouched for an hour: its writer was killed
FORMAT = 2              # meta.json's layout; another one is a miss
META_FIELDS = ("format", "info", "n_views", "forward_seconds", "created", "products",
               "sha256", "bytes")


@dataclass
class PassProducts:
    """The forward stage's value: what the cache stores and the ranks gather."""

    info: ModelInfo
    prompts: Extraction                 # N prompts: pooled (N, L+1, D), per-prompt products
    views: Extraction | None = None     # J x N view prompts, view-major: pooled (J N, L+1, D)
    n_views: int = 0
    forward_seconds: float = 0.0
    from_cache: bool = False

    def missing(self, products: list[str], n_views: int) -> list[str]:
        """What a job needing ``products`` and ``n_views`` views would miss here."""
        gone = [name for name in products if name not in self.prompts.per_prompt]
        if n_views > self.n_views:
            gone.append(f"{n_views} views (has {self.n_views})")
        return gone


def folder() -> Path:
    return cache_dir() / "activations"


def max_bytes() -> float:
    """``LW_CACHE_MAX_GB`` in bytes; a value that is not a positive number is an LwError."""
    raw = os.environ.get("LW_CACHE_MAX_GB", "").strip()
    if not raw:
        return DEFAULT_MAX_GB * 2**30
    try:
        gib = float(raw)
    except ValueError:
        gib = math.nan
    if not (gib > 0 and math.isfinite(gib)):
        raise LwError(f"LW_CACHE_MAX_GB={raw!r}: the activation cache's size limit must be a "
                      "positive number of GiB, without a unit (e.g. LW_CACHE_MAX_GB=20 or 0.5)")
    return gib * 2**30


def check() -> None:
    """The cache's settings, checked before any model loads: the size limit parses and the
    folder can be written. Raises LwError naming the bad value."""
    max_bytes()
    root = folder()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe."):
            pass
    except OSError as error:
        raise LwError(f"LW_CACHE_DIR={cache_dir()}: the activation cache folder {root} cannot "
                      f"be written ({error.strerror or error}); set LW_CACHE_DIR to a writable "
                      "folder, or extraction.cache=false") from None


def _say(message: str) -> None:
    print(f"[lw] activation cache: {message}", file=sys.stderr)


def _sha256(f) -> tuple[str, int]:
    """sha256 and size of an open binary file, read from its start."""
    digest, size = hashlib.sha256(), 0
    f.seek(0)
    for block in iter(lambda: f.read(1 << 22), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


class Unusable(Exception):
    """An entry that is there but cannot be trusted (the message says why). ``meta_inode``:
    the meta.json read, to tell a corrupt entry from one replaced while it was read."""

    def __init__(self, why: str, meta_inode: int | None = None):
        super().__init__(why)
        self.meta_inode = meta_inode


def _read(entry: Path) -> PassProducts:
    """The entry, verified: every meta field present, the products' sha256 as recorded, every
    product meta names in them. Raises Unusable, or FileNotFoundError when it went away."""
    try:
        with open(entry / "meta.json", "rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            meta = json.loads(f.read())
    except FileNotFoundError:
        if entry.is_dir():
            raise Unusable("no meta.json (an interrupted write, or an older lw)") from None
        raise
    except ValueError as error:
        raise Unusable(f"meta.json is not JSON ({error})") from None
    try:
        return _verified(entry, meta)
    except Unusable as why:
        why.meta_inode = inode
        raise


def _verified(entry: Path, meta) -> PassProducts:
    lacking = [name for name in META_FIELDS if name not in meta] if isinstance(meta, dict) \
        else list(META_FIELDS)
    if lacking:
        raise Unusable(f"meta.json lacks {', '.join(lacking)}")
    if meta["format"] != FORMAT:
        raise Unusable(f"format {meta['format']} (this lw writes {FORMAT})")
    # Hash and load through one open file: what is checked is what is loaded, even if another
    # process replaces or evicts the entry in between.
    with open(entry / "products.pt", "rb") as f:
        digest, size = _sha256(f)
        if (digest, size) != (meta["sha256"], meta["bytes"]):
            raise Unusable(f"products.pt ({size} bytes) does not match its sha256 in meta.json "
                           f"({meta['bytes']} bytes): changed or cut short")
        f.seek(0)
        try:
            tensors = torch.load(f, weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
            raise Unusable(f"products.pt does not load ({type(error).__name__})") from None
    wanted = ["pooled", "n_tokens", *(f"per_prompt/{p}" for p in meta["products"]),
              *(("views/pooled", "views/n_tokens") if meta["n_views"] else ())]
    if lacking := [name for name in wanted if name not in tensors]:
        raise Unusable(f"products.pt lacks {', '.join(lacking)}")
    try:
        info = ModelInfo(**meta["info"])
    except TypeError as error:
        raise Unusable(f"meta.json's model description is not this lw's ({error})") from None
    prompts = Extraction(pooled=tensors["pooled"], n_tokens=tensors["n_tokens"],
                         per_prompt={k[len("per_prompt/"):]: v for k, v in tensors.items()
                                     if k.startswith("per_prompt/")})
    views = None
    if meta["n_views"]:
        views = Extraction(pooled=tensors["views/pooled"], n_tokens=tensors["views/n_tokens"])
    return PassProducts(info=info, prompts=prompts, views=views, n_views=meta["n_views"],
                        forward_seconds=meta["forward_seconds"], from_cache=True)


def load(key: str) -> PassProducts | None:
    """The entry ``key``, verified, or None: absent, or unusable (said on stderr; the job
    then stores a new one in its place). Marks it used (for eviction)."""
    entry = folder() / key
    for attempt in range(3):
        try:
            products = _read(entry)
            break
        except (FileNotFoundError, NotADirectoryError):
            return None  # absent, or evicted / replaced by another job while being read
        except Unusable as why:
            try:
                replaced = (entry / "meta.json").stat().st_ino != why.meta_inode
            except OSError:
                replaced = why.meta_inode is not None  # gone meanwhile
            if replaced and attempt < 2:
                continue  # another job replaced it while we read: read the new one
            _say(f"entry {key} is unusable: {why}; a miss, it will be rewritten")
            return None
        except OSError as error:
            _say(f"entry {key} cannot be read ({error}); a miss")
            return None
    try:
        os.utime(entry / "meta.json")
    except OSError:
        pass  # evicted or replaced meanwhile: what was read is whole and checked
    return products


def store(key: str, products: PassProducts) -> Path | None:
    """Write the entry (a temporary folder renamed into place), replacing an older one under
    the same key; then evict beyond the size limit. A failure to store (a full disk) is said
    and leaves the job's results alone: None."""
    root = folder()
    tensors = {"pooled": products.prompts.pooled, "n_tokens": products.prompts.n_tokens,
               **{f"per_prompt/{k}": v for k, v in products.prompts.per_prompt.items()}}
    if products.views is not None:
        tensors.update({"views/pooled": products.views.pooled,
                        "views/n_tokens": products.views.n_tokens})
    entry, tmp = root / key, None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        torch.save(tensors, tmp / "products.pt")
        with open(tmp / "products.pt", "rb") as f:
            digest, size = _sha256(f)
        (tmp / "meta.json").write_text(json.dumps({
            "format": FORMAT, "info": products.info.as_dict(), "n_views": products.n_views,
            "forward_seconds": products.forward_seconds, "created": time.time(),
            "products": sorted(products.prompts.per_prompt), "sha256": digest,
            "bytes": size}, indent=2))
        stored = _install(tmp, entry)
    except OSError as error:
        _say(f"could not store entry {key} ({error}); the job goes on without it")
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # gone when renamed into place
    if not stored:
        _say(f"could not store entry {key}: other jobs kept replacing it")
        return None
    try:
        evict(keep=key)
    except OSError as error:
        _say(f"could not evict ({error}); the cache may exceed LW_CACHE_MAX_GB for now")
    return entry


def _install(tmp: Path, entry: Path, attempts: int = 5) -> bool:
    """Rename ``tmp`` to ``entry``; an entry in the way (an older one, or a parallel job's of
    the same key) is moved aside and removed first. True once ``entry`` is an entry: ours, or,
    after ``attempts`` lost races, a parallel job's whole one."""
    for _ in range(attempts):
        try:
            tmp.rename(entry)
            return True
        except OSError:
            pass  # an entry is in the way
        aside = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old.", dir=entry.parent))
        try:
            entry.rename(aside / "entry")
        except OSError:
            pass  # removed or replaced meanwhile: try again
        shutil.rmtree(aside, ignore_errors=True)
    return (entry / "meta.json").is_file()


def _tree(path: Path) -> tuple[int, float]:
    """Bytes of the files under ``path`` and the newest mtime of it and them; (0, 0) if it
    vanished. Tolerates files vanishing while it walks."""
    size, newest = 0, 0.0
    names = [path] + [Path(top) / name for top, dirs, files in os.walk(path)  # errors skipped
                      for name in dirs + files]
    for where in names:
        try:
            stat = where.lstat()
        except OSError:
            continue
        newest = max(newest, stat.st_mtime)
        if not where.is_dir():
            size += stat.st_size
    return size, newest


def entry_bytes(entry: Path) -> int:
    return _tree(entry)[0]


def _last_used(entry: Path) -> float | None:
    try:
        return (entry / "meta.json").stat().st_mtime
    except OSError:
        try:
            return entry.stat().st_mtime  # no meta.json: unusable, oldest first
        except OSError:
            return None  # gone


def evict(keep: str | None = None, now: float | None = None) -> list[str]:
    """Remove temporary folders untouched for ``STALE_TMP_S`` (killed writers), then the least
    recently used entries until the cache fits its limit; ``keep`` (the entry just written)
    and temporary folders being written stay, but count. One process at a time. Returns the
    removed names."""
    root = folder()
    if not root.is_dir():
        return []
    limit, now = max_bytes(), time.time() if now is None else now
    with open(root.parent / f"{root.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            removed, total, entries = [], 0, []
            for path in list(root.iterdir()):
                size, newest = _tree(path)
                if path.name.startswith("."):
                    if path.is_dir() and now - newest > STALE_TMP_S:
                        shutil.rmtree(path, ignore_errors=True)
                        removed.append(path.name)
                    else:
                        total += size
                    continue
                used = _last_used(path)
                if used is not None:
                    entries.append((used, path, size))
                    total += size
            for _, path, size in sorted(entries, key=lambda e: e[0]):
                if total <= limit:
                    break
                if path.name == keep:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                total -= size
                removed.append(path.name)
            return removed
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
