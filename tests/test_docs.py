"""The user docs' relative links resolve (README, CONTRIBUTING, docs/, the op folder's README), and
the files they name in backticks as paths of this repository exist (what CI checks of the docs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", ROOT / "titans/ops/memory/README.md",
         *sorted((ROOT / "docs").rglob("*.md"))]  # fmt: skip
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# a path in backticks that names a file of the repository (not a command, not a pattern)
CODE_PATH = re.compile(r"`((?:titans|tests|benchmarks|configs|docs)/[\w./-]+\.(?:py|md|yaml))`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_named_files_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        if not (page.parent / target).resolve().exists():
            missing.append(target)
    # the experiments logs also cite files of other repositories: their links are checked, not paths
    named = [] if "experiments" in page.parts else CODE_PATH.findall(text)
    for path in named:
        if not (ROOT / path).exists() and not (page.parent / path).exists():
            missing.append(path)
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"
