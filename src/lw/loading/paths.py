"""Where lw's files are (its configs, its checkout when it runs from one, the model cache) and
content hashes of files. What a command writes (mlruns/, outputs/, multirun/) goes under the
folder it runs in, never under lw's own."""


from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../lw
# lw's configs: in a checkout src/lw/conf links to the top-level conf/; a wheel holds a copy
CONF_DIR = PACKAGE_DIR / "conf"


def checkout() -> Path | None:
    """The git checkout lw runs from (src layout: <checkout>/src/lw), or None when lw is
    installed (a venv inside some other git project is not lw's checkout)."""
    root = PACKAGE_DIR.parents[1]
    is_checkout = PACKAGE_DIR.parent.name == "src" and (root / "pyproject.toml").is_file() \
        and (root / ".git").exists()
    return root if is_checkout else None


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
