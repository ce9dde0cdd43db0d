"""The Hugging Face hub: fail in seconds, with a useful message, when it cannot be reached;
resolve a revision (branch, tag) to the commit a job's identity holds."""

from __future__ import annotations

import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from lw.errors import LwError


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, offline_options: list[str]) -> None:
    """Raise LwError naming ``what`` (e.g. "model EleutherAI/pythia-410m") when the hub is out
    of reach, listing the ``offline_options`` that work without it."""
    if hub_reachable():
        return
    raise LwError(
        f"{what} comes from the Hugging Face hub, which is unreachable from this machine "
        f"(no connection to {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} within 3 s, "
        f"or HF_HUB_OFFLINE is set). Offline options: {', '.join(offline_options)}."
    )


COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")  # an LFS blob's name in the hub cache


@lru_cache(maxsize=256)
def resolve_revision(repo_id: str, revision: str, repo_type: str = "model") -> str | None:
    """The commit sha ``revision`` (a branch, tag or commit) of hub repo ``repo_id`` points at
    now: asked of the hub when it is reachable, else read from the local hub cache's refs
    (what an offline load would use). None when neither knows it. Once per process: a sweep
    asks per job, and its jobs must agree."""
    if COMMIT.fullmatch(revision):
        return revision
    if hub_reachable():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        try:
            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type,
                                     timeout=30).sha
        except (RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
            kind = "data set" if repo_type == "dataset" else "model"
            raise LwError(f"{kind} {repo_id} revision {revision!r}: the hub could not resolve "
                          f"it to a commit ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0] if str(error) else ''})") from None
    from huggingface_hub import constants

    ref = (Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
           / "refs" / revision)
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def hub_file_hashes(repo_id: str, revision: str) -> dict[str, str]:
    """Each LFS file of model ``repo_id`` at ``revision``: its sha256, as the hub states it
    (no download); with the hub out of reach, as the local hub cache names its blobs (an LFS
    blob's name is its sha256). Empty when neither knows the revision."""
    if hub_reachable():
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=30)
        return {s.rfilename: s.lfs.sha256 for s in info.siblings or () if s.lfs}
    commit = resolve_revision(repo_id, revision)
    from huggingface_hub import constants

    snapshot = (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
                / "snapshots" / (commit or "-"))
    return {str(p.relative_to(snapshot)): p.resolve().name for p in snapshot.rglob("*")
            if p.is_symlink() and SHA256.fullmatch(p.resolve().name)}

