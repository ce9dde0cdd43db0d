"""The activation cache (`extraction.cache=true`): what a job's forward pass produced, on disk.

An entry is keyed by ``forward_hash`` (model and weights, data, perturbation, extraction knobs,
seed) and holds the forward products: pooled vectors, pooled augmented views, per-prompt Gram
spectra (prompt entropy for any alpha, normalization; per compat mode computed), curvature in
both compat modes and the token-norm diagnostic. A job whose key is cached with every product
it needs loads no model and runs no forward pass; otherwise it says what is missing, runs the
pass, and stores the union.

Entries live in ``$LW_CACHE_DIR/activations/<key>/`` (beside the model cache), are written to
a temporary folder and renamed into place (a killed job leaves no half entry), and the oldest
used are evicted beyond ``LW_CACHE_MAX_GB`` (default 20).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lw.extract import Extraction
from lw.models import ModelInfo, cache_dir

DEFAULT_MAX_GB = 20.0


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
    return float(os.environ.get("LW_CACHE_MAX_GB", DEFAULT_MAX_GB)) * 2**30


def load(key: str) -> PassProducts | None:
    """The entry ``key``, or None. Marks it used (for eviction)."""
    entry = folder() / key
    if not (entry / "meta.json").exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        tensors = torch.load(entry / "products.pt", weights_only=True)
        info = ModelInfo(**meta["info"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None  # unreadable or from an older lw: a miss, rewritten by this job
    os.utime(entry / "meta.json")
    prompts = Extraction(pooled=tensors["pooled"], n_tokens=tensors["n_tokens"],
                         per_prompt={k[len("per_prompt/"):]: v for k, v in tensors.items()
                                     if k.startswith("per_prompt/")})
    views = None
    if "views/pooled" in tensors:
        views = Extraction(pooled=tensors["views/pooled"], n_tokens=tensors["views/n_tokens"])
    return PassProducts(info=info, prompts=prompts, views=views,
                        n_views=meta["n_views"], forward_seconds=meta["forward_seconds"],
                        from_cache=True)


def store(key: str, products: PassProducts) -> Path:
    """Write the entry atomically (temporary folder, then rename), replacing an older one;
    then evict the least recently used entries beyond the size limit."""
    root = folder()
    root.mkdir(parents=True, exist_ok=True)
    tensors = {"pooled": products.prompts.pooled, "n_tokens": products.prompts.n_tokens,
               **{f"per_prompt/{k}": v for k, v in products.prompts.per_prompt.items()}}
    if products.views is not None:
        tensors.update({"views/pooled": products.views.pooled,
                        "views/n_tokens": products.views.n_tokens})
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    torch.save(tensors, tmp / "products.pt")
    (tmp / "meta.json").write_text(json.dumps({
        "info": products.info.as_dict(), "n_views": products.n_views,
        "forward_seconds": products.forward_seconds, "created": time.time(),
        "products": sorted(products.prompts.per_prompt)}, indent=2))
    entry = root / key
    if entry.exists():  # a stale or smaller entry: move it aside, then drop it
        old = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=root))
        try:
            entry.rename(old / "entry")
        except OSError:
            pass  # another job replaced or removed it meanwhile
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(entry)
    except OSError:  # a parallel job stored the same key first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    evict(keep=key)
    return entry


def entry_bytes(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir() if f.is_file())


def evict(keep: str | None = None) -> list[str]:
    """Remove the least recently used entries until the cache fits its limit; ``keep`` (the
    entry just written) stays. Returns the removed keys."""
    root = folder()
    entries = [e for e in root.iterdir() if (e / "meta.json").exists()] if root.exists() else []
    entries.sort(key=lambda e: (e / "meta.json").stat().st_mtime)
    total = sum(entry_bytes(e) for e in entries)
    removed = []
    for entry in entries:
        if total <= max_bytes():
            break
        if entry.name == keep:
            continue
        total -= entry_bytes(entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed
