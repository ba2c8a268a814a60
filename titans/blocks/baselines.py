"""Baselines in the same frame: Transformer++ (Llama-style, full causal attention) and a
sliding-window transformer. Same norms, feed-forward, RoPE and state handling as the Titans blocks."""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.attention import Attention
from .common import BlockState, RMSNorm, SwiGLU


class AttentionBlock(nn.Module):
    def __init__(self, cfg, kind: str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, kind=kind, window=cfg.window if kind == "swa" else None,
                              rope_base=cfg.rope_base)  # fmt: skip
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        state = state or BlockState()
        a, cache = self.attn(self.attn_norm(x), state.attn)
        x = x + a
        x = x + self.ffn(self.ffn_norm(x))
        return x, BlockState(attn=cache, position=state.position + x.shape[1])
