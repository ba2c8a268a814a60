"""LMM: the neural memory alone as the sequence mixer (paper section 4.3, "memory without attention"):
MAL without its attention, so the memory reads ``[P || x]`` (P: the persistent tokens, paper eq. 19,
read once before the first token), then the feed-forward; pre-norm residual sublayers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.attention import PersistentMemory
from ..layers.neural_memory import MemoryStep, NeuralMemory
from .common import BlockState, RMSNorm, SwiGLU, memorise_persistent


class LMMBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.mem_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.memory = NeuralMemory(cfg.dim, **cfg.memory_kwargs())
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.persistent = PersistentMemory(cfg.persistent_tokens, cfg.dim) if cfg.persistent_tokens else None

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        state = state or BlockState()
        mem = state.memory
        if state.position == 0:  # the memory reads [P || x]: the persistent tokens come first
            mem = memorise_persistent(self.memory, self.persistent, x.shape[0], x.dtype)
        m, mem = self.memory(self.mem_norm(x), mem)
        x = x + m
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(memory=mem, position=state.position + x.shape[1])

    # ---- one-token decoding (see MACBlock.step_state) -----------------------------------------

    def step_state(self, state: BlockState, batch_size: int, dtype: torch.dtype) -> MemoryStep | None:
        """``state`` as ``step`` takes it (the memory's step state), or None (see MACBlock)."""
        if state.position == 0 and self.persistent is not None:
            return None  # the general path reads the persistent tokens first
        return self.memory.step_state(state.memory, batch_size)

    def step(self, x: Tensor, state: MemoryStep) -> tuple[Tensor, MemoryStep]:
        """``forward`` for one token x ``[B, 1, dim]`` after ``state`` (from ``step_state``)."""
        m, state = self.memory.step(self.mem_norm(x), state)
        x = x + m
        return x + self.ffn(self.ffn_norm(x)), state

    def state_after_step(self, state: BlockState, step: MemoryStep) -> BlockState:
        memory = self.memory.state_after_step(state.memory, step)
        return BlockState(memory=memory, position=state.position + 1)
