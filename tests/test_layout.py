"""The package's layering: ``titans.data`` (tokenizers, shards, the words vocabulary) never imports
``titans.tasks``, which is built on it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "titans"


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (those inside functions too), relative
    imports resolved; ``from X import name`` counts ``X`` and ``X.name``, which may be a module."""
    package = path.relative_to(PACKAGE.parent).parts[:-1]  # ("titans", "data") for titans/data/*.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_data_does_not_import_tasks():
    offenders = {}
    for path in sorted((PACKAGE / "data").rglob("*.py")):
        imported = _imported_modules(path)
        tasks = sorted(m for m in imported if m == "titans.tasks" or m.startswith("titans.tasks."))
        if tasks:
            offenders[str(path.relative_to(PACKAGE.parent))] = tasks
    assert offenders == {}


def test_the_import_check_resolves_relative_imports():
    found = _imported_modules(PACKAGE / "data" / "tokenizers.py")
    assert {"titans.data.words", "titans.data.words.niah_words", "titans.io.files"} <= found
    assert "titans.tasks.text_sources" in _imported_modules(PACKAGE / "tasks" / "niah.py")


def test_loading_the_words_tokenizer_imports_no_task():
    probe = (
        "import sys, titans.data.tokenizers as t\n"
        "try:\n    t.load_tokenizer('words')\n"
        "except Exception:\n    pass  # no word lists here: the import is what is checked\n"
        "print(sorted(m for m in sys.modules if m.startswith('titans.tasks')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
