"""MAL: memory as a layer (paper section 4.3): the memory over ``[P || x]``, then sliding-window
attention with the persistent prefix, then the feed-forward; pre-norm residual sublayers."""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.attention import Attention
from ..layers.neural_memory import NeuralMemory
from .common import BlockState, MemoryWindowDecode, MemoryWindowStep, RMSNorm, SwiGLU, memorise_persistent


class MALBlock(MemoryWindowDecode, nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.mem_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.memory = NeuralMemory(cfg.dim, **cfg.memory_kwargs())
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, kind="swa", window=cfg.window,
                              persistent_tokens=cfg.persistent_tokens, rope_base=cfg.rope_base)  # fmt: skip
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        state = state or BlockState()
        mem = state.memory
        if state.position == 0:  # the memory reads [P || x]: the persistent tokens come first
            mem = memorise_persistent(self.memory, self.attn.persistent, x.shape[0], x.dtype)
        m, mem = self.memory(self.mem_norm(x), mem)
        x = x + m
        a, cache = self.attn(self.attn_norm(x), state.attn)
        x = x + a
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(memory=mem, attn=cache, position=state.position + x.shape[1])

    # ---- one-token decoding (step_state / state_after_step: MemoryWindowDecode) --------------

    def step(self, x: Tensor, state: MemoryWindowStep) -> tuple[Tensor, MemoryWindowStep]:
        """``forward`` for one token x ``[B, 1, dim]`` after ``state`` (from ``step_state``)."""
        m, memory = self.memory.step(self.mem_norm(x), state.memory)
        x = x + m
        a, k, v = self.attn.step_window(self.attn_norm(x), state.position, state.k, state.v)
        x = x + a
        return x + self.ffn(self.ffn_norm(x)), MemoryWindowStep(memory, k, v, state.position)
