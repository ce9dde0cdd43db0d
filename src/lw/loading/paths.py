"""Where lw's files are (the checkout, the model cache) and content hashes of files."""


from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # src/lw/loading/paths.py -> the checkout


def cache_dir() -> Path:
    return Path(os.environ.get("LW_CACHE_DIR", Path.home() / ".cache" / "lw"))


def file_sha256(path: Path) -> str:
    stat = Path(path).stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hashed once per process and file version: a sweep asks for it per job."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
