"""The one interface the trainer reads batches through.

A ``BatchSource`` yields training sequences of ``seq_len + 1`` token ids: either a LongTensor
``[B, seq_len + 1]`` (language modelling: every next token is a target) or a dict
``{"input_ids": [B, seq_len + 1], "labels": [B, seq_len + 1]}`` whose labels are -100 where no loss is
taken (tasks that score only answers). Labels follow the model's (Hugging Face) alignment: the
logits at position t are scored against labels[t + 1], so ``seq_len`` predictions per row. It is deterministic for its seed and resumable at an exact position:
``state_dict()`` after n calls to ``next_batch`` and ``load_state_dict`` on a fresh source make the
next batch identical to the uninterrupted run's.

Distributed runs: every rank builds the same source with its ``rank`` and ``world_size``; the
global batch of step s is the same sequences as a one-process run's batch of step s, and rank r
receives rows ``[r * B / world, (r + 1) * B / world)`` of it (``B`` = global batch size). Thus
DDP over ``world`` processes sees exactly the data of one process.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["BatchSource", "rank_rows"]


@runtime_checkable
class BatchSource(Protocol):
    seq_len: int

    def next_batch(self, global_batch_size: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """This rank's rows of the next global batch, (global_batch_size // world, seq_len + 1)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rank_rows(global_batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that belong to ``rank``."""
    if global_batch_size % world_size:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by world size {world_size}")
    per = global_batch_size // world_size
    return slice(rank * per, (rank + 1) * per)
