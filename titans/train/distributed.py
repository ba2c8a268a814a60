"""Data-parallel training applied from outside the model code.

    world = init_distributed()                 # reads torchrun's environment; no-op otherwise
    model = parallelize(model, "ddp" | "fsdp") # DDP, or FSDP2 (fully_shard per block, then the root)

Model files never import this module. On CPU the backend is ``gloo``, on CUDA ``nccl``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "init_distributed", "parallelize", "no_gradient_sync", "full_state_dicts", "load_full_state_dicts"]


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE set); otherwise one process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def parallelize(model: nn.Module, mode: str, device: torch.device | None = None) -> nn.Module:
    """Wrap ``model`` for data parallelism: 'none' returns it unchanged, 'ddp' wraps it in
    DistributedDataParallel, 'fsdp' shards every block and then the root with FSDP2."""
    if mode == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"parallel={mode!r} needs a process group: launch with torchrun")
    if mode == "ddp":
        device_ids = [device.index] if device is not None and device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)  # embeddings, final norm and (tied) head stay with the root
        return model
    raise ValueError(f"unknown parallel mode {mode!r}; use 'none', 'ddp' or 'fsdp'")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, skip: bool):
    """Inside: backward passes accumulate local gradients without communication (all but the
    last micro batch of an accumulation step)."""
    if not skip:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimiser state on CPU (complete on rank 0), keyed by parameter name,
    the same for none / DDP / FSDP runs so a checkpoint resumes under any of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(unwrap(model), optimizer, options=opts)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(unwrap(model), optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value
