"""Forecasters: input ``x [batch, seq_len, channels]`` -> forecast ``[batch, horizon, channels]``.

* ``titans``: Simba-style (Patro & Agneeswaran 2024) with the Mamba sequence mixer replaced by
  the neural memory (Titans section 5.6): RevIN -> tokens -> blocks of
  [neural memory over tokens (sequence mixing), EinFFT over the feature width (channel mixing)]
  -> linear head -> de-normalise.
* ``transformer``: the same frame with softmax attention + MLP blocks, i.e. PatchTST
  (``tokens='patch'``) or iTransformer (``tokens='variate'``): the comparison that isolates the mixer.
* ``dlinear``: DLinear (Zeng et al. 2023), moving-average decomposition + two linear maps.

Tokens: ``'patch'`` treats every channel as its own series (channel independence, as PatchTST)
cut into overlapping patches; ``'variate'`` embeds each channel's whole lookback as one token
(as iTransformer), so the mixer runs across channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..layers import NeuralMemory
from ..io.config_files import dataclass_from_dict
from ..ops.memory.state import check_max_grad_norm

__all__ = [
    "DLinear",
    "EinFFT",
    "ForecasterConfig",
    "RevIN",
    "TokenForecaster",
    "build_forecaster",
    "count_parameters",
    "describe",
]  # fmt: skip

MODELS = ("titans", "transformer", "dlinear")
TOKENS = ("patch", "variate")


@dataclass
class ForecasterConfig:
    model: str = "titans"  # titans | transformer | dlinear
    seq_len: int = 96
    horizon: int = 96
    channels: int = 7
    tokens: str = "patch"  # patch | variate
    dim: int = 64
    layers: int = 2
    heads: int = 4
    patch_len: int = 16
    stride: int = 8
    dropout: float = 0.1
    ff_mult: int = 2  # MLP width (transformer) / EinFFT blocks are dim-wide
    einfft_blocks: int = 4  # EinFFT: the feature width is split into this many blocks
    mem_depth: int = 2  # neural memory MLP layers
    mem_expansion: float = 2.0
    mem_chunk: int = 4  # tokens per memory chunk
    bidirectional: bool = False  # run a second memory over the reversed tokens (sum both)
    # clip of each token's inner gradient (NeuralMemory max_grad_norm); None, the paper's update,
    # is what the Table 3 runs used, and what checkpoints saved without this field ran with
    mem_max_grad_norm: float | None = None
    revin: bool = (
        True  # instance normalisation of each window (and de-normalisation of the forecast)
    )
    moving_avg: int = 25  # DLinear's trend kernel

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {TOKENS}, got {self.tokens!r}")
        for name in (
            "seq_len",
            "horizon",
            "channels",
            "dim",
            "layers",
            "heads",
            "patch_len",
            "stride",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads or self.dim % self.einfft_blocks:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads and einfft_blocks")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_max_grad_norm(self.mem_max_grad_norm, "mem_max_grad_norm")

    @classmethod
    def from_dict(cls, d: dict) -> ForecasterConfig:
        return dataclass_from_dict(cls, d, "model")

    def to_dict(self) -> dict:
        return asdict(self)


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al. 2022): each window is standardised by its own
    per-channel mean / std over time and the forecast is mapped back; a learned affine per channel.
    Removes the level shifts between train and test periods that dominate these benchmarks."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def normalise(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x ``[B, T, C]`` -> (normalised x, (mean, std) each ``[B, 1, C]``)."""
        mean = x.mean(dim=1, keepdim=True).detach()
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        return (x - mean) / std * self.weight + self.bias, (mean, std)

    def denormalise(self, y: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        mean, std = stats
        return (y - self.bias) / (self.weight + self.eps * self.eps) * std + mean


class EinFFT(nn.Module):
    """Simba's spectral channel mixer: FFT over (tokens, feature blocks), a block-diagonal complex
    two-layer MLP per frequency (ReLU, then soft-shrink for sparsity), inverse FFT.

    x ``[B, N, dim]`` -> ``[B, N, dim]``; ``dim`` is split into ``blocks`` blocks of ``dim / blocks``.
    """

    def __init__(
        self, dim: int, blocks: int = 4, shrink: float = 0.01, scale: float = 0.02
    ) -> None:
        super().__init__()
        if dim % blocks:
            raise ValueError(f"blocks ({blocks}) must divide dim ({dim})")
        self.blocks, self.block, self.shrink = blocks, dim // blocks, shrink
        # [real/imag, blocks, in, out] weights and [real/imag, blocks, out] biases, two layers
        self.w1 = nn.Parameter(scale * torch.randn(2, blocks, self.block, self.block))
        self.b1 = nn.Parameter(scale * torch.randn(2, blocks, self.block))
        self.w2 = nn.Parameter(scale * torch.randn(2, blocks, self.block, self.block))
        self.b2 = nn.Parameter(scale * torch.randn(2, blocks, self.block))

    @staticmethod
    def _complex_linear(re: Tensor, im: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        w, b = w.to(re.dtype), b.to(re.dtype)
        mm = lambda a, m: torch.einsum("...ki,kio->...ko", a, m)
        return mm(re, w[0]) - mm(im, w[1]) + b[0], mm(re, w[1]) + mm(im, w[0]) + b[1]

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        # FFTs of half precision are restricted (power-of-two sizes): run them in float32 at least
        u = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(B, N, self.blocks, self.block)
        spec = torch.fft.fft2(u, dim=(1, 2), norm="ortho")
        re, im = self._complex_linear(spec.real, spec.imag, self.w1, self.b1)
        re, im = F.relu(re), F.relu(im)
        re, im = self._complex_linear(re, im, self.w2, self.b2)
        spec = torch.complex(F.softshrink(re, self.shrink), F.softshrink(im, self.shrink))
        out = torch.fft.ifft2(spec, dim=(1, 2), norm="ortho").real
        return out.reshape(B, N, D).to(x.dtype)


class MemoryMixer(nn.Module):
    """Sequence mixing by the neural memory; optionally a second memory reads the tokens backwards
    (the memory is causal, and patch / variate tokens of a finished window have no arrow of time)."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        make = lambda: NeuralMemory(
            cfg.dim,
            heads=cfg.heads,
            depth=cfg.mem_depth,
            expansion=cfg.mem_expansion,
            chunk_size=cfg.mem_chunk,
            max_grad_norm=cfg.mem_max_grad_norm,
        )
        self.fwd = make()
        self.bwd = make() if cfg.bidirectional else None

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.fwd(x)
        if self.bwd is not None:
            yb, _ = self.bwd(x.flip(1))
            y = y + yb.flip(1)
        return y


class AttentionMixer(nn.Module):
    """Bidirectional multi-head softmax attention (PatchTST / iTransformer encoders)."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-norm residual block: ``x + seq_mix(norm(x))``, then ``x + chan_mix(norm(x))``."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.model == "titans":
            self.seq_mix = MemoryMixer(cfg)
            self.chan_mix = EinFFT(cfg.dim, cfg.einfft_blocks)
        else:
            self.seq_mix = AttentionMixer(cfg)
            hidden = cfg.ff_mult * cfg.dim
            self.chan_mix = nn.Sequential(
                nn.Linear(cfg.dim, hidden),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(hidden, cfg.dim),
            )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.seq_mix(self.norm1(x)))
        return x + self.drop(self.chan_mix(self.norm2(x)))


class TokenForecaster(nn.Module):
    """RevIN -> patch or variate tokens ``[B', N, dim]`` -> blocks -> linear head -> de-normalise."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.revin = RevIN(cfg.channels) if cfg.revin else None
        if cfg.tokens == "patch":
            if cfg.patch_len > cfg.seq_len:
                raise ValueError(f"patch_len ({cfg.patch_len}) exceeds seq_len ({cfg.seq_len})")
            # PatchTST pads the end with `stride` copies of the last value, then unfolds.
            self.num_tokens = (cfg.seq_len + cfg.stride - cfg.patch_len) // cfg.stride + 1
            self.embed = nn.Linear(cfg.patch_len, cfg.dim)
            self.pos = nn.Parameter(0.02 * torch.randn(self.num_tokens, cfg.dim))
            self.head = nn.Linear(self.num_tokens * cfg.dim, cfg.horizon)
        else:
            self.num_tokens = cfg.channels
            self.embed = nn.Linear(cfg.seq_len, cfg.dim)
            self.pos = None  # a variate's identity comes from its own history (as iTransformer)
            self.head = nn.Linear(cfg.dim, cfg.horizon)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        """x ``[B, seq_len, C]`` -> ``[B, horizon, C]``."""
        _check_input(x, self.cfg)
        B = x.shape[0]
        stats = None
        if self.revin is not None:
            x, stats = self.revin.normalise(x)
        if self.cfg.tokens == "patch":
            series = rearrange(x, "b l c -> (b c) l")
            series = torch.cat([series, series[:, -1:].expand(-1, self.cfg.stride)], dim=1)
            patches = series.unfold(1, self.cfg.patch_len, self.cfg.stride)  # [B*C, N, patch_len]
            h = self.embed(patches) + self.pos
        else:
            h = self.embed(rearrange(x, "b l c -> b c l"))  # [B, C, dim]
        h = self.drop(h)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        if self.cfg.tokens == "patch":
            y = rearrange(self.head(h.flatten(1)), "(b c) h -> b h c", b=B)
        else:
            y = rearrange(self.head(h), "b c h -> b h c")
        return y if stats is None else self.revin.denormalise(y, stats)


class DLinear(nn.Module):
    """DLinear: x = trend (moving average, edges replicated) + seasonal (the rest); one linear map
    ``seq_len -> horizon`` for each part, shared by all channels."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kernel = cfg.moving_avg
        self.seasonal = nn.Linear(cfg.seq_len, cfg.horizon)
        self.trend = nn.Linear(cfg.seq_len, cfg.horizon)
        # DLinear initialises both maps to the mean of the window.
        for lin in (self.seasonal, self.trend):
            nn.init.constant_(lin.weight, 1.0 / cfg.seq_len)

    def forward(self, x: Tensor) -> Tensor:
        """x ``[B, seq_len, C]`` -> ``[B, horizon, C]``."""
        _check_input(x, self.cfg)
        front = x[:, :1].expand(-1, (self.kernel - 1) // 2, -1)
        back = x[:, -1:].expand(-1, self.kernel // 2, -1)
        padded = torch.cat([front, x, back], dim=1).transpose(1, 2)  # [B, C, L + k - 1]
        trend = F.avg_pool1d(padded, self.kernel, stride=1)  # [B, C, L]
        seasonal = x.transpose(1, 2) - trend
        return (self.seasonal(seasonal) + self.trend(trend)).transpose(1, 2)


def _check_input(x: Tensor, cfg: ForecasterConfig) -> None:
    if x.dim() != 3 or x.shape[1] != cfg.seq_len or x.shape[2] != cfg.channels:
        raise ValueError(
            f"expected x of shape [batch, seq_len={cfg.seq_len}, channels={cfg.channels}], got {tuple(x.shape)}"
        )


def build_forecaster(cfg: ForecasterConfig) -> nn.Module:
    return DLinear(cfg) if cfg.model == "dlinear" else TokenForecaster(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(cfg: ForecasterConfig) -> str:
    """A one-line summary of the size-relevant settings (for result tables)."""
    if cfg.model == "dlinear":
        return f"DLinear (moving avg {cfg.moving_avg})"
    mixer = "neural memory + EinFFT" if cfg.model == "titans" else "attention + MLP"
    extra = (
        f", memory depth {cfg.mem_depth}, chunk {cfg.mem_chunk}" if cfg.model == "titans" else ""
    )
    extra += ", bidirectional" if cfg.model == "titans" and cfg.bidirectional else ""
    tok = f"patch {cfg.patch_len}/{cfg.stride}" if cfg.tokens == "patch" else "variate tokens"
    return f"{mixer}, {tok}, dim {cfg.dim}, {cfg.layers} layers, {cfg.heads} heads{extra}"
