"""Result tables (CSV / Markdown, per horizon and averaged, the paper's Table 3 layout) and plots.

Results are rows of a JSON-lines file, one per (dataset, model, horizon, seed) run, written as
each run finishes so an interrupted grid still reports what it finished.
"""

from __future__ import annotations

import csv
import json
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

from ..train.records import describe_dropped, read_jsonl

__all__ = ["PAPER_TITANS", "append_result", "plot_forecasts", "read_results", "write_tables"]

# Titans paper, Table 3, neural-memory row: MSE / MAE averaged over horizons {96, 192, 336, 720}.
PAPER_TITANS = {
    "ETTm1": (0.358, 0.387), "ETTm2": (0.261, 0.309), "ETTh1": (0.420, 0.421), "ETTh2": (0.336, 0.382),
    "ECL": (0.162, 0.261), "Traffic": (0.415, 0.289), "Weather": (0.231, 0.265),
}  # fmt: skip
DATASET_ORDER = ("ETTm1", "ETTm2", "ETTh1", "ETTh2", "ECL", "Traffic", "Weather")
MODEL_LABELS = {"titans": "Titans (ours)", "transformer": "Transformer ref.", "dlinear": "DLinear"}


def canonical_dataset(name: str) -> str:
    """File stem -> the paper's dataset name (``weather`` -> ``Weather``, ``electricity`` -> ``ECL``)."""
    aliases = {"weather": "Weather", "electricity": "ECL", "ecl": "ECL", "traffic": "Traffic"}
    return aliases.get(name.lower(), name)


