"""NeuralMemory: the paper's long-term memory module as a drop-in sequence-mixing layer.

    x ──► W_qkv ──► causal depthwise conv ──► SiLU ──► q, k (l2-normalised), v     [B, T, H, D]
    x ──► W_theta, W_eta, W_alpha ──► per-token, per-head gates                      [B, T, H]
    (q, k, v, gates) ──► memory (ops/memory: memorise by gradient descent, retrieve y_t = M_t(q_t))
    y ──► RMSNorm ──► * SiLU(x W_gate) ──► W_out                                      [B, T, dim]

The memory's initial weights M_0 are parameters (one MLP per head), trained by backpropagating
through the test-time updates. ``forward(x, state)`` returns ``(output, new_state)``; feeding a
sequence in pieces with the returned state gives the same outputs as one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..errors import MemoryDivergedError, NonFiniteError, StateMismatchError
from ..ops.memory import MemoryState, chunk_memory, memory_shapes, step_memory
from ..ops.memory.chunk import chunk_memory_unchecked
from ..ops.memory.mlp import mlp_read
from ..ops.memory.muon import check_muon_steps
from ..ops.memory.objectives import Objective
from ..ops.memory.rules import merge_rule
from ..ops.memory.state import (
    MemoryWindow, check_max_grad_norm, check_retention_kl, check_retention_q, compute_dtype, kl_simplex, lq_scale,
    window_weights,
)  # fmt: skip
from ..ops.memory.step import kl_step_flat, step_flat
from ..ops.tensors import distinct, nonfinite, standard_strides
from ..runtime.cpu import warn_if_cpu_bf16_is_slow
from .features import PolynomialFeatures, polynomial_feature_dim

__all__ = ["MemoryQueries", "MemoryStep", "NeuralMemory", "NeuralMemoryState", "RMSNorm"]


@dataclass
class NeuralMemoryState:
    """memory: the test-time-trained MLPs (see MemoryState); conv: the last ``kernel - 1``
    projected inputs, so the causal convolution continues across calls (None without conv);
    gate_conv: the last ``gate_kernel - 1`` layer inputs, the gates' convolution tail (None
    without one)."""

    memory: MemoryState
    conv: Tensor | None
    gate_conv: Tensor | None = None

    def detach(self) -> "NeuralMemoryState":
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return replace(self, memory=self.memory.detach(), conv=detach(self.conv), gate_conv=detach(self.gate_conv))

    def to(self, *args, **kwargs) -> "NeuralMemoryState":
        move = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        return replace(self, memory=self.memory.to(*args, **kwargs), conv=move(self.conv), gate_conv=move(self.gate_conv))

    def num_bytes(self) -> int:
        tails = sum(t.numel() * t.element_size() for t in (self.conv, self.gate_conv) if t is not None)
        return self.memory.num_bytes() + tails


@dataclass
class MemoryQueries:
    """What reading the memory takes from a layer input (``NeuralMemory.read_queries``).

    q: the queries ``[B * heads, T, head_dim]`` in the compute dtype (l2-normalised).
    gate: the output gate ``silu(x W_gate)`` ``[B, T, heads * head_dim]``.
    conv: the query stream's convolution tail after x (None without a convolution).
    """

    q: Tensor
    gate: Tensor
    conv: Tensor | None = None

    def split(self, sizes: list[int]) -> list["MemoryQueries"]:
        """The queries of consecutive spans of ``sizes`` tokens (one split node each for q and the
        gate: slicing in a loop would zero-fill a full-size gradient once per span)."""
        return [MemoryQueries(q, g) for q, g in zip(self.q.split(sizes, dim=1), self.gate.split(sizes, dim=1))]


@dataclass
class MemoryStep:
    """A ``NeuralMemoryState`` as the one-token step takes and returns it (``NeuralMemory.step``):
    tensors only, no Python number, so that one compiled graph serves every token of a stream.

    weights: the running weights ``[B, H, out, in]`` per layer.
    chunk_weights: the weights at the open chunk's start, where its tokens take their gradients
        (at a chunk start a copy of ``weights``); the step passes them through unchanged.
    momentum: the momentum buffers (None without momentum).
    conv: the convolution tail ``[B, K-1, 3 * heads * head_dim]`` (None without a convolution).
    window_k, window_v, window_delta: the Omega rule's last ``window - 1`` keys and values
        ``[B*H, window - 1, D]`` (thresholds ``[B*H, window - 1]``), None without the rule (or the
        threshold); window_valid: how many of them are real tokens (0-dim tensor).
    log_weights: Memora's log-weights ``[B, H, out, in]`` per layer (``retention_kl``; else None);
        position: the open chunk's tokens seen (0-dim tensor, Memora only: its first token steps
        exactly, and its last puts the weights back on the simplex). With Memora the step also
        returns new chunk weights (the lag token's).
    gate_conv: the gates' convolution tail ``[B, K-1, dim]`` (None without one, ``gate_kernel``).
    """

    weights: tuple[Tensor, ...]
    chunk_weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...] | None
    conv: Tensor | None
    window_k: Tensor | None = None
    window_v: Tensor | None = None
    window_delta: Tensor | None = None
    window_valid: Tensor | None = None
    log_weights: tuple[Tensor, ...] | None = None
    position: Tensor | None = None
    gate_conv: Tensor | None = None


def _causal_depthwise(u: Tensor, tail: Tensor | None, weight: Tensor) -> Tensor:
    """Causal depthwise convolution over time, continuing from ``tail``.

    u ``[B, T, C]``; tail ``[B, K-1, C]``, the K-1 inputs before u (None = zeros); weight
    ``[C, 1, K]`` (``nn.Conv1d`` layout). Returns ``out [B, T, C]`` with
    ``out[:, t] = sum_j weight[:, 0, j] * full[:, t + j]``, ``full = [tail || u]``.
    Written as K shifted multiply-adds in the channels-last layout, without building ``full``:
    for the small kernels used here this is far cheaper than ``F.conv1d``, whose depthwise
    backward on CPU took a quarter of a memory layer's training step."""
    return _CausalDepthwise.apply(u, tail, weight)


def _tap_sums(g: Tensor, x: Tensor, K: int, block: int = 256) -> Tensor:
    """``out[s, c] = sum_{b, t >= s} g[b, t, c] * x[b, t - s, c]`` for s < K (the weight gradient
    of each tap), accumulated block by block in place so that no full-size product is built."""
    B, T, C = g.shape
    acc = g.new_zeros(K, min(block, T), C)
    for b in range(B):
        for t0 in range(0, T, block):
            t1 = min(t0 + block, T)
            for s in range(min(K, t1)):
                lo = max(t0, s)
                acc[s, : t1 - lo].addcmul_(g[b, lo:t1], x[b, lo - s : t1 - s])
    return acc.sum(1)


def _taps(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``[C, 1, K]`` conv weight as contiguous rows ``[K, C]``: a product of ``[B, T, C]`` with
    a contiguous row runs at memory speed, with a strided column ``weight[:, 0, j]`` it does not."""
    return weight[:, 0, :].t().to(dtype).contiguous()


class _CausalDepthwise(torch.autograd.Function):
    """``_causal_depthwise``; tap j reads ``s = K-1-j`` steps back (into the tail for t < s).
    The backward accumulates in place too (autograd through the shifted slices would zero-fill a
    full-size buffer per tap)."""

    @staticmethod
    def forward(ctx, u: Tensor, tail: Tensor | None, weight: Tensor) -> Tensor:
        K, T = weight.shape[-1], u.shape[1]
        w = _taps(weight, u.dtype)  # (K, C); the output keeps u's dtype, as F.conv1d under autocast
        out = u * w[K - 1]
        for j in range(K - 1):
            s = K - 1 - j
            if s < T:
                out[:, s:].addcmul_(u[:, : T - s], w[j])
            if tail is not None:
                m = min(s, T)
                out[:, :m].addcmul_(tail[:, j : j + m], w[j])
        ctx.save_for_backward(u, tail, weight)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        u, tail, weight = ctx.saved_tensors
        K, T = weight.shape[-1], u.shape[1]
        w = _taps(weight, u.dtype)
        g_u = g_tail = g_w = None
        if ctx.needs_input_grad[0]:
            g_u = g * w[K - 1]
            for j in range(K - 1):
                s = K - 1 - j
                if s < T:
                    g_u[:, : T - s].addcmul_(g[:, s:], w[j])
        if tail is not None and ctx.needs_input_grad[1]:
            g_tail = torch.zeros_like(tail)
            for j in range(K - 1):
                m = min(K - 1 - j, T)
                g_tail[:, j : j + m].addcmul_(g[:, :m], w[j])
        if ctx.needs_input_grad[2]:
            by_shift = _tap_sums(g, u, K)  # (K, C), row s = tap K-1-s
            if tail is not None:
                for j in range(K - 1):
                    m = min(K - 1 - j, T)
                    by_shift[K - 1 - j] += (g[:, :m] * tail[:, j : j + m]).sum((0, 1))
            g_w = by_shift.flip(0).t().unsqueeze(1).to(weight.dtype)  # (C, 1, K)
        return g_u, g_tail, g_w


_L2_EPS = 1e-12  # F.normalize's default


def _unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x / max(|x|, eps), |x|)`` over the last dim: ``F.normalize``'s value bit for bit (a
    product with the reciprocal differed by an ulp in a quarter of the entries, and overflowed in
    float16, where eps rounds to 0), and the norms."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(_L2_EPS), norm


class _L2NormalizeFunction(torch.autograd.Function):
    """``l2_normalize`` as one node that saves its output and the row norms. Autograd through
    ``F.normalize`` records norm, clamp, expand and divide; with it, q and k of the benchmark layer
    ([4, 4096, 4, 64] each, fwd+bwd with the SiLU before them, 2 threads, scratch timing of 10
    steps x 2) took 53-60 ms against 35 with this node."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y, norm = _unit_rows(x)
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    @once_differentiable  # double backward raises instead of being silently wrong
    def backward(ctx, g: Tensor):
        y, norm = ctx.saved_tensors
        # d(x / |x|) = (g - y (g . y)) / |x|; a clamped row (|x| < eps) is x / eps, whose
        # gradient is g / eps: no projection there (F.normalize's clamp passes no gradient).
        dot = torch.linalg.vecdot(g, y).unsqueeze(-1).mul_(norm >= _L2_EPS)
        return (g - y * dot).div_(norm.clamp_min(_L2_EPS))


def l2_normalize(x: Tensor) -> Tensor:
    """``F.normalize(x, dim=-1)`` (rows scaled to unit norm, norms below 1e-12 treated as 1e-12),
    as one autograd node when gradients are needed and the same arithmetic without one otherwise,
    so training, streaming and decoding compute identical values."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _L2NormalizeFunction.apply(x)
    return _unit_rows(x)[0]


def _rstd(x: Tensor, eps: float) -> Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last dim, ``[..., 1]``: the mean square through
    ``vector_norm`` (one read of x; ``square().mean()`` writes a full-size temporary first)."""
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
    return ms.add_(eps).rsqrt_()


class _RMSNormFunction(torch.autograd.Function):
    """``x * rsqrt(mean(x^2) + eps) * weight`` as one node that saves x and the per-token rsqrt.
    Autograd through ``torch.rms_norm`` on CPU records its decomposition (pow, mean, add, rsqrt,
    two products): six nodes and three full-size saved tensors per call, and about twice the
    elementwise passes of this backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = _rstd(x, eps)
        ctx.save_for_backward(x, rstd, weight)
        return (x * rstd).mul_(weight)

    @staticmethod
    @once_differentiable  # double backward raises instead of being silently wrong
    def backward(ctx, g: Tensor):
        x, rstd, weight = ctx.saved_tensors
        xhat = x * rstd
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = (g * xhat).reshape(-1, x.shape[-1]).sum(0)
        g_xhat = g * weight
        # d/dx of xhat = rstd * (g_xhat - xhat * mean(g_xhat * xhat))
        dot = (g_xhat * xhat).mean(-1, keepdim=True)
        g_x = g_xhat.sub_(xhat.mul_(dot)).mul_(rstd)
        return g_x, g_w, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state dict) whose training forward is one autograd node
    with its own backward (``_RMSNormFunction``) and whose inference forward takes three passes
    over x (``torch.rms_norm`` on CPU runs its decomposition, about twice as many); autocast and
    mixed dtypes take ``nn.RMSNorm``'s own path."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            w is None
            or x.dtype != w.dtype
            or torch.is_autocast_enabled(x.device.type)
            or len(self.normalized_shape) != 1
        ):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):  # inference: no node
            return (x * _rstd(x, eps)).mul_(w)
        return _RMSNormFunction.apply(x, w, eps)


def _token_depthwise(u: Tensor, tail: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``_causal_depthwise`` of one token u ``[B, 1, C]`` after ``tail`` ``[B, K-1, C]`` (weight
    ``[C, 1, K]``) as plain tensor math, no autograd node of its own (the decode graph traces it):
    ``(out [B, 1, C], next tail)``."""
    full = torch.cat([tail.to(u.dtype), u], dim=1)  # (B, K, C)
    w = weight[:, 0, :].t().to(u.dtype)  # (K, C)
    # contiguous: the next token's tail then keeps one stride pattern (no copy per token)
    return (full * w).sum(1, keepdim=True), full[:, 1:].contiguous()


def _check_tail(tail: Tensor | None, kernel: int, shape: tuple[int, ...], what: str, setting: str) -> None:
    """Refuse a state's convolution tail that this layer's ``kernel`` (0: none) cannot continue."""
    theirs = None if tail is None else tuple(tail.shape)
    mine = shape if kernel else None
    if theirs != mine:
        raise StateMismatchError(f"the state has {'none' if theirs is None else f'a tail of shape {theirs}'} for "
                                 f"{what}; this layer ({setting}={kernel}) takes {'none' if mine is None else mine}")


def _next_tail(u: Tensor, tail: Tensor | None, K: int) -> Tensor:
    """The last K-1 inputs of ``[tail || u]`` (zeros before the first token): the next call's tail.
    A copy, not a view: a state kept between calls must not pin the whole ``[B, T, C]`` projection."""
    B, T, C = u.shape
    if T >= K - 1:
        return u[:, T - (K - 1) :].clone()
    tail = u.new_zeros(B, K - 1, C) if tail is None else tail
    return torch.cat([tail, u], dim=1)[:, -(K - 1) :]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


_PRODUCT_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_product_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """None, ``torch.bfloat16`` or a name (``"bfloat16"``/``"bf16"``; ``"float32"``/``"fp32"``
    mean None) -> the ``product_dtype`` of ``chunk_memory``."""
    if value is None or value == torch.float32:
        return None
    if isinstance(value, str):
        if value not in _PRODUCT_DTYPES:
            raise ValueError(f"product_dtype must be one of {', '.join(_PRODUCT_DTYPES)}, got {value!r}")
        return _PRODUCT_DTYPES[value]
    if value != torch.bfloat16:
        raise ValueError(f"product_dtype must be None or torch.bfloat16, got {value!r}")
    return value


class NeuralMemory(nn.Module):
    """The neural long-term memory layer (paper section 3, section 4.4).

    Args:
        dim: model width (input and output).
        heads: number of memory heads; each head has its own memory MLP.
        head_dim: width of q/k/v per head (default ``dim // heads``).
        depth: layers of the memory MLP (1 = linear memory, the "linear memory" ablation).
        expansion: hidden width of the memory MLP = expansion * head_dim.
        chunk_size: tokens per chunk: their gradients are taken at the chunk-start weights.
        activation: activation of the memory MLP ('silu', 'gelu', 'relu').
        residual: memory MLP with a residual connection, ``M(x) = MLP(x) + x``.
        momentum: use the momentum (past surprise) term; False is the "w/o momentum" ablation.
        forgetting: use the forget gate (weight decay); False is the "w/o weight decay" ablation.
        conv_kernel: kernel of the causal depthwise convolution on q, k, v; 0 or 1 = no
            convolution (the "w/o convolution" ablation).
        theta_activation: 'softplus' (theta in (0, inf)) or 'sigmoid' (theta = max_lr * sigmoid).
        max_lr: upper bound of theta for 'sigmoid'.
        theta_init, eta_init, alpha_init: gate values of an untrained layer (through the biases):
            a small learning rate, strong momentum, slow forgetting (alpha 1e-3 keeps ~37% of a
            memory after 1000 tokens). theta_init matters most: a chunk's tokens all take their
            gradient at the chunk-start weights and momentum sums them again, so one chunk moves
            the weights by up to ~chunk_size / (1 - eta) times theta times a gradient. With
            coherent keys (MAC writes attention outputs, which are alike) theta_init = 1e-2
            diverged within 300 tokens at dim 256, chunk 64; 1e-3 stayed bounded over 4K tokens.
        associative_init: start the memory as an associative store of "what came after this
            token": the key projection starts equal to the query projection, and the convolution
            reads the previous token for the key, the current token for the query and the value.
            A token's write then stores ``k(previous token) -> v(token)``, and a later occurrence
            of that previous token reads back what followed it, before any training. Needs
            ``conv_kernel >= 2``. The architecture is unchanged (only the initial values of
            ``to_qkv`` and ``conv``); see docs/experiments/single-needle.md for why it matters: without it a tiny
            model trained on key-value recall stayed at chance, with it the LMM reached 93% answer
            accuracy after 150 steps (``benchmarks/recall_learning.py``).
        max_grad_norm: clip each token's inner gradient (all layers, Frobenius norm) to this norm
            by scaling its learning rate by ``min(1, max_grad_norm / |grad|)``; None: no clip, the
            paper's update exactly. The default 10 leaves ordinary writes untouched (inner gradients
            of unit-norm keys stay far below it) and keeps untrained models with the default gates
            finite. Every test-time step is then at most ``theta * max_grad_norm``. Not in the paper:
            a deep memory's inner loss sharpens as its weights grow, so a theta that is stable at
            the start can diverge after many writes of one key (docs/niah_demo.md, "Stability").
            The scale is differentiated like the rest of the rule.
        qk_activation: what follows the query and key projections before their l2 normalisation:
            ``"silu"`` (the paper, Section 4.4) or ``"identity"``. SiLU's outputs are mostly
            positive, so after normalisation any two keys have a cosine of ~0.7 (a question's query
            is then about as close to the other needles' keys as to its own); a memory trained by
            gradient steps on such keys reads back a blend dominated by the latest write. Without it, keys of unrelated tokens start near
            orthogonal. The values keep SiLU either way.
        objective: the loss of each write, the attentional bias (``ops/memory/objectives.py``):
            ``"l2"`` (the paper's ``||M(k) - v||^2``), ``"lp"`` (MIRAS eqs. 10-11, Moneta's
            ``sum |e|^p`` with ``objective_p``) or ``"huber"`` (MIRAS eq. 16, Yaad's: squared
            error inside a per-token, per-head threshold ``delta = softplus(x W_delta)``, l1
            outside). With ``momentum=False`` and the forget gate, ``"huber"`` is Yaad's rule
            (MIRAS eq. 26), the memory MLP this layer's own.
        objective_p: the exponent of ``"lp"`` (>= 2; MIRAS's default 3).
        retention_q: Moneta's l_q retention (MIRAS eq. 24; None: off): the memory's weights are an
            accumulator ``A`` read and written as ``A / ||A||_q^(q-2)``, renormalised at chunk
            starts (``ops/memory/README.md``); the forget gate then decays ``A``. Moneta is
            ``objective="lp"``, ``retention_q=4``, ``momentum=False``.
        retention_kl: Memora's KL retention (MIRAS eqs. 19-21, 27; None: off), the number being
            ``c``, the sum of every row of the memory's weights: the weights stay positive, each
            row on the simplex of sum c, and a write is ``W = c softmax((1 - alpha) log W - theta
            grad)`` row by row, so the forget gate pulls every row toward uniform instead of toward
            zero, and theta steps the log-weights. The initial weights' parameters are logits
            (``M_0 = c softmax`` of their rows). Inside a chunk reads follow the papers' linear
            approximation (eqs. 30-32; ``ops/memory/README.md``, "Memora: KL retention"). Needs
            ``momentum=False``; not with ``retention_q`` or ``window``. Memora is ``objective="l2"``,
            ``retention_kl=1``, ``momentum=False``.
        delta_init: the huber threshold of an untrained layer (the bias of ``to_delta``).
        feature_degree: ATLAS's polynomial feature map (section 3.1; None: off): the memory stores
            ``phi(k) -> v`` and reads ``phi(q)``, ``phi`` every monomial of the normalised key up
            to this degree with a learnable coefficient per degree (``layers/features.py``); the
            memory's first layer takes ``C(head_dim + degree, degree)`` inputs. Not with ``residual``.
        window: the Omega rule (ATLAS eqs. 9-10; 1: off): each write descends the loss of the
            ``window`` latest tokens, token t - j weighted by ``gamma_j = sigmoid(x_t W_gamma)``, one
            gate per head and window offset from the writing token (``window_gates``); each gate
            starts at ``1 / window``, so an untrained layer moves its memory as far per token as
            with ``window=1``. One-token decoding carries the window in ``MemoryStep``.
        gate_kernel: what the gates read (theta, eta, alpha, and the huber threshold and the Omega
            rule's window gates when those are on). 0 or 1: the token's own input x_t, the paper's
            data-dependent gates (section 3.1). K >= 2: a causal depthwise convolution of the
            input over the token and the K - 1 before it (``gate_inputs``), with its own taps,
            which start at the current token alone, so that an untrained layer gates exactly as
            with 0. A gate can then tell a token by its context (whether it is the value of a
            "key value" pair) and not only by its identity. Not in the paper; the convolution's
            tail travels in the state (``NeuralMemoryState.gate_conv``).
        muon_steps: ATLAS's Muon inner optimiser (eqs. 32-33; None: the Titans step): the momentum
            sums the raw (windowed, clipped) gradients, ``S = eta S - grad``, and each write steps
            along its Newton-Schulz orthogonalisation, ``M = (1 - alpha) M + theta NS_k(S)`` with
            k = ``muon_steps`` quintic steps per weight matrix (``ops/memory/muon.py``): a step's size
            is set by theta (its singular values at most 1.2 theta), not by the gradient's. Chunks stay exact
            (each token's momentum is materialised and orthogonalised: ``O(n out in min(out, in) k)``
            per chunk and layer, README "Muon: the ATLAS inner optimiser"). Not with
            ``retention_q``, ``retention_kl`` or bf16 products. ATLAS is ``window=8``,
            ``feature_degree=2``, ``muon_steps=5`` (``from_rule("atlas")``).
        compile: run the memory's chunk computations through ``torch.compile`` (opt-in: the first
            call compiles, for tens of seconds on CPU; later steps are faster). The chunk op keeps the
            Muon spans (``muon_steps``) out of its compiled groups; a caller that compiles a whole
            call (MAC's compiled segment step) traces them with it.
        product_dtype: ``"bfloat16"`` (or ``torch.bfloat16``): the matrix products inside each
            chunk run in bf16 while the memory's state stays float32 (``chunk_memory``'s
            ``product_dtype``); None (default): float32 throughout. One-token steps always run
            in float32 (they are matrix-vector products).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        head_dim: int | None = None,
        depth: int = 2,
        expansion: float = 4.0,
        chunk_size: int = 64,
        activation: str = "silu",
        residual: bool = False,
        momentum: bool = True,
        forgetting: bool = True,
        conv_kernel: int = 4,
        theta_activation: str = "softplus",
        max_lr: float = 0.1,
        theta_init: float = 1e-3,
        eta_init: float = 0.9,
        alpha_init: float = 1e-3,
        associative_init: bool = False,
        max_grad_norm: float | None = 10.0,
        qk_activation: str = "silu",
        objective: str = "l2",
        objective_p: float = 3.0,
        retention_q: float | None = None,
        retention_kl: float | None = None,
        delta_init: float = 1.0,
        window: int = 1,
        feature_degree: int | None = None,
        gate_kernel: int = 0,
        muon_steps: int | None = None,
        compile: bool = False,
        product_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or heads < 1:
            raise ValueError(f"dim and heads must be >= 1, got dim={dim}, heads={heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"heads ({heads}) must divide dim ({dim}) unless head_dim is given")
            head_dim = dim // heads
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if activation not in ("silu", "gelu", "relu"):
            raise ValueError(f"activation must be 'silu', 'gelu' or 'relu', got {activation!r}")
        if theta_activation not in ("softplus", "sigmoid"):
            raise ValueError(f"theta_activation must be 'softplus' or 'sigmoid', got {theta_activation!r}")
        if qk_activation not in ("silu", "identity"):
            raise ValueError(f"qk_activation must be 'silu' or 'identity', got {qk_activation!r}")
        if feature_degree is not None and not (
            isinstance(feature_degree, int) and not isinstance(feature_degree, bool) and 1 <= feature_degree <= 16
            and polynomial_feature_dim(head_dim, feature_degree) <= 2**20
        ):  # fmt: skip
            raise ValueError(f"feature_degree must be None or an integer in [1, 16] whose features fit 2^20, got {feature_degree!r}")
        if feature_degree is not None and residual:
            raise ValueError("feature_degree and residual do not combine: the residual adds the key to an output of another size")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1 (1: the Titans rule), got {window!r}")
        if window > 1 and retention_q is not None:
            raise ValueError("window (the Omega rule) and retention_q (Moneta's retention) do not combine yet")
        check_retention_kl(retention_kl)
        if retention_kl is not None:
            if retention_q is not None:
                raise ValueError("retention_kl (Memora's KL retention) and retention_q (Moneta's l_q retention) are two "
                                 "retentions: pass one")  # fmt: skip
            if momentum:
                raise ValueError("retention_kl (Memora's KL retention) is gradient descent without momentum: "
                                 "pass momentum=False")  # fmt: skip
            if window > 1:
                raise ValueError("window (the Omega rule) and retention_kl (Memora's retention) do not combine yet")
        check_muon_steps(muon_steps)
        if muon_steps is not None:
            if retention_q is not None:
                raise ValueError("muon_steps (ATLAS's Muon) and retention_q (Moneta's retention) do not combine yet")
            if retention_kl is not None:
                raise ValueError("muon_steps (ATLAS's Muon) and retention_kl (Memora's retention) do not combine: "
                                 "Memora's step is a softmax of the gradient step, not a momentum step")  # fmt: skip
            if parse_product_dtype(product_dtype) is not None:
                raise ValueError("muon_steps (ATLAS's Muon) and product_dtype='bfloat16' do not combine: the Muon "
                                 "spans compute in float32")  # fmt: skip
        if not (isinstance(delta_init, (int, float)) and 0 < delta_init < math.inf):
            raise ValueError(f"delta_init must be a positive number, got {delta_init!r}")
        if not 0 < theta_init < (max_lr if theta_activation == "sigmoid" else math.inf):
            raise ValueError(f"theta_init must be in (0, max_lr) for sigmoid / > 0, got {theta_init}")
        if not (0 < eta_init < 1 and 0 < alpha_init < 1):
            raise ValueError("eta_init and alpha_init must lie in (0, 1)")
        if conv_kernel < 0:
            raise ValueError(f"conv_kernel must be >= 0, got {conv_kernel}")
        if isinstance(gate_kernel, bool) or not isinstance(gate_kernel, int) or not 0 <= gate_kernel <= 2**10:
            raise ValueError(f"gate_kernel must be an integer in [0, 1024] (0 or 1: gates from the token alone), "
                             f"got {gate_kernel!r}")  # fmt: skip
        if associative_init and conv_kernel < 2:
            raise ValueError(f"associative_init reads the previous token through the convolution: "
                             f"it needs conv_kernel >= 2, got {conv_kernel}")
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.depth, self.expansion, self.chunk_size = depth, expansion, chunk_size
        self.activation, self.residual = activation, residual
        self.qk_activation = qk_activation
        self.objective = Objective(objective, p=float(objective_p))
        check_retention_q(retention_q)
        self.retention_q = None if retention_q is None else float(retention_q)
        self.retention_kl = None if retention_kl is None else float(retention_kl)
        self.muon_steps = muon_steps
        self.momentum, self.forgetting = momentum, forgetting
        self.conv_kernel = conv_kernel if conv_kernel > 1 else 0
        self.theta_activation, self.max_lr = theta_activation, max_lr
        check_max_grad_norm(max_grad_norm)
        self.max_grad_norm = max_grad_norm
        self.use_compile = compile
        self.product_dtype = parse_product_dtype(product_dtype)
        inner = heads * head_dim

        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        if self.conv_kernel:
            self.conv = nn.Conv1d(3 * inner, 3 * inner, self.conv_kernel, groups=3 * inner, bias=False)
        self.gate_kernel = gate_kernel if gate_kernel > 1 else 0
        if self.gate_kernel:
            self.gate_conv = nn.Conv1d(dim, dim, self.gate_kernel, groups=dim, bias=False)
        self.to_theta = nn.Linear(dim, heads)
        self.to_eta = nn.Linear(dim, heads) if momentum else None
        self.to_alpha = nn.Linear(dim, heads) if forgetting else None
        self.to_delta = nn.Linear(dim, heads) if self.objective.needs_delta else None
        self.window = window
        self.to_gamma = nn.Linear(dim, heads * window) if window > 1 else None
        self.features = None if feature_degree is None else PolynomialFeatures(head_dim, feature_degree)
        key_dim = head_dim if self.features is None else self.features.out_dim
        # M_0: one MLP per head, learned through the test-time updates.
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.empty(heads, o, i)) for o, i in memory_shapes(head_dim, depth, expansion, key_dim)
        )
        self.out_norm = RMSNorm(head_dim, eps=1e-6)
        self.to_gate = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self._theta_init, self._eta_init, self._alpha_init = theta_init, eta_init, alpha_init
        self._delta_init = float(delta_init)
        self.associative_init = associative_init
        self.reset_parameters()

    @classmethod
    def from_rule(cls, rule: str, dim: int, **kwargs) -> "NeuralMemory":
        """A layer following a named rule (``titans.ops.memory.rules``: "titans", "moneta",
        "yaad", "memora", "omega", "atlas"), ``kwargs`` for the rest; a keyword the rule fixes
        otherwise is refused."""
        return cls(dim, **merge_rule(rule, kwargs))

    def reset_parameters(self) -> None:
        for w in self.initial_weights:
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)
        for lin, bias in (
            (self.to_theta, self._theta_bias()),
            (self.to_eta, None if self.to_eta is None else _logit(self._eta_init)),
            (self.to_alpha, None if self.to_alpha is None else _logit(self._alpha_init)),
            (self.to_delta, self._delta_init + math.log(-math.expm1(-self._delta_init))),  # softplus^-1, stable
            (self.to_gamma, None if self.to_gamma is None else -math.log(self.window - 1)),  # sigmoid = 1/window
        ):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.constant_(lin.bias, bias)
        self.reset_gate_taps()
        if self.associative_init:
            self._init_associative()

    @torch.no_grad()
    def reset_gate_taps(self) -> None:
        """``gate_kernel``'s convolution reads the current token alone: the gates of gate_kernel=0,
        so that a model gains the setting without changing what it computes."""
        if self.gate_kernel:
            self.gate_conv.weight.zero_()
            self.gate_conv.weight[:, 0, -1] = 1.0

    @torch.no_grad()
    def _init_associative(self) -> None:
        """See ``associative_init``: W_k = W_q; conv taps: q and v the current token, k the
        previous one. The random taps stay at a tenth of their size rather than zero: a key with
        exactly zero input (the first token has no previous one) has no direction, and the
        gradient of its l2-normalisation is ~1/eps (measured: 6e10 on the conv weights)."""
        self.to_qkv.reset_parameters()
        self.conv.reset_parameters()
        inner = self.heads * self.head_dim
        w, taps = self.to_qkv.weight, self.conv.weight  # [3 inner, dim], [3 inner, 1, K]
        w[inner : 2 * inner] = w[:inner]
        taps.mul_(0.1)
        taps[:inner, 0, -1] += 1  # query: the current token (the last tap)
        taps[inner : 2 * inner, 0, -2] += 1  # key: the previous token
        taps[2 * inner :, 0, -1] += 1  # value: the current token

    def _theta_bias(self) -> float:
        if self.theta_activation == "softplus":
            return self._theta_init + math.log(-math.expm1(-self._theta_init))  # softplus^-1, stable
        return _logit(self._theta_init / self.max_lr)

    # ---- state ------------------------------------------------------------------------------

    def check_input(self, x: Tensor, state: NeuralMemoryState | None) -> None:
        """Refuse, with a message naming the problem, an input ``[B, T, dim]`` or a state this layer
        cannot take. ``forward`` and ``retrieve`` check; a block that calls ``memorize`` many
        times on parts of one input checks that input once with this."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor [batch, time, dim]")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, time, dim={self.dim}], got {tuple(x.shape)}")
        own = self.to_qkv.weight.dtype
        if x.dtype != own and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the layer's weights are {own}: convert one (layer.to({x.dtype}) "
                            f"or x.to({own})), or run under torch.autocast")  # fmt: skip
        if x.shape[0] == 0:
            raise ValueError("x has an empty batch dimension (B = 0)")
        if x.shape[1] == 0:
            raise ValueError("x has an empty time dimension (T = 0)")
        if nonfinite({"x": x}):
            raise NonFiniteError("x contains non-finite values (NaN or inf)")
        if state is not None:
            if not isinstance(state, NeuralMemoryState):
                raise TypeError(f"state must be a NeuralMemoryState, got {type(state).__name__}")
            if not isinstance(state.memory, MemoryState):
                raise TypeError(f"state.memory must be a MemoryState, got {type(state.memory).__name__}")
            position = state.memory.position
            if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < self.chunk_size:
                raise StateMismatchError(f"the state's memory position must be an integer in [0, chunk_size="
                                         f"{self.chunk_size}), got {position!r}")  # fmt: skip
            mine = [tuple(w.shape) for w in self.initial_weights]
            theirs = [tuple(w.shape[-3:]) for w in state.memory.weights]
            if theirs != mine:
                raise StateMismatchError(
                    f"the state's memory has {len(theirs)} layers of shapes {theirs} (heads, out, in); this layer's "
                    f"has {len(mine)} of {mine} (depth {self.depth}, expansion {self.expansion}, {self.heads} heads)"
                )
            if state.memory.batch_size != x.shape[0]:
                raise ValueError(
                    f"state was made for batch size {state.memory.batch_size}, x has {x.shape[0]}"
                )
            B = x.shape[0]
            _check_tail(state.conv, self.conv_kernel, (B, self.conv_kernel - 1, self.to_qkv.out_features),
                        "the q/k/v convolution", "conv_kernel")  # fmt: skip
            _check_tail(state.gate_conv, self.gate_kernel, (B, self.gate_kernel - 1, self.dim),
                        "the gates' convolution", "gate_kernel")  # fmt: skip
            written_with = state.memory.muon_steps
            if state.memory.momentum is not None and (written_with is None) != (self.muon_steps is None):
                raise StateMismatchError(f"the state's momentum was written with muon_steps={written_with}, this layer has "
                                         f"muon_steps={self.muon_steps}: a Muon momentum (ATLAS: raw gradients) and a "
                                         f"Titans one (theta-scaled gradients) do not continue each other")  # fmt: skip

    # ---- forward ----------------------------------------------------------------------------

    def _conv(self, u: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Causal depthwise convolution over time, continuing from ``tail`` ``[B, K-1, C]``."""
        if not self.conv_kernel:
            return u, None
        tail = None if tail is None else tail.to(u.dtype)
        return _causal_depthwise(u, tail, self.conv.weight), _next_tail(u, tail, self.conv_kernel)

    def gate_inputs(self, x: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """What the gates read for x ``[B, T, dim]`` after ``tail`` (``gate_kernel``): x itself, or
        its causal convolution over the last ``gate_kernel`` tokens; and the next call's tail."""
        if not self.gate_kernel:
            return x, None
        tail = None if tail is None else tail.to(x.dtype)
        return _causal_depthwise(x, tail, self.gate_conv.weight), _next_tail(x, tail, self.gate_kernel)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Per-token, per-head (theta, eta, alpha), each ``[B, T, H]``, from what the gates read
        (``gate_inputs``: the layer input, or its convolution)."""
        if self.theta_activation == "softplus":
            theta = F.softplus(self.to_theta(x))
        else:
            theta = self.max_lr * torch.sigmoid(self.to_theta(x))
        eta = None if self.to_eta is None else torch.sigmoid(self.to_eta(x))
        alpha = None if self.to_alpha is None else torch.sigmoid(self.to_alpha(x))
        return theta, eta, alpha

    def threshold(self, x: Tensor) -> Tensor | None:
        """The huber objective's per-token, per-head threshold ``delta`` ``[B, T, H]`` (None for
        objectives without one)."""
        return None if self.to_delta is None else F.softplus(self.to_delta(x))

    def featurize(self, x: Tensor) -> Tensor:
        """The feature map of normalised keys and queries ``[..., head_dim]`` (``feature_degree``),
        or x itself without one."""
        return x if self.features is None else self.features(x)

    def window_gates(self, x: Tensor) -> Tensor | None:
        """The Omega rule's window weights ``gamma`` ``[B, T, H, window]`` (``[..., j]`` weighs token
        t - j in token t's write), or None with ``window=1``."""
        if self.to_gamma is None:
            return None
        return torch.sigmoid(rearrange(self.to_gamma(x), "b t (h c) -> b t h c", h=self.heads))

    def forward(
        self, x: Tensor, state: NeuralMemoryState | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        """x ``[B, T, dim]`` -> ``(y [B, T, dim], state)``. Memorises every token of x and returns
        for each token the memory's answer to its query, with the weights as of that token."""
        self.check_input(x, state)
        y, state = self.memorize(x, state)
        return self.output(y, x), state

    def memorize(
        self, x: Tensor, state: NeuralMemoryState | None = None, *, check_state: bool = True, compile_chunks: bool = True
    ) -> tuple[Tensor, NeuralMemoryState]:
        """Write every token of x ``[B, T, dim]`` (unchecked: see ``check_input``) and return the
        memory's raw answers ``[B, T, heads, head_dim]`` (each token's query read with the weights
        as of that token) and the new state; ``output`` turns answers into the layer's output.
        MAC memorises segment by segment and runs ``output`` once on the whole block input.
        ``check_state=False`` skips the memory op's checks of its q, k, v, gates and state (for a
        state the op itself produced); ``compile_chunks=False`` runs no compiled chunk group even
        with the compile switch on (MAC's compiled segment step traces this call into its own
        graph)."""
        qkv, conv_tail = self._conv(self.to_qkv(x), None if state is None else state.conv)
        qkv = self._activate(qkv)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b t h d", three=3, h=self.heads)
        q, k = self.featurize(l2_normalize(q)), self.featurize(l2_normalize(k))
        gate_in, gate_tail = self.gate_inputs(x, None if state is None else state.gate_conv)
        theta, eta, alpha = self.gates(gate_in)
        kwargs = dict(
            q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha,
            chunk_size=self.chunk_size, activation=self.activation, residual=self.residual,
            max_grad_norm=self.max_grad_norm, objective=self.objective, delta=self.threshold(gate_in),
            retention_q=self.retention_q, gamma=self.window_gates(gate_in), retention_kl=self.retention_kl,
            muon_steps=self.muon_steps,
        )  # fmt: skip
        if state is None:
            kwargs["weights"] = tuple(self.initial_weights)
        else:
            kwargs["state"] = state.memory
        if x.shape[1] == 1:
            y, mem = step_memory(**kwargs)
        else:
            op = chunk_memory if check_state else chunk_memory_unchecked
            if self.product_dtype is not None:
                warn_if_cpu_bf16_is_slow(
                    x.device, "NeuralMemory product_dtype=bfloat16 (TitansConfig.memory_product_dtype)",
                    instead='product_dtype=None (memory_product_dtype="float32") here',
                )  # fmt: skip
            y, mem = op(**kwargs, compile=self.use_compile and compile_chunks, product_dtype=self.product_dtype)
        if not torch.compiler.is_compiling() and nonfinite({"y": y}):
            self._raise_diverged(y, theta)
        return y, NeuralMemoryState(memory=mem, conv=conv_tail, gate_conv=gate_tail)

    def _raise_diverged(self, y: Tensor, theta: Tensor) -> None:
        """Name the first token and head whose answer is not finite (inputs were checked finite,
        so the memory's own updates blew up there) and what bounds them."""
        bad = ~torch.isfinite(y).all(-1)  # [B, T, H]
        t = int(bad.any(0).any(-1).nonzero()[0])
        h = int(bad[:, t].any(0).nonzero()[0])
        bound = ("max_grad_norm (TitansConfig.memory_max_grad_norm) bounds each step" if self.max_grad_norm is None
                 else f"lower max_grad_norm (now {self.max_grad_norm}) or the learning rate")
        if self.theta_activation == "softplus":
            bound += "; theta_activation='sigmoid' with max_lr (memory_theta_activation, memory_max_lr) bounds theta"
        raise MemoryDivergedError(
            f"the neural memory diverged at token {t} of its input, head {h} (theta there up to "
            f"{float(theta[:, t, h].detach().max()):.3g}): its test-time updates grew without bound; {bound}"
        )

    # ---- one token, for the decode graph ---------------------------------------------------
    # ``step_state`` (Python: is the state one the step can continue?) -> ``step`` (tensor math,
    # the same in every token of a stream) -> ``state_after_step`` (Python again).

    def _token_conv(self, u: Tensor, tail: Tensor, channels: slice) -> tuple[Tensor, Tensor]:
        """The causal convolution of one token u ``[B, 1, C]`` after ``tail`` ``[B, K-1, C]``
        (the convolution's ``channels``): ``(out [B, 1, C], next tail)``. ``_conv`` for T = 1
        without its autograd node, as plain tensor math the decode graph can trace."""
        return _token_depthwise(u, tail, self.conv.weight[channels])

    def step_memorize(self, x: Tensor, state: MemoryStep) -> tuple[Tensor, MemoryStep]:
        """``memorize`` for one token x ``[B, 1, dim]`` after ``state`` (from ``step_state``):
        unchecked, and with no Python branch on the state, so that ``TitansLM``'s decode step can
        run it inside one compiled graph. Returns ``(answer [B, 1, H, D], state)``. Checked
        against ``memorize`` by the tests."""
        B, H, D = x.shape[0], self.heads, self.head_dim
        conv_tail, gate_in, gate_tail = state.conv, x, None
        if self.gate_kernel:
            gate_in, gate_tail = _token_depthwise(x, state.gate_conv, self.gate_conv.weight)
        u = self.to_qkv(x)
        if self.conv_kernel:
            u, conv_tail = self._token_conv(u, conv_tail, slice(None))
        q, k, v = rearrange(self._activate(u), "b t (three h d) -> three (b h) t d", three=3, h=H)  # (B*H, 1, D)
        q, k = self.featurize(l2_normalize(q)), self.featurize(l2_normalize(k))
        cd = compute_dtype(x.dtype)
        flat = lambda ws: None if ws is None else tuple(w.to(cd).reshape(B * H, *w.shape[2:]) for w in ws)  # noqa: E731
        gate = lambda g: None if g is None else g.to(cd).reshape(B * H, 1, 1)  # noqa: E731  (B, 1, H) -> (B*H, 1, 1)
        theta, eta, alpha = self.gates(gate_in)
        delta = self.threshold(gate_in)
        kk, vv = k.to(cd), v.to(cd)
        dd = None if delta is None else delta.to(cd).reshape(B * H, 1)
        mix, window = None, {}
        if self.window > 1:  # the Omega rule: the window's c - 1 tokens, then this one
            c = self.window
            kk, vv = torch.cat([state.window_k, kk], 1), torch.cat([state.window_v, vv], 1)
            dd = None if dd is None else torch.cat([state.window_delta, dd], 1)
            gamma = self.window_gates(gate_in).to(cd).reshape(B * H, 1, c)
            mix = window_weights(gamma, state.window_valid, 0, 1).squeeze(1)  # (B*H, c)
            window = dict(window_k=kk[:, 1:], window_v=vv[:, 1:], window_delta=None if dd is None else dd[:, 1:],
                          window_valid=torch.clamp(state.window_valid + 1, max=c - 1))  # fmt: skip
        unflat = lambda ws: None if ws is None else tuple(w.reshape(B, H, *w.shape[1:]) for w in ws)  # noqa: E731
        if self.retention_kl is not None:  # Memora: the position decides the lag and closing steps
            y, W, Wc, Z = kl_step_flat(
                flat(state.weights), flat(state.chunk_weights), flat(state.log_weights), q.to(cd), kk, vv,
                gate(theta), gate(alpha), self.activation, self.residual, self.max_grad_norm, self.objective, dd,
                self.retention_kl, lag=state.position == 0, end=state.position == self.chunk_size - 1,
            )  # fmt: skip
            answer = y.reshape(B, H, 1, D).transpose(1, 2).to(x.dtype)
            return answer, MemoryStep(unflat(W), unflat(Wc), None, conv_tail, log_weights=unflat(Z),
                                      position=(state.position + 1) % self.chunk_size, gate_conv=gate_tail)  # fmt: skip
        y, W, S = step_flat(
            flat(state.weights), flat(state.chunk_weights), flat(state.momentum), q.to(cd), kk, vv,
            gate(theta), gate(eta), gate(alpha), self.activation, self.residual, self.max_grad_norm,
            self.objective, dd, self.retention_q, mix, self.muon_steps,
        )  # fmt: skip
        answer = y.reshape(B, H, 1, D).transpose(1, 2).to(x.dtype)  # (B, 1, H, D)
        return answer, MemoryStep(unflat(W), state.chunk_weights, unflat(S), conv_tail, **window, gate_conv=gate_tail)

    def step_state(self, state: NeuralMemoryState | None, batch_size: int) -> MemoryStep | None:
        """``state`` as ``step`` takes it; at a chunk start the chunk's weights are the running
        weights (as a copy, see ``titans.ops.tensors.distinct``). None when the state does not fit
        this layer (none yet, another batch size, chunk size, head layout or convolution setting):
        the caller then takes the general path, whose checks name the problem."""
        if not isinstance(state, NeuralMemoryState) or not isinstance(state.memory, MemoryState):
            return None
        m = state.memory
        shapes = [(batch_size, *w.shape) for w in self.initial_weights]
        groups = [m.weights, m.chunk_weights] + ([] if m.momentum is None else [m.momentum])
        if (m.log_weights is None) != (self.retention_kl is None):
            return None
        if m.momentum is not None and (m.muon_steps is None) != (self.muon_steps is None):
            return None
        groups += [] if m.log_weights is None else [m.log_weights]
        tail = None if not self.conv_kernel else (batch_size, self.conv_kernel - 1, self.to_qkv.out_features)
        gate_tail = None if not self.gate_kernel else (batch_size, self.gate_kernel - 1, self.dim)
        if not (
            0 <= m.position < self.chunk_size
            and all(len(g) == len(shapes) and all(w.shape == s for w, s in zip(g, shapes)) for g in groups)
            and (None if state.conv is None else tuple(state.conv.shape)) == tail
            and (None if state.gate_conv is None else tuple(state.gate_conv.shape)) == gate_tail
            and m.weights[0].device == self.initial_weights[0].device
        ):
            return None
        chunk_w = distinct(m.weights if m.position == 0 else m.chunk_weights, m.weights)
        extra = {}
        if m.log_weights is not None:  # Memora: the log-weights, and the position as a tensor
            extra = dict(log_weights=m.log_weights, position=torch.tensor(m.position, device=m.weights[0].device))
        if self.window > 1:  # the Omega window as flat tensors (zeros where no token was seen yet)
            c, N = self.window, batch_size * self.heads
            w, key_dim = m.window, self.initial_weights[0].shape[-1]  # keys after the feature map, if any
            if w is None:  # no token seen with a window yet: zeros, none of them valid
                zeros = lambda *shape: m.weights[0].new_zeros(batch_size, self.heads, *shape)  # noqa: E731
                w = MemoryWindow(zeros(c - 1, key_dim), zeros(c - 1, self.head_dim),
                                 zeros(c - 1) if self.objective.needs_delta else None, 0)  # fmt: skip
            if w.size != c or (w.delta is None) == self.objective.needs_delta or w.k.shape[-1] != key_dim:
                return None  # the general path explains
            flat = lambda t: None if t is None else t.reshape(N, *t.shape[2:]).contiguous()  # noqa: E731  (B, H, ...) -> (B*H, ...)
            extra = dict(window_k=flat(w.k), window_v=flat(w.v), window_delta=flat(w.delta),
                         window_valid=torch.tensor(w.valid, device=m.weights[0].device))  # fmt: skip
        return MemoryStep(m.weights, chunk_w, m.momentum, standard_strides(state.conv), **extra,
                          gate_conv=standard_strides(state.gate_conv))  # fmt: skip

    def state_after_step(self, before: NeuralMemoryState, step: MemoryStep) -> NeuralMemoryState:
        """The state after one ``step`` (or ``step_memorize``) continued ``before``."""
        pos = (before.memory.position + 1) % self.chunk_size
        chunk_weights = step.weights if pos == 0 else step.chunk_weights
        window = None
        if step.window_k is not None:  # back to the state's [B, H, c - 1, ...]
            B = step.weights[0].shape[0]
            unflat = lambda t: None if t is None else t.reshape(B, self.heads, *t.shape[1:])  # noqa: E731
            before_valid = 0 if before.memory.window is None else before.memory.window.valid
            valid = min(self.window - 1, before_valid + 1)  # on the host: no device sync per token
            window = MemoryWindow(unflat(step.window_k), unflat(step.window_v), unflat(step.window_delta), valid)
        memory = MemoryState(step.weights, step.momentum, chunk_weights, pos, window, step.log_weights, self.muon_steps)
        return NeuralMemoryState(memory, step.conv, step.gate_conv)

    def step(self, x: Tensor, state: MemoryStep) -> tuple[Tensor, MemoryStep]:
        """``forward`` for one token x ``[B, 1, dim]`` after ``state`` (see ``step_memorize``):
        ``(y [B, 1, dim], state)``."""
        answer, state = self.step_memorize(x, state)
        return self.output(answer, x), state

    def step_read_queries(self, x: Tensor, conv_tail: Tensor | None) -> MemoryQueries:
        """``read_queries`` for one token x ``[B, 1, dim]``, as plain tensor math (no autograd node
        of its own, no Python branch on the state: see ``step_memorize``)."""
        inner = self.heads * self.head_dim
        u = F.linear(x, self.to_qkv.weight[:inner])
        if self.conv_kernel:
            u, conv_tail = self._token_conv(u, conv_tail, slice(0, inner))
        q = self.featurize(l2_normalize(self._activate(u).reshape(x.shape[0], self.heads, self.head_dim)))  # (B, H, Dk)
        flat_q = q.to(compute_dtype(q.dtype)).reshape(-1, 1, q.shape[-1])  # (B*H, 1, Dk)
        return MemoryQueries(flat_q, F.silu(self.to_gate(x)), conv_tail)

    def _activate(self, u: Tensor) -> Tensor:
        """The activation of the projected (and convolved) q | k | v channels, or of q alone:
        SiLU on all (the paper), or with ``qk_activation="identity"`` on the values only."""
        if self.qk_activation == "silu":
            return F.silu(u)
        qk = 2 * self.heads * self.head_dim
        if u.shape[-1] <= qk:  # the query (or query and key) channels alone
            return u
        return torch.cat([u[..., :qk], F.silu(u[..., qk:])], dim=-1)

    def output(self, y: Tensor, x: Tensor) -> Tensor:
        """The layer's output for the memory's answers y ``[B, T, heads, head_dim]`` to the layer
        input x ``[B, T, dim]``: per-head RMSNorm, SiLU output gate from x, projection back to
        dim. Holds no state."""
        return self._gated_output(y, F.silu(self.to_gate(x)), x.dtype)

    def _gated_output(self, y: Tensor, gate: Tensor, dtype: torch.dtype) -> Tensor:
        """``output`` with the gate ``silu(x W_gate)`` ``[B, T, heads * head_dim]`` given."""
        y = self.out_norm(y.to(dtype))  # (B, T, H, D)
        return self.to_out(rearrange(y, "b t h d -> b t (h d)") * gate)

    def initial_weights_for(self, batch_size: int) -> tuple[Tensor, ...]:
        """M_0 broadcast to the batch, ``[B, H, out, in]`` per layer (a view: gradients flow): the
        weights a read uses before any write; with ``retention_kl``, ``c softmax`` of the rows of
        the parameters (which are then logits)."""
        ws = tuple(w.unsqueeze(0).expand(batch_size, *w.shape) for w in self.initial_weights)
        return ws if self.retention_kl is None else kl_simplex(ws, self.retention_kl)[1]

    def read_weights(self, state: NeuralMemoryState | None, batch_size: int) -> tuple[Tensor, ...]:
        """The weights ``read`` takes to answer as the memory answers at ``state`` (M_0 before any
        write): the state's running weights; with ``retention_q``, Moneta's accumulators divided by
        the scale its writes' reads use (that of the open chunk's start accumulator)."""
        if state is None:
            weights = start = self.initial_weights_for(batch_size)
        else:
            weights, start = state.memory.weights, state.memory.chunk_weights  # equal at a chunk start
        if self.retention_q is None:
            return weights
        s = lq_scale(start, self.retention_q)[..., None, None]  # (B, H, 1, 1)
        return tuple(w / s.to(w.dtype) for w in weights)

    def retrieve(
        self, x: Tensor, weights: tuple[Tensor, ...], conv_tail: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Read without writing (the paper's M*): ``y_t = M(q_t)`` with the fixed ``weights``
        (``[B, H, out, in]`` per layer, e.g. ``read_weights(state, B)``), queries from x through the
        query projection and its own causal-convolution stream, continued from ``conv_tail``
        (the last ``kernel - 1`` query projections ``[B, K-1, heads * head_dim]``).
        Returns ``(y [B, T, dim], new conv tail)``."""
        self.check_input(x, None)
        queries = self.read_queries(x, conv_tail)
        return self.read(queries, weights, x.dtype), queries.conv

    def read_queries(self, x: Tensor, conv_tail: Tensor | None = None) -> MemoryQueries:
        """What reading the memory computes from x ``[B, T, dim]`` alone, for all of x at once (the
        query stream continued from ``conv_tail``). MAC calls this once per block call and ``read``
        once per segment, instead of projecting every segment separately."""
        inner = self.heads * self.head_dim
        u = F.linear(x, self.to_qkv.weight[:inner])
        if self.conv_kernel:
            tail = None if conv_tail is None else conv_tail.to(u.dtype)
            u, conv_tail = _causal_depthwise(u, tail, self.conv.weight[:inner]), _next_tail(u, tail, self.conv_kernel)
        q = self.featurize(l2_normalize(self._activate(u).reshape(*u.shape[:2], self.heads, self.head_dim)))
        B, T, H, D = q.shape
        flat_q = q.to(compute_dtype(q.dtype)).transpose(1, 2).reshape(B * H, T, D)
        return MemoryQueries(flat_q, F.silu(self.to_gate(x)), conv_tail)

    def read(self, queries: MemoryQueries, weights: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
        """Read without writing, the paper's M*: ``y = M(q)`` with the fixed ``weights``
        (``[B, H, out, in]`` per layer, e.g. ``read_weights(state)``) for ``queries`` (of t tokens)
        -> ``[B, t, dim]`` in ``dtype``."""
        flat_q, gate = queries.q, queries.gate
        B, (BH, T, _) = gate.shape[0], flat_q.shape
        flat_w = [w.to(flat_q.dtype).reshape(BH, *w.shape[2:]) for w in weights]
        y = mlp_read(flat_w, flat_q, self.activation, self.residual)  # saves q and weights only
        y = y.reshape(B, self.heads, T, self.head_dim).transpose(1, 2)
        return self._gated_output(y, gate, dtype)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, depth={self.depth}, "
            f"expansion={self.expansion}, chunk_size={self.chunk_size}, momentum={self.momentum}, "
            f"forgetting={self.forgetting}, conv_kernel={self.conv_kernel}, objective={self.objective.name}, retention_q={self.retention_q}, "
            f"retention_kl={self.retention_kl}, "
            f"window={self.window}, feature_degree={None if self.features is None else self.features.degree}, "
            f"gate_kernel={self.gate_kernel}, "
            f"muon_steps={self.muon_steps}"
        )
