"""The docs as a reader follows them: every relative link in README.md and docs/*.md names a
file of the repository (a clone has no ../shared/), the site builds strict, and what the
reference pages are generated from declares everything the code uses."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
sys.path.insert(0, str(ROOT / "docs"))
import gen_reference  # noqa: E402

GENERATED = {(ROOT / "docs" / page).resolve() for page in gen_reference.PAGES}
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_name_files_in_the_repository(page):
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t
               and not t.startswith("mailto:")]
    for target in targets:
        path = (page.parent / target).resolve()
        assert path.is_relative_to(ROOT) and (path.exists() or path in GENERATED), \
            f"{page.name}: {target}"
    assert "../shared/" not in page.read_text()  # outside the repository: dead in a clone


def test_the_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: every page of the nav, every link and anchor, the generated
    reference pages (docs/gen_reference.py) and the API from docstrings, or it fails."""
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "mkdocs"), "build", "--strict",
                           "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    site = tmp_path / "site"
    metrics = (site / "reference" / "metrics" / "index.html").read_text()
    from lw.metrics import registry

    assert all(f'id="{name}"' in metrics for name in registry.every())
    assert "LW_CACHE_DIR" in (site / "reference" / "environment" / "index.html").read_text()
    assert not (ROOT / ".cache").exists()  # mkdocs-jupyter's cache stays off


# Names the environment scan finds that are not environment variables
NOT_VARIABLES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "NO_PERMISSIONS",
                 "BOOT_FAIL", "NODE_FAIL", "OUT_OF_MEMORY",  # MLflow error codes, SLURM states
                 "PERMISSION_DENIED"}
VARIABLE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+|PGPASSWORD")


def used_variables() -> set[str]:
    """Every environment variable name lw's code and conf/ use: string constants and keyword
    names (env.update(NAME=...)) of src/, ${oc.env:NAME} in conf/, and the Makefile's."""
    found: set[str] = set()
    for path in (ROOT / "src").rglob("*.py"):  # lw and its Hydra launcher plugin
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and VARIABLE.fullmatch(node.value):
                found.add(node.value)
            elif isinstance(node, ast.keyword) and node.arg and VARIABLE.fullmatch(node.arg):
                found.add(node.arg)
    for path in (ROOT / "conf").rglob("*.yaml"):
        found |= set(re.findall(r"oc\.env:([A-Z0-9_]+)", path.read_text()))
    found |= set(re.findall(r"\$\$\{?([A-Z][A-Z0-9_]+)", (ROOT / "Makefile").read_text()))
    return found - NOT_VARIABLES


def test_every_environment_variable_is_declared_and_every_declared_one_is_used():
    from lw.environment import VARIABLES, by_name

    used = used_variables()
    assert used - set(by_name()) == set(), "declare these in src/lw/environment.py"
    ours = {v.name for v in VARIABLES if v.read_by.startswith(("lw", "conf/"))}
    assert ours - used == set(), "declared as read by lw but no longer used"
    assert {"HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(by_name())
    assert all(v.internal for v in VARIABLES if v.name.startswith("LW_SWEEP_"))
