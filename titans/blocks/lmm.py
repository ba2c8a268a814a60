"""LMM: the neural memory alone as the sequence mixer (paper section 4.3, "memory without attention")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.neural_memory import NeuralMemory
from .common import BlockState, RMSNorm, SwiGLU


class LMMBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.mem_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.memory = NeuralMemory(cfg.dim, **cfg.memory_kwargs())
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        state = state or BlockState()
        m, mem = self.memory(self.mem_norm(x), state.memory)
        x = x + m
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(memory=mem, position=state.position + x.shape[1])

    # ---- one-token decoding (see MACBlock.decode_inputs) --------------------------------------

    def decode_inputs(self, state: BlockState, batch_size: int, dtype: torch.dtype) -> tuple | None:
        return self.memory._decode_inputs(state.memory, batch_size)

    def decode_token(self, x, position, slot, W, chunk_w, S, conv):
        """``forward`` for one token x ``[B, 1, dim]`` on the tensors of ``decode_inputs``."""
        m, W, S, conv = self.memory._token_forward(self.mem_norm(x), W, chunk_w, S, conv)
        x = x + m
        return x + self.ffn(self.ffn_norm(x)), W, S, conv

    def decode_state(self, state: BlockState, inputs: tuple, outputs: tuple) -> BlockState:
        memory = self.memory._decode_state(state.memory, inputs[1], *outputs)
        return BlockState(memory=memory, position=state.position + 1)
