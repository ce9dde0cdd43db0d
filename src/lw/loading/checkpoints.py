"""Checkpoints of one training run as revisions of one model: a local folder holding one
Hugging Face model folder per revision (``<id>/step0/``, ``<id>/step16/``, ...), and which
revisions hold identical weights (hub file hashes, or local content hashes).

A folder is a folder of checkpoints when ``model.revision`` names one of its subfolders that
holds a ``config.json``, or when it has no ``config.json`` of its own (then the revision must be
one of its subfolders). A plain model folder loads as it is, whatever the revision says.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from lw.config.schema import ModelConfig
from lw.errors import LwError
from lw.loading.paths import file_sha256

# the files that hold a checkpoint's weights (transformers' save_pretrained, sharded or not)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILE = "tokenizer_config.json"


def local_folder(id_: str) -> Path | None:
    """``model.id`` as a local folder, or None when it is a hub id."""
    path = Path(id_).expanduser()
    return path.resolve() if path.is_dir() else None


def revisions_in(folder: Path) -> list[str]:
    """The revisions a folder of checkpoints holds: its subfolders with a ``config.json``,
    in training-step order (step2 before step16), other names after."""
    names = [p.name for p in folder.iterdir() if (p / "config.json").is_file()]
    return sorted(names, key=_step_order)


def _step_order(name: str) -> tuple:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (0, int(digits), name) if digits else (1, 0, name)


def model_folder(cfg: ModelConfig) -> Path | None:
    """The folder ``cfg`` loads from: ``<id>/<revision>/`` in a folder of checkpoints, ``<id>``
    for a plain model folder, None for a hub id. A revision the folder of checkpoints lacks:
    one line naming it and the revisions there."""
    folder = local_folder(cfg.id)
    if folder is None:
        return None
    revision = folder / cfg.revision
    if (revision / "config.json").is_file():
        return revision
    if (folder / "config.json").is_file():
        return folder
    present = revisions_in(folder)
    raise LwError(f"model.revision={cfg.revision!r}: {folder} holds no checkpoint of that name; "
                  + (f"its revisions: {', '.join(present)}" if present else
                     "it holds neither a model (config.json) nor checkpoint subfolders "
                     "(<revision>/config.json)"))


def tokenizer_folder(cfg: ModelConfig) -> Path | None:
    """Where a local model's tokenizer is: its checkpoint's folder when it holds one, else the
    folder of checkpoints (one tokenizer saved once beside the revisions)."""
    folder = model_folder(cfg)
    if folder is None or (folder / TOKENIZER_FILE).is_file():
        return folder
    return local_folder(cfg.id)


def folder_identity(folder: str | Path) -> dict:
    """A model or adapter folder: every file's sha256."""
    path = Path(folder).expanduser().resolve()
    return {"folder": str(path),
            "sha256": {str(p.relative_to(path)): file_sha256(p)
                       for p in sorted(path.rglob("*")) if p.is_file()}}


def local_identity(cfg: ModelConfig) -> dict:
    """A local model's identity: its checkpoint folder's content (changed weights are another
    job), and the shared tokenizer's files when the checkpoint has none of its own."""
    folder, tokenizer = model_folder(cfg), tokenizer_folder(cfg)
    identity = folder_identity(folder)
    if tokenizer != folder:
        identity["tokenizer"] = {p.name: file_sha256(p) for p in sorted(tokenizer.iterdir())
                                 if p.is_file()}
    return identity


@dataclass
class SameWeights:
    """Which revisions of one model hold identical weights. ``fingerprints``: revision -> the
    sha256s of its weight files; ``source``: where those came from; ``unchecked``: revision ->
    why it could not be checked."""

    fingerprints: dict[str, str]
    source: str
    unchecked: dict[str, str] = field(default_factory=dict)

    def groups(self) -> list[list[str]]:
        """Revisions sharing one fingerprint, two or more each, in the order given."""
        by_print: dict[str, list[str]] = {}
        for revision, fingerprint in self.fingerprints.items():
            by_print.setdefault(fingerprint, []).append(revision)
        return [group for group in by_print.values() if len(group) > 1]


def weights_fingerprint(hashes: dict[str, str]) -> str:
    """One string for a checkpoint's weights from its files' sha256 (name -> hash): the
    safetensors files when there are any, else the .bin files (a revision that has both and
    one that has only .bin still compare); "" when it has no weight file."""
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(sha for name, sha in hashes.items() if name.endswith(suffix))
        if found:
            return ",".join(found)
    return ""


def same_weights(cfg: ModelConfig, revisions: list[str]) -> SameWeights:
    """Fingerprint each revision's weights: content hashes of a local folder's checkpoints,
    else the hub's (or the hub cache's) file hashes, asked in parallel (one request each)."""
    from concurrent.futures import ThreadPoolExecutor

    from lw.loading.hub import hub_file_hashes, hub_reachable

    folder = local_folder(cfg.id)
    nothing = "it has no weight files"
    if folder is not None:
        def hashes(revision: str) -> dict[str, str]:
            checkpoint = model_folder(replace(cfg, revision=revision))
            return {p.name: file_sha256(p) for p in checkpoint.iterdir()
                    if p.name.endswith(WEIGHT_SUFFIXES)}
        source = f"content sha256 of the weight files in {folder}"
    else:
        def hashes(revision: str) -> dict[str, str]:
            return hub_file_hashes(cfg.id, revision)
        if hub_reachable():
            source = "the hub's sha256 of the weight files"
        else:  # nor a folder here (yet: a training may be about to write it)
            source = "the local hub cache's sha256 of the weight files (the hub is out of reach)"
            nothing = (f"the hub is out of reach, and neither its cache nor a folder {cfg.id} "
                       "holds it")
    check = SameWeights({}, source)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {revision: pool.submit(hashes, revision) for revision in revisions}
    for revision, future in futures.items():
        try:
            fingerprint = weights_fingerprint(future.result())
        except Exception as error:  # noqa: BLE001 - a revision the check cannot see: say why
            lines = str(error).strip().splitlines()
            check.unchecked[revision] = lines[0][:200] if lines else type(error).__name__
            continue
        if fingerprint:
            check.fingerprints[revision] = fingerprint
        else:
            check.unchecked[revision] = nothing
    return check
