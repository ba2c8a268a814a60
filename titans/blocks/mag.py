"""MAG: memory as a gate (paper section 4.2): sliding-window attention over ``[P || x]`` in one
branch, the neural memory over ``[P || x]`` in the other, combined by a normalised gate."""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.attention import Attention
from ..layers.neural_memory import NeuralMemory
from .common import BlockState, MemoryWindowDecode, NormalizedGate, RMSNorm, SwiGLU, memorise_persistent


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
            mem = memorise_persistent(self.memory, self.attn, x.shape[0], x.dtype)
        m, mem = self.memory(u, mem)
        x = x + self.gate(a, m)
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(memory=mem, attn=cache, position=state.position + x.shape[1])

    # ---- one-token decoding (decode_inputs / decode_state: MemoryWindowDecode) ---------------

    def decode_token(self, x, position, slot, W, chunk_w, S, conv, k, v):
        """``forward`` for one token x ``[B, 1, dim]`` on the tensors of ``decode_inputs``."""
        u = self.norm(x)
        a, k, v = self.attn._token_window(u, position, k, v)
        m, W, S, conv = self.memory._token_forward(u, W, chunk_w, S, conv)
        x = x + self.gate(a, m)
        return x + self.ffn(self.ffn_norm(x)), W, S, conv, k, v
