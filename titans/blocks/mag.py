"""MAG: memory as a gate (paper section 4.2): sliding-window attention over ``[P || x]`` in one
branch, the neural memory over ``[P || x]`` in the other, combined by a normalised gate."""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.attention import Attention
from ..layers.neural_memory import NeuralMemory
from .common import BlockState, MemoryWindowDecode, MemoryWindowStep, NormalizedGate, RMSNorm, SwiGLU, memorise_persistent


class MAGBlock(MemoryWindowDecode, nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, kind="swa", window=cfg.window,
                              persistent_tokens=cfg.persistent_tokens, rope_base=cfg.rope_base)  # fmt: skip
        self.memory = NeuralMemory(cfg.dim, **cfg.memory_kwargs())
        self.gate = NormalizedGate(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        state = state or BlockState()
        u = self.norm(x)
        a, cache = self.attn(u, state.attn)
        mem = state.memory
        if state.position == 0:
            mem = memorise_persistent(self.memory, self.attn.persistent, x.shape[0], x.dtype)
        m, mem = self.memory(u, mem)
        x = x + self.gate(a, m)
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(memory=mem, attn=cache, position=state.position + x.shape[1])

    # ---- one-token decoding (step_state / state_after_step: MemoryWindowDecode) --------------

    def step(self, x: Tensor, state: MemoryWindowStep) -> tuple[Tensor, MemoryWindowStep]:
        """``forward`` for one token x ``[B, 1, dim]`` after ``state`` (from ``step_state``)."""
        u = self.norm(x)
        a, k, v = self.attn.step_window(u, state.position, state.k, state.v)
        m, memory = self.memory.step(u, state.memory)
        x = x + self.gate(a, m)
        return x + self.ffn(self.ffn_norm(x)), MemoryWindowStep(memory, k, v, state.position)
