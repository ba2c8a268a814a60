"""Append-only JSON-lines logs (``metrics.jsonl``, the time-series ``results.jsonl``) read back
after an interruption: a process killed while appending leaves a torn last line, which must not
stop a resume or a report."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["describe_dropped", "read_jsonl"]


def read_jsonl(path: str | Path) -> tuple[list[dict], list[int]]:
    """The JSON objects of ``path``, one per line, and the numbers (1-based) of the lines that are
    not one (a torn write, bytes that are not UTF-8, a value that is not an object), which are
    left out. Blank lines are skipped; a missing file has no records."""
    path = Path(path)
    if not path.is_file():
        return [], []
    records, bad = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            bad.append(number)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    return records, bad


def describe_dropped(path: str | Path, bad: list[int]) -> str:
    """One line for a user: which lines of ``path`` ``read_jsonl`` left out."""
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return f"{path}: left out {len(bad)} unreadable line{'s' * (len(bad) > 1)} ({shown}; an interrupted write?)"
