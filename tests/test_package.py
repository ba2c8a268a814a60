"""The distribution: one version (pyproject.toml), read back by the installed package."""

from __future__ import annotations

import tomllib
from pathlib import Path

import titans

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_pyproject_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "titans-ltm"
    assert titans.__version__ == project["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {project['version']}" in changelog  # every version says what it changed
