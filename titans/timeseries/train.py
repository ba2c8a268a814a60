"""Training and evaluation of one forecaster on one dataset and horizon.

TSLib's recipe: MSE loss, Adam, the learning rate halved after every epoch, early stopping on
validation MSE with patience 3, the best-validation weights evaluated on the test split.
Metrics are MSE / MAE on standardised data over ALL test windows (no drop_last), every
forecast step and every channel.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .data import ForecastSplits, WindowDataset
from .models import ForecasterConfig, build_forecaster, count_parameters
from ..io.config_files import dataclass_from_dict

__all__ = ["FitResult", "TrainConfig", "evaluate", "fit", "predict"]


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.5  # lr *= lr_decay after each epoch (TSLib "type1")
    weight_decay: float = 0.0
    patience: int = 3  # epochs without a better validation MSE before stopping
    max_train_windows: int | None = None  # windows sampled per epoch (None = every train window)
    max_val_windows: int | None = (
        None  # evenly spaced validation windows (None = all); test uses all
    )
    eval_batch_size: int = 256
    seed: int = 2021
    device: str = "cpu"
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(
                f"lr must be > 0 and lr_decay in (0, 1], got {self.lr}, {self.lr_decay}"
            )
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        for name in ("max_train_windows", "max_val_windows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return dataclass_from_dict(cls, d, "train")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    model: nn.Module  # with the best-validation weights
    val_mse: float
    test_mse: float
    test_mae: float
    best_epoch: int
    epochs_run: int
    seconds: float
    parameters: int
    history: list[dict]


def _windows(splits: ForecastSplits, split: str, cfg: ForecasterConfig) -> WindowDataset:
    return WindowDataset(getattr(splits, split), cfg.seq_len, cfg.horizon)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: WindowDataset,
    batch_size: int = 256,
    device: str = "cpu",
    max_windows: int | None = None,
) -> dict:
    """MSE and MAE over every window of ``data`` (or ``max_windows`` evenly spaced ones), every
    step and channel (float64 sums)."""
    model.eval()
    starts = np.arange(len(data))
    if max_windows is not None and max_windows < len(data):
        starts = np.linspace(0, len(data) - 1, max_windows).round().astype(int)
    sq, ab, count = 0.0, 0.0, 0
    for lo in range(0, len(starts), batch_size):
        x, y = data.batch(starts[lo : lo + batch_size])
        pred = model(torch.from_numpy(x).to(device)).double().cpu()
        err = pred - torch.from_numpy(y).double()
        sq += float((err**2).sum())
        ab += float(err.abs().sum())
        count += err.numel()
    return {"mse": sq / count, "mae": ab / count, "windows": len(starts)}


@torch.no_grad()
def predict(
    model: nn.Module, data: WindowDataset, starts: np.ndarray, device: str = "cpu"
) -> tuple:
    """Forecasts for the windows at ``starts``: ``(x [B, L, C], y [B, H, C], pred [B, H, C])`` numpy."""
    model.eval()
    x, y = data.batch(np.asarray(starts))
    pred = model(torch.from_numpy(x).to(device)).cpu().numpy()
    return x, y, pred


def fit(
    splits: ForecastSplits,
    model_cfg: ForecasterConfig,
    train_cfg: TrainConfig,
    log=print,
) -> FitResult:
    """Train with early stopping on validation MSE; return the best model and its test metrics."""
    if model_cfg.channels != splits.channels:
        raise ValueError(f"model expects {model_cfg.channels} channels, data has {splits.channels}")
    start = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)
    device = train_cfg.device
    model = build_forecaster(model_cfg).to(device)
    train, val, test = (_windows(splits, s, model_cfg) for s in ("train", "val", "test"))
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    loss_fn = nn.MSELoss()
    best = (math.inf, None, 0)  # (val mse, state dict, epoch)
    history, stale = [], 0
    for epoch in range(1, train_cfg.epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        if train_cfg.max_train_windows is not None:
            order = order[: train_cfg.max_train_windows]
        losses = []
        for lo in range(0, len(order), train_cfg.batch_size):
            x, y = train.batch(order[lo : lo + train_cfg.batch_size])
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
        if not np.isfinite(losses).all():
            raise FloatingPointError(f"training loss became non-finite in epoch {epoch}")
        val_mse = evaluate(
            model, val, train_cfg.eval_batch_size, device, train_cfg.max_val_windows
        )["mse"]
        row = {"epoch": epoch, "train_mse": float(np.mean(losses)), "val_mse": val_mse,
               "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start}  # fmt: skip
        history.append(row)
        log(f"epoch {epoch}: train {row['train_mse']:.4f} val {val_mse:.4f} lr {row['lr']:.2e} "
            f"({row['seconds']:.0f}s)")  # fmt: skip
        if val_mse < best[0]:
            best, stale = (val_mse, copy.deepcopy(model.state_dict()), epoch), 0
        else:
            stale += 1
            if stale >= train_cfg.patience:
                log(f"early stop: no better validation MSE for {stale} epochs")
                break
        for group in opt.param_groups:
            group["lr"] *= train_cfg.lr_decay
    model.load_state_dict(best[1])
    metrics = evaluate(model, test, train_cfg.eval_batch_size, device)
    return FitResult(
        model=model, val_mse=best[0], test_mse=metrics["mse"], test_mae=metrics["mae"],
        best_epoch=best[2], epochs_run=len(history), seconds=time.perf_counter() - start,
        parameters=count_parameters(model), history=history,
    )  # fmt: skip
