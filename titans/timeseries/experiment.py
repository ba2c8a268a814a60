"""One experiment = a dataset file x models x horizons x seeds, driven by a config dict:

```yaml
seq_len: 96
train: {epochs: 10, batch_size: 32, lr: 5e-4, patience: 3}      # shared TrainConfig fields
models:
  titans:      {model: {tokens: variate, dim: 64}, train: {lr: 5e-4}}   # per-model overrides
  transformer: {model: {tokens: variate, dim: 128, heads: 8}}
  dlinear:     {train: {lr: 5e-3}}
```

Each finished run appends a row to ``results.jsonl``, saves its checkpoint and a few test
windows' forecasts of the last channel (``OT``) for the plots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import ForecastSplits, WindowDataset, dataset_name, load_table, make_splits
from .models import ForecasterConfig, build_forecaster, describe
from .report import append_result, canonical_dataset
from .train import FitResult, TrainConfig, evaluate, fit, predict
from ..train.tree_io import TreeError, load_tree, save_tree

__all__ = [
    "RunSpec",
    "evaluate_checkpoint",
    "load_checkpoint",
    "run_spec",
    "save_checkpoint",
    "spec_from_config",
]

# The settings of the Table 3 grid (configs/timeseries/table3.yaml holds the same values; a test
# keeps them equal). Sized so that 5 datasets x 4 horizons x 3 models run on one shared CPU thread
# in about an hour: 2048 random train windows per epoch (64 steps), at most 6 epochs, validation
# on 2048 evenly spaced windows; the test metric uses every test window.
DEFAULT_CONFIG = {
    "seq_len": 96,
    "train": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "lr_decay": 0.7, "patience": 3,
              "max_train_windows": 2048, "max_val_windows": 2048, "seed": 2021},
    "models": {
        "titans": {"model": {"tokens": "variate", "dim": 64, "layers": 2, "heads": 4, "dropout": 0.1,
                             "mem_depth": 2, "mem_expansion": 2.0, "mem_chunk": 8, "einfft_blocks": 4}},
        "transformer": {"model": {"tokens": "variate", "dim": 128, "layers": 2, "heads": 8, "dropout": 0.1,
                                  "ff_mult": 2}},
        "dlinear": {"model": {"moving_avg": 25}, "train": {"lr": 5e-3}},
    },
}  # fmt: skip
PLOT_WINDOWS = 4  # test windows kept per run for the forecast plots
TOP_KEYS = ("seq_len", "train", "models")


@dataclass
class RunSpec:
    model: ForecasterConfig
    train: TrainConfig


def spec_from_config(config: dict, model_name: str, horizon: int, channels: int) -> RunSpec:
    """Build the model / train configs of ``model_name`` from an experiment config dict.

    Raises ValueError naming the unknown key or the missing model section."""
    unknown = set(config) - set(TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown experiment keys {sorted(unknown)}; known: {list(TOP_KEYS)}")
    models = config.get("models", {})
    if model_name not in models:
        raise ValueError(
            f"model {model_name!r} has no section under 'models' (have {sorted(models)})"
        )
    section = models[model_name] or {}
    bad = set(section) - {"model", "train"}
    if bad:
        raise ValueError(
            f"models.{model_name}: unknown keys {sorted(bad)}; known: ['model', 'train']"
        )
    mdict = {"model": model_name, **(section.get("model") or {})}
    mdict.update(seq_len=config.get("seq_len", 96), horizon=horizon, channels=channels)
    tdict = {**(config.get("train") or {}), **(section.get("train") or {})}
    return RunSpec(ForecasterConfig.from_dict(mdict), TrainConfig.from_dict(tdict))


def plot_starts(n_windows: int, count: int = PLOT_WINDOWS) -> np.ndarray:
    """Evenly spaced test windows (the same for every model and horizon of a dataset)."""
    return np.linspace(0, n_windows - 1, count + 2)[1:-1].round().astype(int)


def save_checkpoint(path: Path, result: FitResult, spec: RunSpec, splits: ForecastSplits) -> None:
    """One safetensors file: the weights as tensors, configs and scaling as JSON (nothing pickled)."""
    save_tree(
        {"model_config": spec.model.to_dict(), "train_config": spec.train.to_dict(),
         "state_dict": result.model.state_dict(), "dataset": splits.name,
         "mean": splits.mean, "std": splits.std, "columns": list(splits.columns)},
        path,
    )  # fmt: skip


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = load_tree(path, device=device)
    except TreeError as err:  # e.g. a pickled .pt of an earlier version: never unpickled
        raise ValueError(f"{path} is not a titans timeseries checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not a titans timeseries checkpoint (no model_config / state_dict)"
        )
    weights = ckpt["state_dict"]
    if not isinstance(ckpt["model_config"], dict) or not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise ValueError(f"{path} is not a titans timeseries checkpoint (model_config / state_dict are not tables)")
    try:
        config = ForecasterConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its model_config cannot be used ({err})") from None
    model = build_forecaster(config).to(device)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # names the missing, unexpected or other-shaped weights
        raise ValueError(f"{path}: its weights do not fit its model_config ({' '.join(str(err).split())})") from None
    return model, ckpt


def run_spec(
    data_path: str | Path,
    spec: RunSpec,
    out_dir: str | Path,
    splits: ForecastSplits | None = None,
    log=print,
    artifacts_dir: str | Path | None = None,
) -> dict:
    """Train / evaluate one run; append its row to ``out_dir/results.jsonl``; return the row.
    The checkpoint and the plotted windows go to ``artifacts_dir`` (default ``out_dir``)."""
    out = Path(out_dir)
    art = out if artifacts_dir is None else Path(artifacts_dir)
    if splits is None:
        splits = make_splits(load_table(data_path), dataset_name(data_path), spec.model.seq_len)
    name = canonical_dataset(splits.name)
    tag = f"{name}_{spec.model.model}_H{spec.model.horizon}_seed{spec.train.seed}"
    log(f"== {tag}: {describe(spec.model)}")
    result = fit(splits, spec.model, spec.train, log=log)
    (art / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_checkpoint(art / "checkpoints" / f"{tag}.safetensors", result, spec, splits)
    test = WindowDataset(splits.test, spec.model.seq_len, spec.model.horizon)
    x, y, pred = predict(result.model, test, plot_starts(len(test)), spec.train.device)
    (art / "forecasts").mkdir(parents=True, exist_ok=True)
    np.savez(art / "forecasts" / f"{tag}.npz", x=x[..., -1], y=y[..., -1], pred=pred[..., -1])
    row = {
        "dataset": name, "model": spec.model.model, "horizon": spec.model.horizon, "seed": spec.train.seed,
        "mse": result.test_mse, "mae": result.test_mae, "val_mse": result.val_mse,
        "test_windows": len(test), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
        "seconds": round(result.seconds, 1), "parameters": result.parameters, "describe": describe(spec.model),
        "model_config": spec.model.to_dict(), "train_config": spec.train.to_dict(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }  # fmt: skip
    append_result(out / "results.jsonl", row)
    log(f"== {tag}: test MSE {result.test_mse:.4f} MAE {result.test_mae:.4f} "
        f"({len(test)} windows, best epoch {result.best_epoch}/{result.epochs_run}, {result.seconds:.0f}s)")  # fmt: skip
    return row


def evaluate_checkpoint(
    data_path: str | Path, checkpoint: str | Path, horizon: int | None, device: str = "cpu"
) -> dict:
    """Test MSE / MAE of a saved model on ``data_path`` (all test windows)."""
    model, ckpt = load_checkpoint(checkpoint, device)
    mcfg = ckpt["model_config"]
    if horizon is not None and horizon != mcfg["horizon"]:
        raise ValueError(
            f"--horizon {horizon} does not match the checkpoint's horizon {mcfg['horizon']}"
        )
    splits = make_splits(load_table(data_path), dataset_name(data_path), mcfg["seq_len"])
    if splits.channels != mcfg["channels"]:
        raise ValueError(
            f"checkpoint expects {mcfg['channels']} channels, {data_path} has {splits.channels}"
        )
    test = WindowDataset(splits.test, mcfg["seq_len"], mcfg["horizon"])
    metrics = evaluate(model, test, device=device)
    return {
        "dataset": canonical_dataset(splits.name),
        "model": mcfg["model"],
        "horizon": mcfg["horizon"],
        **metrics,
    }