def append_result(path: str | Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        # after a torn last line (a run killed mid-append) start a new one, so this row stays whole
        torn = f.tell() > 0 and not _ends_with_newline(path)
        f.write((("\n" if torn else "") + json.dumps(row) + "\n").encode("utf-8"))


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def read_results(path: str | Path) -> list[dict]:
    """The rows of ``results.jsonl``; unreadable lines (a run killed while appending its row) are
    left out with a warning, so the other runs still report."""
    rows, bad = read_jsonl(path)
    if bad:
        print(f"warning: {describe_dropped(path, bad)}", file=sys.stderr, flush=True)
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _aggregate(rows: list[dict]) -> dict:
    """{(dataset, model, horizon): (mse, mae, n_seeds)}: seeds averaged."""
    groups = defaultdict(list)
    for r in rows:
        groups[(canonical_dataset(r["dataset"]), r["model"], r["horizon"])].append(r)
    return {
        k: (_mean([r["mse"] for r in v]), _mean([r["mae"] for r in v]), len(v))
        for k, v in groups.items()
    }


def _order(datasets) -> list[str]:
    known = [d for d in DATASET_ORDER if d in datasets]
    return known + sorted(set(datasets) - set(known))


def write_tables(
    rows: list[dict], out_dir: str | Path, horizons=(96, 192, 336, 720)
) -> dict[str, Path]:
    """Write ``per_horizon.csv/.md`` and ``average.csv/.md`` (average over ``horizons``; a dataset
    missing a horizon shows its average as incomplete). Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    agg = _aggregate(rows)
    datasets = _order({k[0] for k in agg})
    models = [m for m in MODEL_LABELS if any(k[1] == m for k in agg)]
    models += sorted({k[1] for k in agg} - set(models))
    label = lambda m: MODEL_LABELS.get(m, m)

    per_rows = []
    for d in datasets:
        for h in sorted({k[2] for k in agg if k[0] == d}):
            row = {"dataset": d, "horizon": h}
            for m in models:
                mse, mae, _ = agg.get((d, m, h), (None, None, 0))
                row[f"{m}_mse"], row[f"{m}_mae"] = mse, mae
            per_rows.append(row)

    avg_rows = []
    for d in datasets:
        row = {"dataset": d}
        paper = PAPER_TITANS.get(d)
        row["paper_titans_mse"], row["paper_titans_mae"] = paper if paper else (None, None)
        for m in models:
            have = [agg[(d, m, h)] for h in horizons if (d, m, h) in agg]
            complete = len(have) == len(horizons)
            row[f"{m}_mse"] = _mean([a[0] for a in have]) if complete else None
            row[f"{m}_mae"] = _mean([a[1] for a in have]) if complete else None
            row[f"{m}_horizons"] = len(have)
        avg_rows.append(row)

    paths = {}
    for stem, table in (("per_horizon", per_rows), ("average", avg_rows)):
        if not table:
            continue
        p = out / f"{stem}.csv"
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
        paths[f"{stem}_csv"] = p

    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [
        "| Dataset | H | " + " | ".join(f"{label(m)} MSE | {label(m)} MAE" for m in models) + " |"
    ]
    lines.append("|" + "---|" * (2 + 2 * len(models)))
    for r in per_rows:
        cells = [fmt(r[f"{m}_{k}"]) for m in models for k in ("mse", "mae")]
        lines.append(f"| {r['dataset']} | {r['horizon']} | " + " | ".join(cells) + " |")
    (out / "per_horizon.md").write_text("\n".join(lines) + "\n")
    paths["per_horizon_md"] = out / "per_horizon.md"

    lines = ["| Dataset | Paper Titans MSE | Paper Titans MAE | "
             + " | ".join(f"{label(m)} MSE | {label(m)} MAE" for m in models) + " |"]  # fmt: skip
    lines.append("|" + "---|" * (3 + 2 * len(models)))
    for r in avg_rows:
        cells = []
        for m in models:
            if r[f"{m}_mse"] is None and r[f"{m}_horizons"]:
                cells += [f"({r[f'{m}_horizons']}/{len(horizons)} horizons)", "-"]
            else:
                cells += [fmt(r[f"{m}_mse"]), fmt(r[f"{m}_mae"])]
        lines.append(f"| {r['dataset']} | {fmt(r['paper_titans_mse'])} | {fmt(r['paper_titans_mae'])} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", *_run_summary(rows, models, label)]
    (out / "average.md").write_text("\n".join(lines) + "\n")
    paths["average_md"] = out / "average.md"
    return paths


def _run_summary(rows: list[dict], models: list[str], label) -> list[str]:
    """Per model: size, seeds, epochs (run / best), training windows per epoch and wall time."""
    lines = ["| Model | Parameters | Seeds | Epochs run (best) | Train windows / epoch | Runs | Wall time |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        if not mine or "parameters" not in mine[0]:
            continue
        params = sorted({r["parameters"] for r in mine})
        seeds = sorted({r["seed"] for r in mine})
        run, best = [r["epochs_run"] for r in mine], [r["best_epoch"] for r in mine]
        cap = mine[0].get("train_config", {}).get("max_train_windows")
        seconds = sum(r["seconds"] for r in mine)
        lines.append(
            f"| {label(m)}: {mine[0].get('describe', '')} | {params[0]:,}-{params[-1]:,} | "
            f"{', '.join(map(str, seeds))} | {min(run)}-{max(run)} ({min(best)}-{max(best)}) | "
            f"{cap or 'all'} | {len(mine)} | {seconds / 60:.1f} min |"
        )
    return lines


def plot_forecasts(
    path: str | Path, title: str, history, truth, forecasts: dict, channel_name: str = "OT"
) -> Path:
    """One panel per window: the lookback, the true future and each model's forecast.

    history ``[W, L]``, truth ``[W, H]``, forecasts ``{label: [W, H]}`` (one channel, numpy).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    history, truth = np.asarray(history), np.asarray(truth)
    n, L, H = history.shape[0], history.shape[1], truth.shape[1]
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(np.arange(L), history[i], color="0.4", lw=1, label="input")
        ax.plot(np.arange(L, L + H), truth[i], color="black", lw=1.3, label="ground truth")
        for name, pred in forecasts.items():
            ax.plot(np.arange(L, L + H), np.asarray(pred)[i], lw=1, label=name)
        ax.axvline(L - 0.5, color="0.7", ls="--", lw=0.8)
        ax.set_ylabel(f"{channel_name} (scaled)")
        if i == 0:
            ax.set_title(title)
            ax.legend(loc="upper left", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("time step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(
    out_dir: str | Path, horizons=(96, 720), artifacts_dir: str | Path | None = None
) -> list[Path]:
    """``out_dir/forecast_<dataset>_H<h>.png`` from the saved ``forecasts/*.npz`` (under
    ``artifacts_dir``, default ``out_dir``) of every model; returns the written plots."""
    import numpy as np

    out = Path(out_dir)
    art = out if artifacts_dir is None else Path(artifacts_dir)
    found = defaultdict(dict)  # (dataset, horizon) -> {model: npz path}
    for f in sorted((art / "forecasts").glob("*.npz")):
        parts = f.stem.rsplit("_", 3)
        if len(parts) != 4 or not parts[2].startswith("H") or not parts[2][1:].isdigit():
            print(f"warning: {f}: left out (not a forecast file: <dataset>_<model>_H<horizon>_seed<seed>.npz)",
                  file=sys.stderr, flush=True)  # fmt: skip
            continue
        dataset, model, h, _seed = parts
        found[(dataset, int(h[1:]))].setdefault(model, f)
    written = []
    for (dataset, h), files in sorted(found.items()):
        if h not in horizons:
            continue
        loaded = {}
        for m, p in files.items():
            try:  # plain arrays only: an array of objects (a pickle) is refused, never loaded
                with np.load(p, allow_pickle=False) as d:
                    loaded[m] = {k: d[k] for k in ("x", "y", "pred")}
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                print(f"warning: {p}: left out, unreadable ({' '.join(str(err).split())[:160]})", file=sys.stderr,
                      flush=True)  # fmt: skip
        if not loaded:
            continue
        first = next(iter(loaded.values()))
        forecasts = {MODEL_LABELS.get(m, m): d["pred"] for m, d in loaded.items()}
        written.append(plot_forecasts(out / f"forecast_{dataset}_H{h}.png",
                                      f"{dataset}, horizon {h}: test windows, last channel (OT)",
                                      first["x"], first["y"], forecasts))  # fmt: skip
    return written
