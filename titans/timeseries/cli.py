"""``titans timeseries train|eval|report``: long-term forecasting (the paper's Table 3)."""

from __future__ import annotations

NAME = "timeseries"
MODEL_CHOICES = ("titans", "transformer", "dlinear")


def register(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="long-term time-series forecasting with the neural memory (paper Table 3)",
        description="Train / evaluate forecasters on CSV files in the 'date, features..., OT' layout "
        "with the Time-Series-Library protocol (ETT 12/4/4 months, others 70/10/20, train-only scaling).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="<action>")

    t = actions.add_parser("train", help="train models, evaluate on the test split, write tables and plots",
                           description="Train each model on each horizon (early stopping on validation), "
                           "evaluate on all test windows, append to OUT/results.jsonl and rewrite the tables.")  # fmt: skip
    t.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="dataset CSV file(s) (.csv or .csv.gz), e.g. ETTh1.csv",
    )
    t.add_argument(
        "--horizon", type=int, nargs="+", default=[96], help="forecast horizon(s) (default 96)"
    )
    t.add_argument("--model", nargs="+", default=["titans"], choices=MODEL_CHOICES,
                   help="model(s) to train (default titans)")  # fmt: skip
    t.add_argument(
        "--config",
        help="experiment config (YAML/TOML); default: configs/timeseries/table3.yaml's values",
    )
    t.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=None,
        help="seed(s) (default: the config's train.seed)",
    )
    t.add_argument(
        "--out", default="runs/timeseries", help="output directory (default runs/timeseries)"
    )
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    t.add_argument("--quiet", action="store_true", help="print only each run's result line")
    t.epilog = "Config overrides follow as --key=value, e.g. --train.epochs=3 --models.titans.model.dim=128."
    t.set_defaults(func=run_train, accepts_overrides=True)

    e = actions.add_parser("eval", help="evaluate a saved checkpoint on a dataset's test split",
                           description="Test MSE / MAE of a checkpoint over all test windows.")  # fmt: skip
    e.add_argument("--data", required=True, help="dataset CSV file (.csv or .csv.gz)")
    e.add_argument(
        "--checkpoint", required=True, help="checkpoint written by 'titans timeseries train'"
    )
    e.add_argument(
        "--horizon",
        type=int,
        default=None,
        help="expected horizon (checked against the checkpoint)",
    )
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    e.set_defaults(func=run_eval)

    r = actions.add_parser("report", help="rewrite the tables and plots of an output directory",
                           description="Rebuild per_horizon/average tables (CSV, Markdown) and forecast plots.")  # fmt: skip
    r.add_argument(
        "--out", default="runs/timeseries", help="output directory holding results.jsonl"
    )
    r.add_argument(
        "--artifacts",
        default=None,
        help="directory holding forecasts/*.npz (default: --out; the grid script uses runs/timeseries_table3)",
    )
    r.set_defaults(func=run_report)


def _check_threads(threads: int) -> None:
    from ..io.config_files import ConfigError

    if not 1 <= threads <= 4096:
        raise ConfigError(f"--threads must be between 1 and 4096, got {threads}")


def _load_config(args) -> dict:
    import copy

    from ..io.config_files import ConfigError, apply_overrides, load_config_file
    from .experiment import DEFAULT_CONFIG

    # deep copy: apply_overrides copies one level only, and DEFAULT_CONFIG must stay as it is
    config = load_config_file(args.config) if args.config else copy.deepcopy(DEFAULT_CONFIG)
    try:
        return apply_overrides(config, getattr(args, "overrides", []))
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(str(err)) from err


def run_train(args) -> int:
    import copy
    from pathlib import Path

    import torch

    from ..io.config_files import ConfigError
    from .data import dataset_name, load_table, make_splits
    from .experiment import run_spec, spec_from_config
    from .report import plot_runs, read_results, write_tables

    _check_threads(args.threads)
    torch.set_num_threads(args.threads)
    config = _load_config(args)
    out = Path(args.out)
    log = (lambda s: None) if args.quiet else print
    for path in args.data:
        try:
            table = load_table(path)
            splits = make_splits(table, dataset_name(path), int(config.get("seq_len", 96)))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from err
        for model in args.model:
            for horizon in args.horizon:
                try:
                    spec = spec_from_config(config, model, horizon, splits.channels)
                except (TypeError, ValueError) as err:
                    raise ConfigError(str(err)) from err
                for seed in args.seed or [spec.train.seed]:
                    s = copy.deepcopy(spec)
                    s.train.seed = seed
                    row = run_spec(path, s, out, splits=splits, log=log)
                    if args.quiet:
                        print(f"{row['dataset']} {model} H={horizon} seed={seed}: "
                              f"MSE {row['mse']:.4f} MAE {row['mae']:.4f} ({row['seconds']:.0f}s)")  # fmt: skip
    paths = write_tables(read_results(out / "results.jsonl"), out)
    plot_runs(out, horizons=tuple(args.horizon))
    print(f"tables: {paths['average_md']}, {paths['per_horizon_md']}")
    return 0


def run_eval(args) -> int:
    import torch

    from ..io.config_files import ConfigError
    from .experiment import evaluate_checkpoint

    _check_threads(args.threads)
    torch.set_num_threads(args.threads)
    try:
        m = evaluate_checkpoint(args.data, args.checkpoint, args.horizon)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    print(f"{m['dataset']} {m['model']} H={m['horizon']}: test MSE {m['mse']:.4f} MAE {m['mae']:.4f} "
          f"({m['windows']} windows)")  # fmt: skip
    return 0


def run_report(args) -> int:
    from pathlib import Path

    from ..io.config_files import ConfigError
    from .report import plot_runs, read_results, write_tables

    rows = read_results(Path(args.out) / "results.jsonl")
    if not rows:
        raise ConfigError(f"no results in {Path(args.out) / 'results.jsonl'}")
    paths = write_tables(rows, args.out)
    plots = plot_runs(args.out, artifacts_dir=args.artifacts)
    print(f"tables: {paths['average_md']}, {paths['per_horizon_md']}; {len(plots)} plots")
    return 0
