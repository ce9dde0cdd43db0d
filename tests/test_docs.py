"""The docs as a reader follows them: every relative link in README.md and docs/*.md names a
file of the repository (a clone has no ../shared/)."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_name_files_in_the_repository(page):
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t
               and not t.startswith("mailto:")]
    for target in targets:
        path = (page.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{page.name}: {target}"
    assert "../shared/" not in page.read_text()  # outside the repository: dead in a clone
