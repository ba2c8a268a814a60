"""Pieces every block shares: the SwiGLU feed-forward, the normalised gate, the block state."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..layers.attention import KVCache
from ..layers.neural_memory import MemoryStep, NeuralMemoryState, RMSNorm


class _SwiGLUDown(torch.autograd.Function):
    """``W_down(silu(a) * b)`` as one node that saves only a, b and W_down. Autograd would also
    keep silu(a) and the product (the down projection's input), two more [batch, time, hidden]
    tensors per block; the backward recomputes both elementwise from a and b."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, w_down: Tensor) -> Tensor:
        ctx.save_for_backward(a, b, w_down)
        return F.linear(F.silu(a).mul_(b), w_down.to(a.dtype))

    @staticmethod
    @once_differentiable  # double backward raises instead of being silently wrong
    def backward(ctx, g: Tensor):
        a, b, w_down = ctx.saved_tensors
        hidden, w = a.shape[-1], w_down.to(g.dtype)
        a2, b2, g2 = a.reshape(-1, hidden), b.reshape(-1, hidden), g.reshape(-1, g.shape[-1])
        ga, gb = torch.empty_like(a2), torch.empty_like(b2)
        g_w = torch.zeros_like(w_down)  # summed over blocks in W_down's dtype (not bf16)
        # In blocks of rows: the temporaries (sigmoid, silu, product, d loss / d product) stay
        # block-sized. This is the first backward step, while every saved activation is still
        # held: full-size temporaries here set the training peak.
        for start in range(0, a2.shape[0], _SWIGLU_BACKWARD_ROWS):
            r = slice(start, start + _SWIGLU_BACKWARD_ROWS)
            ab, bb, gpb = a2[r], b2[r], g2[r] @ w  # gpb = d loss / d (silu(a) * b)
            s = torch.sigmoid(ab)
            p = ab * s  # silu(a)
            torch.mul(p, gpb, out=gb[r])
            g_w.add_((g2[r].T @ p.mul_(bb)).to(g_w.dtype))  # W_down's gradient takes the product
            # silu'(a) = s (1 + a (1 - s))
            torch.mul(s.mul_((1 - s).mul_(ab).add_(1)), gpb, out=ga[r]).mul_(bb)
        return ga.reshape(a.shape), gb.reshape(b.shape), g_w


_SWIGLU_BACKWARD_ROWS = 2048  # tokens per block of the SwiGLU backward


class SwiGLU(nn.Module):
    """Llama-style feed-forward: W_down(silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.gate(x), self.up(x)
        needs_grad = a.requires_grad or b.requires_grad or self.down.weight.requires_grad
        if torch.is_grad_enabled() and needs_grad:
            # one node that saves a and b only (the default would also keep silu(a) and the product)
            return _SwiGLUDown.apply(a, b, self.down.weight)
        return self.down(F.silu(a).mul_(b))


class NormalizedGate(nn.Module):
    """``y ⊗ m``: both branches normalised with learnable vector-valued weights, then
    ``norm(y) * sigmoid(norm(m))`` (paper section 4.2; also MAC's ``y ⊗ M*(y)``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_y = RMSNorm(dim, eps=1e-6)
        self.norm_m = RMSNorm(dim, eps=1e-6)

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


@dataclass
class MemoryWindowStep:
    """The one-token step state of a block with a neural memory and sliding-window attention
    (MAG, MAL): plain tensors, so that one compiled graph serves every token of a stream.

    memory: the memory's step state. k, v: the window's keys and values ``[B, window - 1, H, D]``,
    right-aligned (``Attention.window_buffers``). position: the token's position (0-dim tensor).
    """

    memory: MemoryStep
    k: Tensor
    v: Tensor
    position: Tensor


class MemoryWindowDecode:
    """``step_state`` / ``state_after_step`` of a block with a ``memory`` (NeuralMemory) and a
    sliding-window ``attn`` (MAG, MAL), whose ``step(x, state: MemoryWindowStep)`` returns
    ``(x, MemoryWindowStep)``. See ``MACBlock.step_state``."""

    def step_state(self, state: BlockState, batch_size: int, dtype: torch.dtype) -> MemoryWindowStep | None:
        memory = self.memory.step_state(state.memory, batch_size)
        cache, n = state.attn, min(state.position, self.attn.window - 1)
        shape = (batch_size, n, self.attn.heads, self.attn.head_dim)
        if memory is None or not isinstance(cache, KVCache) or any(
            t.shape != shape or t.dtype != dtype for t in (cache.k, cache.v)
        ):
            return None  # the general path explains
        k, v = self.attn.window_buffers(cache)
        return MemoryWindowStep(memory, k, v, torch.tensor(state.position, device=k.device))

    def state_after_step(self, state: BlockState, step: MemoryWindowStep) -> BlockState:
        pos = state.position + 1
        memory = self.memory.state_after_step(state.memory, step.memory)
        return BlockState(memory=memory, attn=self.attn.window_cache(step.k, step.v, pos), position=pos)


def memorise_persistent(memory, persistent, batch_size: int, dtype: torch.dtype) -> NeuralMemoryState | None:
    """The memory's state after reading the persistent tokens P (``persistent``: a
    ``PersistentMemory`` or None): MAG, MAL and LMM read ``[P || x]``, P before the first token, once
    per sequence. None when there are no persistent tokens."""
    if persistent is None:
        return None
    p = persistent().to(dtype).unsqueeze(0).expand(batch_size, -1, -1)
    _, state = memory(p, None)
    return state
