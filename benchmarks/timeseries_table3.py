"""The paper's Table 3 grid: datasets x horizons {96, 192, 336, 720} x models, on one thread.

    OMP_NUM_THREADS=1 python benchmarks/timeseries_table3.py            # the full grid
    python benchmarks/timeseries_table3.py --datasets ETTh1 --horizons 96 --models dlinear

Reads ``<data-dir>/<name>.csv.gz`` (or ``.csv``); default data dir ``../shared/data/timeseries``
next to the repository. Every finished run is appended to ``<out>/results.jsonl`` and the tables
(``average.md`` in the paper's layout with the paper's Titans row, ``per_horizon.md``, CSVs) are
rewritten, so a partial grid is still reported; a rerun skips the runs already in the file.
Checkpoints and the plotted windows go to ``--artifacts`` (not committed); plots to ``<out>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titans.io.config_files import load_config_file
from titans.timeseries.data import dataset_name, load_table, make_splits
from titans.timeseries.experiment import DEFAULT_CONFIG, run_spec, spec_from_config
from titans.timeseries.report import canonical_dataset, plot_runs, read_results, write_tables

DATASETS = ("ETTh1", "ETTh2", "ETTm1", "ETTm2", "weather")


def find_file(data_dir: Path, name: str) -> Path:
    for suffix in (".csv.gz", ".csv"):
        if (data_dir / f"{name}{suffix}").is_file():
            return data_dir / f"{name}{suffix}"
    raise SystemExit(
        f"{name}: no {name}.csv.gz or {name}.csv in {data_dir} (see README: where to get the data)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "timeseries",
                    help="directory with <name>.csv(.gz) files")  # fmt: skip
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), help="dataset file stems")
    ap.add_argument(
        "--horizons", type=int, nargs="+", default=[96, 192, 336, 720], help="forecast horizons"
    )
    ap.add_argument(
        "--models", nargs="+", default=["dlinear", "transformer", "titans"], help="models to run"
    )
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds (default: the config's)"
    )
    ap.add_argument(
        "--config",
        type=Path,
        default=None,
        help="experiment config (default: configs/timeseries/table3.yaml)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs" / "timeseries",
        help="tables, results.jsonl, plots",
    )
    ap.add_argument("--artifacts", type=Path, default=REPO / "runs" / "timeseries_table3",
                    help="checkpoints and plotted forecast windows")  # fmt: skip
    args = ap.parse_args()

    torch.set_num_threads(1)
    config = load_config_file(args.config) if args.config else DEFAULT_CONFIG
    results = args.out / "results.jsonl"
    done = {(r["dataset"], r["model"], r["horizon"], r["seed"]) for r in read_results(results)}
    start = time.perf_counter()
    for name in args.datasets:
        path = find_file(args.data_dir, name)
        splits = make_splits(load_table(path), dataset_name(path), int(config.get("seq_len", 96)))
        for horizon in args.horizons:
            for model in args.models:
                spec = spec_from_config(config, model, horizon, splits.channels)
                for seed in args.seeds or [spec.train.seed]:
                    spec.train.seed = seed
                    if (canonical_dataset(splits.name), model, horizon, seed) in done:
                        print(f"skip {name} {model} H={horizon} seed={seed}: already in {results}")
                        continue
                    row = run_spec(path, spec, args.out, splits=splits, artifacts_dir=args.artifacts,
                                   log=lambda s: print(s, flush=True))  # fmt: skip
                    print(f"[{time.perf_counter() - start:7.0f}s] {row['dataset']} {model} H={horizon}: "
                          f"MSE {row['mse']:.4f} MAE {row['mae']:.4f}", flush=True)  # fmt: skip
                    write_tables(read_results(results), args.out)
        plot_runs(args.out, horizons=(96, 720), artifacts_dir=args.artifacts)
    print(f"grid finished in {time.perf_counter() - start:.0f}s; tables in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
