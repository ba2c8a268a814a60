"""AdamW with the usual exemptions, and warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "lr_factor", "build_scheduler"]

# the memory's data-dependent gates, and the convolution the gates read through (gate_kernel):
# weight decay would pull them toward the fixed gate of a zero input, which the paper's gates are
# meant to move away from
_GATE_NAMES = (".to_theta.", ".to_eta.", ".to_alpha.", ".gate_conv.")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; no decay for norms, biases (every tensor of rank < 2) and the memory gates."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(g in f".{name}" for g in _GATE_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps``, then cosine down to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
