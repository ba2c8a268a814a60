"""Results: the printed table, ``results.json`` + ``results.csv``, and plot helpers.

Every runner returns an ``EvalResult``: ``rows`` are the aggregated numbers (one flat dict per
table cell or line; they become ``results.csv``), ``records`` the per-sample details (kept in
``results.json`` only), ``table`` the text printed in the paper's layout.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io.files import write_text_atomic

__all__ = [
    "EvalResult", "EvalSettingError", "combine_results", "fmt", "format_table", "generated", "length_label",
    "new_figure", "save_figure", "write_results",
]  # fmt: skip


class EvalSettingError(ValueError):
    """Settings or data an evaluation cannot run with (a length too short for the task's prompt,
    an unknown task, a file that is not text, ...); the message says which. The command line
    reports it as a user error (exit status 2) instead of a traceback."""


@dataclass
class EvalResult:
    task: str
    rows: list[dict[str, Any]]
    table: str
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``results.json`` and ``results.csv`` into ``out_dir``; returns the paths."""
        return write_results(self, out_dir)


def combine_results(results: Sequence[EvalResult], table: Callable[[list[dict]], str]) -> EvalResult:
    """One result for several models' runs of one task: rows and records (tagged with the
    model's name) concatenated, ``table(rows)`` redrawn, ``meta['models']`` listing each run's
    ``meta['model']``. The other settings are the first run's (one command made them all)."""
    if not results:
        raise ValueError("no results to combine")
    if len({r.task for r in results}) > 1:
        raise ValueError(f"cannot combine different tasks: {sorted({r.task for r in results})}")
    rows = [row for r in results for row in r.rows]
    records = []
    for r in results:
        name = r.rows[0]["model"] if r.rows else r.meta.get("model", {}).get("name")
        records += [rec if "model" in rec else {"model": name, **rec} for rec in r.records]
    meta = {k: v for k, v in results[0].meta.items() if k != "model"}
    meta["models"] = [r.meta.get("model") for r in results]
    return EvalResult(task=results[0].task, rows=rows, table=table(rows), records=records, meta=meta,
                      plots=[p for r in results for p in r.plots])  # fmt: skip


def generated(what: str, make: Callable, *args, **kwargs):
    """``make(*args, **kwargs)`` (a task generator or loader); its ValueError (e.g. a length too
    short for the prompt) becomes an ``EvalSettingError`` naming ``what``."""
    try:
        return make(*args, **kwargs)
    except EvalSettingError:
        raise
    except ValueError as err:
        raise EvalSettingError(f"{what}: {err}") from err


def length_label(n: int) -> str:
    """1024 -> '1K', 16384 -> '16K', 1048576 -> '1M', 1000 -> '1000'."""
    for unit, suffix in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats with ``digits`` decimals (3 significant digits from 1e6 on, e.g. an
    untrained model's perplexity), None/NaN as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e6 else f"{value:.{digits}f}"
    return str(value)


def format_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    title: str | None = None,
    groups: Sequence[tuple[str, int]] | None = None,
) -> str:
    """A plain-text table. ``groups`` = ``[(label, n_columns), ...]`` adds a header line spanning
    columns (the paper's 'S-NIAH-PK | S-NIAH-N | ...' over the lengths); cells are str()-ed."""
    cells = [[str(c) for c in r] for r in rows]
    for r in cells:
        if len(r) != len(columns):
            raise ValueError(f"row {r} has {len(r)} cells, the table has {len(columns)} columns")
    widths = [max([len(str(c))] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if groups:
        if sum(n for _, n in groups) != len(columns):
            raise ValueError("column groups must cover every column exactly")
        start = 0
        for label, n in groups:  # widen a group's last column if its label is longer
            span = sum(widths[start : start + n]) + 3 * (n - 1)
            if len(label) > span:
                widths[start + n - 1] += len(label) - span
            start += n

    def line(vals: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    out = [title] if title else []
    if groups:
        parts, start = [], 0
        for label, n in groups:
            span = sum(widths[start : start + n]) + 3 * (n - 1)
            parts.append(label.center(span))
            start += n
        out.append(" | ".join(parts))
    header = line([str(c) for c in columns])
    out += [header, "-" * len(header)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _jsonable(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None  # JSON has no NaN; a missing measurement is null
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj



def write_results(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """``results.json`` (everything) and ``results.csv`` (the aggregated rows) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _jsonable(asdict(result))
    json_path, csv_path = out / "results.json", out / "results.csv"
    write_text_atomic(json_path, json.dumps(data, indent=2) + "\n")
    keys: list[str] = []
    for row in result.rows:
        keys += [k for k in row if k not in keys]
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in data["rows"]:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    os.replace(tmp, csv_path)
    return [json_path, csv_path]


def new_figure(**kwargs):
    """A matplotlib figure on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def save_figure(fig, path: str | Path) -> str:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)
