"""Pieces every block shares: the SwiGLU feed-forward, the normalised gate, the block state."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.attention import KVCache
from ..layers.neural_memory import NeuralMemoryState


class SwiGLU(nn.Module):
    """Llama-style feed-forward: W_down(silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class NormalizedGate(nn.Module):
    """``y ⊗ m``: both branches normalised with learnable vector-valued weights, then
    ``norm(y) * sigmoid(norm(m))`` (paper section 4.2; also MAC's ``y ⊗ M*(y)``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_y = nn.RMSNorm(dim, eps=1e-6)
        self.norm_m = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.norm_y(y) * torch.sigmoid(self.norm_m(m))


@dataclass
class BlockState:
    """Recurrent state of one block; fields a block does not use stay None.

    memory: the neural memory (weights, momentum, pending chunk, conv tail).
    attn: the attention's KV cache (window, segment or everything for full attention).
    query_conv: MAC's convolution tail of the query stream used to read the memory.
    segment_weights: MAC's memory weights at the start of the current segment (what h reads).
    position: tokens seen by the block.
    """

    memory: NeuralMemoryState | None = None
    attn: KVCache | None = None
    query_conv: Tensor | None = None
    segment_weights: tuple[Tensor, ...] | None = None
    position: int = 0

    def detach(self) -> "BlockState":
        out = {}
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, Tensor):
                val = val.detach()
            elif isinstance(val, tuple):
                val = tuple(t.detach() for t in val)
            elif val is not None and hasattr(val, "detach"):
                val = val.detach()
            out[f.name] = val
        return replace(self, **out)


def memorise_persistent(memory, attn, batch_size: int, dtype: torch.dtype) -> NeuralMemoryState | None:
    """The memory's state after reading the persistent tokens P (MAG and MAL read ``[P || x]``):
    P comes before the first token, once per sequence. None when there are no persistent tokens."""
    if attn.persistent is None:
        return None
    p = attn.persistent().to(dtype).unsqueeze(0).expand(batch_size, -1, -1)
    _, state = memory(p, None)
    return state
