"""The chunk-parallel form of the neural memory (docs/design.md §2).

Inside a chunk every quantity is linear in the per-token gradients ``u_i`` (all taken at the
chunk-start weights), so a chunk of n tokens is a handful of batched matrix products; the only
loop runs over chunks. See README.md in this folder for the derivation, in these names.

Training memory and speed: each chunk is one autograd node (``_ChunkFunction``) with a
hand-derived backward. It saves the chunk-start state (which the previous chunk produced anyway),
views of q, k, v and the gates, and a few O(n (D + E)) intermediates, and recomputes activations
from pre-activations in the backward pass: memory is one state per chunk plus small buffers, and
no per-token weights are ever stored.
``backward="autograd"`` differentiates the same forward with autograd instead: the simple
reference the analytic backward is tested against (it keeps every intermediate alive).
Memora's softmax retention (``retention_kl``) is not linear inside a chunk: each chunk's first token
takes its exact step (``step.kl_step_flat``) and the kernel runs the rest, the papers' chunk
approximation (README, "Memora: KL retention"). ATLAS's Muon (``muon_steps``) is not linear in the
momentum either: ``_muon_span`` materialises each token's momentum, orthogonalises it and sums the
steps, exactly the token loop's rule (README, "Muon: the ATLAS inner optimiser"); autograd
differentiates it, one node per chunk that runs the chunk again in the backward (``_MuonChunk``).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .mlp import activation as act_fn
from .mlp import activation_with_grads, clip_scale, key_gradients
from .muon import newton_schulz
from .objectives import L2, Objective, as_objective
from .step import kl_step_flat
from .state import (
    full_precision,
    MemoryState,
    check_inputs,
    compute_dtype,
    initial_memory_state,
    kl_simplex,
    log_gate,
    lq_scale,
    next_window,
    state_from_flat,
    window_tokens,
    window_weights,
)

__all__ = ["chunk_memory", "chunk_memory_unchecked"]


def _decay_grid(x: Tensor) -> Tensor:
    """``out[..., t, s] = exp(sum_{j=s+1..t} x[..., j])`` for t >= s (1 on the diagonal), 0 above:
    the products of the gates ``exp(x_j)`` between s and t.

    Each sum is its own masked sum, never a difference of two long cumulative sums, so no
    precision is lost when the logs are large and negative. The sums are one product with a
    lower-triangular matrix of ones (not a ``cumsum`` over the n x n grid, whose backward flips
    the whole batched grid twice). Above the diagonal the sums are empty (0), so ``exp`` then
    ``tril`` gives the zeros, and their gradients, that masking with -inf would: ``tril`` over
    the grid ran fwd+bwd in 53-59 ms against 87-96 for two broadcast ``masked_fill`` (scratch
    timing, [16, 64, 64] gates, 2 threads, AMD EPYC): ~1.5% of a layer training step by an
    operator census, below that machine's run-to-run noise end to end."""
    n = x.shape[-1]
    lower = torch.ones(n, n, dtype=x.dtype, device=x.device).tril()
    xm = x.unsqueeze(-1).expand(*x.shape, n).tril(-1)  # (..., j, s) = x_j where j > s, else 0
    return (lower @ xm).exp().tril()  # (..., t, s): sum over j <= t, exponentiated


def _decay_products(theta: Tensor, log_a: Tensor | None, log_eta: Tensor | None):
    """The chunk's mixing coefficients from its gates (positions 1..n, all ``[..., n]`` inputs;
    leading dims batch independent chunks).

    A_t = prod_{j<=t} a_j,  F[t,s] = prod_{s<j<=t} a_j,  e_s = prod_{j<=s} eta_j,
    E[s,i] = prod_{i<j<=s} eta_j,  B = F e,  C = F E diag(theta).
    Returns (A, B, C, e_end, m) with e_end = e_n and m = E[n, :] * theta (for the end momentum);
    A is None without forgetting, B / e_end / m are None without momentum."""
    n = theta.shape[-1]
    if log_a is not None:
        A = log_a.cumsum(-1).exp()  # (N, n)
        Fm = _decay_grid(log_a)  # (N, n, n)
    else:
        A = None
        Fm = torch.ones(n, n, dtype=theta.dtype, device=theta.device).tril()
    if log_eta is None:
        return A, None, Fm * theta.unsqueeze(-2), None, None
    e = log_eta.cumsum(-1).exp()  # (N, n)
    E = _decay_grid(log_eta)  # (N, n, n)
    B = (Fm @ e.unsqueeze(-1)).squeeze(-1)  # (N, n)
    C = (Fm @ E) * theta.unsqueeze(-2)  # (N, n, n)
    return A, B, C, e[..., -1], E[..., -1, :] * theta


def _muon_products(theta: Tensor, log_a: Tensor | None, log_eta: Tensor | None):
    """Muon's span coefficients from its gates (positions 1..n, ``[..., n]`` inputs), for
    ``S_t = e_t S0 - sum_{i<=t} E[t,i] G_i`` and ``M_t = A_t W0 + sum_{s<=t} Fth[t,s] O_s``:

    A_t = prod_{j<=t} a_j,  Fth[t,s] = prod_{s<j<=t} a_j * theta_s,  e_t = prod_{j<=t} eta_j,
    E[t,i] = prod_{i<j<=t} eta_j.

    Returns (A, Fth, e, E); A is None without forgetting, e and E without momentum."""
    n = theta.shape[-1]
    if log_a is not None:
        A, Fm = log_a.cumsum(-1).exp(), _decay_grid(log_a)
    else:
        A, Fm = None, torch.ones(n, n, dtype=theta.dtype, device=theta.device).tril()
    Fth = Fm * theta.unsqueeze(-2)
    if log_eta is None:
        return A, Fth, None, None
    return A, Fth, log_eta.cumsum(-1).exp(), _decay_grid(log_eta)


def _chunk_coefficients(
    sizes: list[int], theta: Tensor, log_a: Tensor | None, log_eta: Tensor | None, products=_decay_products
):
    """``products`` (``_decay_products``, or ``_muon_products``) of every chunk span (``sizes``
    along the time dim of the ``[N, T]`` gates), as one tuple per span. Each run of equal-length
    spans (all full chunks, typically) is computed in one batched call: a few ops per call instead
    of a dozen per chunk, and one autograd node per op for the whole sequence."""
    out, t, i, gates = [], 0, 0, (theta, log_a, log_eta)
    while i < len(sizes):
        n, r = sizes[i], 1
        while i + r < len(sizes) and sizes[i + r] == n:
            r += 1
        # (N, r*n) gates as (N, r, n): r chunks at once
        runs = [None if x is None else x[:, t : t + r * n].reshape(x.shape[0], r, n) for x in gates]
        coefs = products(*runs)
        per_chunk = [[None] * r if c is None else c.unbind(1) for c in coefs]
        out.extend(zip(*per_chunk))
        t, i = t + r * n, i + r
    return out


def _key_side(Wg, k, v, act: str, residual: bool, back=None, objective: Objective = L2, delta=None):
    """``key_gradients`` (the per-token gradients in factored form, at Wg) plus
    ``dhs[l] = dz_{l+1} Wg_{l+1}``, the loss gradient at each hidden activation before act' is
    applied: the backward pass needs it and would otherwise redo that product; and the error
    ``M(k) - v`` when the objective is not l2 (its backward needs it; l2's needs only dz).
    ``back``: Wg in the dtype of the low-precision products, for the ``dz Wg`` products (the
    forward products and ``M(k) - v`` stay in Wg's dtype: see ``_chunk_forward``)."""
    mT = lambda x: x.transpose(-1, -2)  # noqa: E731
    L = len(Wg)
    back = Wg if back is None else back
    hs, d1s = [k], []
    for l in range(L - 1):
        h, d1, _ = activation_with_grads(act, hs[-1] @ mT(Wg[l]))
        hs.append(h), d1s.append(d1)
    out = hs[-1] @ mT(Wg[-1])
    err = None
    if objective.name == "l2":
        dz = torch.sub(out + k if residual else out, v).mul_(2)
    else:
        err = torch.sub(out + k if residual else out, v)
        dz = objective.grad(err, delta)
    dzs, dhs = [dz], []
    for l in range(L - 1, 0, -1):
        dh = dz.to(back[l].dtype) @ back[l]
        dz = dh * d1s[l - 1]
        dzs.append(dz), dhs.append(dh)
    dzs.reverse(), dhs.reverse()
    return hs, dzs, dhs, err


def _window_spans(full: Tensor | None, own: Tensor | None, sizes: list[int], starts: list[int], c: int):
    """The key side of each span of the Omega rule: the ``c - 1`` tokens before it, taken from
    ``full`` (the carried window, then the input: ``full[:, c - 1 + t] == own[:, t]``), then its
    own tokens. One gather for every span's earlier tokens and one split of ``own``: slicing
    ``full`` per span would make the backward allocate a gradient of ``full``'s size per span."""
    if full is None:
        return [None] * len(sizes)
    if c == 1:
        return list(own.split(sizes, dim=1))
    index = torch.cat([torch.arange(t0, t0 + c - 1, device=full.device) for t0 in starts])
    before = full.index_select(1, index).split(c - 1, dim=1)
    return [torch.cat(pair, dim=1) for pair in zip(before, own.split(sizes, dim=1))]


def _caster(dtype: torch.dtype):
    """A function casting a tensor, a sequence of tensors or None to ``dtype`` (the products'
    dtype); the identity when nothing needs a cast (full-precision products)."""

    def cast(x):
        if x is None:
            return None
        if isinstance(x, Tensor):
            return x if x.dtype == dtype else x.to(dtype)
        return [cast(t) for t in x]

    return cast


def _add_product(acc: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``acc += alpha * (a @ b)`` in place, returning acc. Eagerly one ``baddbmm_`` (no copy of
    acc). Traced by torch.compile, a product and an add instead: Inductor lowers an in-place
    ``baddbmm_`` to ``baddbmm(out=new buffer)``, which first copies acc (19 copies a chunk, 5% of
    a compiled training step here), while a separate add fuses into a neighbouring kernel. With
    bf16 products the traced form rounds the product to bf16 before adding (eagerly it is rounded
    once, with the sum): a second rounding, within the bf16 tolerances the compile tests check."""
    if torch.compiler.is_compiling():
        return acc.add_(a @ b, alpha=alpha)
    return acc.baddbmm_(a, b, alpha=alpha)


def _sub_product(acc: Tensor, a: Tensor, b: Tensor, fresh: bool) -> Tensor:
    """``acc - a @ b``, in place when ``fresh`` (acc created by the caller). With low-precision
    products (a, b narrower than acc) the product is rounded once and subtracted in acc's dtype:
    the recurrent state accumulates in full precision."""
    if a.dtype == acc.dtype and not torch.compiler.is_compiling():  # (see _add_product)
        return acc.baddbmm_(a, b, alpha=-1) if fresh else torch.baddbmm(acc, a, b, alpha=-1)
    return acc.sub_(a @ b) if fresh else acc - a @ b


def _widens(w: Tensor) -> bool:
    """A layer ``[N, out, in]`` with more outputs than inputs: per-token row scalings are cheaper
    on its inputs (and on its output otherwise), which decides how each layer's products run."""
    return w.shape[-2] > w.shape[-1]


def _outer_factors(dz: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``a^T b = dz^T diag(c) h`` (c ``[N, n]``), the row scaling applied to the
    narrower of dz ``[N, n, out]`` and h ``[N, n, in]``."""
    if h.shape[-1] <= dz.shape[-1]:
        return dz, c.unsqueeze(-1) * h
    return c.unsqueeze(-1) * dz, h


def _chunk_forward(
    q, k, v, A, B, C, e_end, m, W0, S0, Wg, act, residual, max_norm=None, keep=False, objective=L2, delta=None
):
    """One chunk of n tokens for N independent memories (differentiable by autograd, too).

    q, k, v ``[N, n, D]``; A, B ``[N, n]``; C ``[N, n, n]``; e_end ``[N]``; m ``[N, n]``;
    ``objective`` the loss of each token's error, with its threshold ``delta`` ``[N, n]`` if any.
    W0, S0: weights and momentum before the chunk's first token (S0 None without momentum);
    Wg: the weights every token of the chunk takes its gradient at, or None for W0 (a fresh
    chunk; Wg differs only when the chunk was entered mid-way by a state). ``max_norm``: clip
    each token's inner gradient to that norm, by scaling its learning rate, i.e. column i of C
    and entry i of m (they carry theta_i).
    Returns ``(y, W_end, S_end)``, plus, when ``keep``, the
    intermediates the backward pass keeps: the factored gradients, the hidden-activation
    gradients, the retrieval pre-activations, the error (objectives other than l2) and, for
    layers that do not widen, the retrieval's ``r W0^T`` and ``r S0^T`` (``[N, n, out]``, small there). The key-side pre-activations and
    the n x n scores are one small product each, recomputed in the backward instead.

    Per-token scalings (A, B, the end-state's c and m) go on the narrower operand of each
    product, so that no ``[n, hidden]`` tensor takes an extra elementwise pass for them.
    In-place updates touch only tensors created here, which saves a copy per product; under
    autograd (the reference mode) they stay correct, as the tests against the token loop check.
    """
    L = len(W0)
    mT = lambda x: x.transpose(-1, -2)  # noqa: E731
    # Low-precision products (q.dtype narrower than the state's, k and v in the state's dtype):
    # the products inside the chunk run on that dtype's copies of the state and coefficients; the
    # end state is accumulated in the state's dtype from its full-precision decays (a decay of
    # 1 - 1e-6 rounds to 1 in bf16). The key side's forward and its error M(k) - v stay in full
    # precision: from rounded weights the error of a memory that fits v well would be bf16's
    # rounding of M(k) (~2^-9 |v|), not its own, and the memory could never fit below that.
    lo = _caster(q.dtype)
    W0l, S0l = lo(W0), lo(S0)
    # None rather than ``Wg is W0``: dynamo cannot trace ``is`` between tuples (the graph broke here
    # and compile=True ran this function eagerly).
    Wg, Wgl = (W0, W0l) if Wg is None else (Wg, lo(Wg))
    # Per-token gradients at Wg in factored form: u_i(l) = dz_i(l) h_i(l-1)^T.
    hs, dzs, dhs, err = _key_side(Wg, k, v, act, residual, back=Wgl, objective=objective, delta=delta)
    if max_norm is not None:
        scale, _ = clip_scale(dzs, hs, max_norm)
        C = C * scale.unsqueeze(-2)
        m = None if m is None else m * scale
    hs, dzs = lo(hs), lo(dzs)
    Al, Bl, Cl, ml = lo(A), lo(B), lo(C), lo(m)
    # Retrieval with per-token weights M_t = A_t W0 + B_t S0 - sum_{i<=t} C[t,i] u_i, layer by layer.
    r, zs, proj = q, [], []
    for l in range(L):
        if _widens(W0l[l]) or (A is None and S0 is None):
            z = (r if A is None else Al.unsqueeze(-1) * r) @ mT(W0l[l])
            if S0 is not None:
                z = _add_product(z, Bl.unsqueeze(-1) * r, mT(S0l[l]))
            proj.append((None, None))
        else:  # scale the (narrower) outputs; keep the products for the backward's dA, dB
            rW = r @ mT(W0l[l])
            rS = None if S0 is None else r @ mT(S0l[l])
            z = rW if A is None else rW * Al.unsqueeze(-1)
            if S0 is not None:
                z = torch.addcmul(z, Bl.unsqueeze(-1), rS) if z is rW else z.addcmul_(Bl.unsqueeze(-1), rS)
            proj.append((rW, rS))
        Q = r @ mT(hs[l])  # (N, n, n): query-side against key-side activations
        z = _add_product(z, Q * Cl, dzs[l], alpha=-1)
        zs.append(z)
        r = act_fn(act, z) if l < L - 1 else z
    y = r + q if residual else r

    # State after the chunk's last token: the last row of the same formulas.
    c = Cl[:, -1, :]  # (N, n)
    W_end, S_end = [], None if S0 is None else []
    for l in range(L):
        w = W0[l] if A is None else A[:, -1, None, None] * W0[l]
        if S0 is not None:
            b_end = B[:, -1, None, None]
            w = torch.addcmul(w, b_end, S0[l]) if w is W0[l] else w.addcmul_(b_end, S0[l])
            s = e_end[:, None, None] * S0[l]
            a, b = _outer_factors(dzs[l], hs[l], ml)
            S_end.append(_sub_product(s, mT(a), b, fresh=True))
        a, b = _outer_factors(dzs[l], hs[l], c)
        W_end.append(_sub_product(w, mT(a), b, fresh=w is not W0[l]))
    if keep:
        return y, W_end, S_end, (dzs, dhs, zs[:-1], [t for p in proj for t in p], err)
    return y, W_end, S_end


def _muon_span(q, k, v, delta, A, Fth, e, E, mix, W0, S0, Wg, act, residual, max_norm, objective, steps):
    """One span of n tokens of ATLAS's Muon rule for N memories, in plain autograd ops: each
    token's momentum ``S_t`` materialised (``[N, n, out, in]`` per layer), orthogonalised, and the
    steps summed into each token's weights ``M_t``, which read its query.

    q ``[N, n, D]``; k, v ``[N, m, D]`` / ``[N, m, D_v]`` the key side, ``delta`` ``[N, m]`` its
    thresholds (objectives that take one): the span's own tokens (m = n), or with the Omega rule
    the ``c - 1`` tokens before it and then its own, mixed by ``mix`` ``[N, n, m]`` (None: each
    token its own gradient). ``A, Fth, e, E`` from ``_muon_products`` (e, E None without
    momentum). W0, S0: the running weights and momentum before the span (S0 None without
    momentum); Wg: the weights every gradient is taken at (None: W0, a span that opens a chunk).
    Returns ``(y [N, n, D_v], W_end, S_end)``.

    With ``G_i = sum_j mix[i, j] c_j u_j`` (``c_j`` the clip scale) the momentum is
    ``S_t = e_t S0 - sum_j (E mix diag(c))[t, j] u_j``: one product of the factored gradients
    ``dz_j h_j^T`` per layer. Then ``O_t = NS_k(S_t)`` and ``M_t = A_t W0 + sum_s Fth[t, s] O_s``
    (a ``[n, n]`` by ``[n, out in]`` product)."""
    Wg = W0 if Wg is None else Wg
    hs, _, dzs = key_gradients(Wg, k, v, act, residual, objective, delta)
    coef = mix  # [N, n, m]: the weight of u_j in token t's gradient G_t
    if max_norm is not None:
        scale = clip_scale(dzs, hs, max_norm)[0]  # (N, m)
        coef = torch.diag_embed(scale) if coef is None else coef * scale.unsqueeze(-2)
    if E is not None:  # momentum: the weight of u_j in S_t
        coef = E if coef is None else E @ coef
    r, W_end, S_end = q, [], None if S0 is None else []
    for l, (dz, h) in enumerate(zip(dzs, hs)):
        if coef is None:  # no momentum, window or clip: S_t = -u_t
            G = dz.unsqueeze(-1) * h.unsqueeze(-2)  # (N, n, out, in)
        else:
            G = (coef.unsqueeze(-1) * dz.unsqueeze(1)).transpose(-1, -2) @ h.unsqueeze(1)  # (N, n, out, in)
        S_all = -G if S0 is None else e[..., None, None] * S0[l].unsqueeze(1) - G
        O = newton_schulz(S_all, steps)
        M = (Fth @ O.flatten(2)).view(O.shape)  # sum_s Fth[t, s] O_s
        M = M + (W0[l].unsqueeze(1) if A is None else A[..., None, None] * W0[l].unsqueeze(1))
        z = (M @ r.unsqueeze(-1)).squeeze(-1)  # token t read with M_t: (N, n, out)
        r = act_fn(act, z) if l < len(dzs) - 1 else z
        # copies (when n > 1): a view of the last token would keep the span's per-token tensors
        # alive in the state
        W_end.append(M[:, -1].contiguous())
        if S0 is not None:
            S_end.append(S_all[:, -1].contiguous())
    return (r + q if residual else r), W_end, S_end


def _muon_spans(items, W, S, Wg, cfg, checkpointed: bool):
    """The spans of one chunk in order, from the running weights W and momentum S: ``items`` are
    ``(q, k, v, delta, gates, mix)`` of ``_muon_span``, ``cfg`` its ``(act, residual, max_norm,
    objective, steps)``, ``Wg`` the chunk's start weights or None (the first span opens the chunk:
    its start weights are W). ``checkpointed``: each span one checkpointed node. Returns
    ``([y of each span], W, S)``."""
    ys = []
    for q, k, v, delta, gates, mix in items:
        args = (q, k, v, delta, *gates, mix, W, S, Wg, *cfg)
        y, W_next, S_next = checkpoint(_muon_span, *args, use_reentrant=False) if checkpointed else _muon_span(*args)
        Wg = W if Wg is None else Wg  # the chunk's later spans take their gradients at its start weights
        W, S = W_next, S_next
        ys.append(y)
    return ys, W, S


class _MuonChunk(torch.autograd.Function):
    """The spans of one chunk (``_muon_spans``) as one node that keeps only its inputs: the
    forward runs without a graph; the backward runs the chunk again with one (each span
    checkpointed when there are several, so that only their start states and one span's per-token
    tensors are alive) and differentiates it. Training memory is then one state per chunk, however
    short its spans (``torch.utils.checkpoint`` around the chunk would keep every span's start
    state from the first forward on). ``layout``: ``(spans, layers, momentum, separate Wg)``."""

    @staticmethod
    def forward(ctx, cfg, layout, *flat):
        items, W, S, Wg = _muon_unflatten(layout, flat)
        ys, W, S = _muon_spans(items, W, S, Wg, cfg, checkpointed=False)
        ctx.cfg, ctx.layout = cfg, layout
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*flat)
        return (*ys, *W, *(S or ()))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            flat = [None if x is None else x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, needs)]
            items, W, S, Wg = _muon_unflatten(ctx.layout, flat)
            ys, W, S = _muon_spans(items, W, S, Wg, ctx.cfg, checkpointed=len(items) > 1)
            pairs = [(o, g) for o, g in zip((*ys, *W, *(S or ())), grads) if g is not None]
            wrt = [x for x in flat if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                       if pairs and wrt else [None] * len(wrt))  # fmt: skip
        return (None, None, *(next(got) if x is not None and x.requires_grad else None for x in flat))


def _muon_flatten(items, W, S, Wg) -> tuple[tuple, tuple]:
    """``(layout, flat tensors)`` of ``_muon_spans``' arguments, for ``_MuonChunk``."""
    flat = [x for q, k, v, delta, gates, mix in items for x in (q, k, v, delta, *gates, mix)]
    flat += [*W, *(S or ()), *(Wg or ())]
    return (len(items), len(W), S is not None, Wg is not None), tuple(flat)


def _muon_unflatten(layout, flat):
    """``_muon_flatten``'s inverse: ``(items, W, S, Wg)``."""
    n_items, L, has_mom, has_wg = layout
    items = [(*flat[9 * i : 9 * i + 4], tuple(flat[9 * i + 4 : 9 * i + 8]), flat[9 * i + 8]) for i in range(n_items)]
    rest = flat[9 * n_items :]
    W, S = tuple(rest[:L]), (tuple(rest[L : 2 * L]) if has_mom else None)
    return items, W, S, (tuple(rest[-L:]) if has_wg else None)


# The Muon path materialises a few [N, n, out, in] tensors per layer and span: spans are cut to at
# most this many floats of one such tensor (all layers and memories), so a wide memory (polynomial keys) runs in
# shorter spans instead of running out of memory. Their gradients stay at the chunk's start weights
# (a cut is a span entered mid-chunk), so the cut changes the cost, not the result.
_MUON_SPAN_FLOATS = 2**23


def _muon_block(N: int, shapes, chunk_size: int) -> int:
    """Tokens per Muon span: ``chunk_size``, or fewer so that ``N * block * sum(out * in)`` stays
    within ``_MUON_SPAN_FLOATS`` (at least one token)."""
    per_token = N * sum(o * i for o, i in shapes)
    return max(1, min(chunk_size, _MUON_SPAN_FLOATS // per_token))


_GROUP = 16  # fresh full chunks per compiled call in compiled inference (see _chunk_group_forward)


def _group_length(spans, i: int, chunk_size: int) -> int:
    """How many spans from i on are full chunks, up to ``_GROUP``, or 1 when fewer than that:
    a group is compiled for one length only, so shorter runs take the one-chunk path."""
    run = 0
    while run < _GROUP and i + run < len(spans) and spans[i + run][0] == chunk_size:
        run += 1
    return run if run == _GROUP else 1


def _divided(ws, s: Tensor):
    return tuple(w / s[:, None, None] for w in ws)


def _multiplied(ws, s: Tensor):
    return tuple(w * s[:, None, None] for w in ws)


def _fresh(tensors):
    return tuple(t.clone() for t in tensors)


def _chunk_group_forward(q, k, v, A, B, C, e_end, m, W0, S0, act, residual, max_norm=None, objective=L2, delta=None):
    """``_chunk_forward`` over g fresh chunks in a row (inputs with a chunk dim at 1: q
    ``[N, g, n, D]``, C ``[N, g, n, n]``, ...), each chunk's gradients at its own start weights.
    Only for compiled inference: traced as one graph, the g chunks cost one call's overhead
    instead of g; with small chunks and one stream, per-call overhead is most of the time.
    Returns ``(y [N, g, n, D], W_end, S_end)``."""
    pick = lambda x, j: None if x is None else x[:, j]  # noqa: E731
    W, S, ys = W0, S0, []
    for j in range(q.shape[1]):
        y, W, S = _chunk_forward(q[:, j], k[:, j], v[:, j], pick(A, j), pick(B, j), C[:, j], pick(e_end, j),
                                 pick(m, j), W, S, None, act, residual, max_norm,
                                 objective=objective, delta=pick(delta, j))  # fmt: skip
        ys.append(y)
    return torch.stack(ys, 1), W, S


class _ChunkFunction(torch.autograd.Function):
    """One chunk with a hand-derived backward.

    Saves the chunk-start state (produced by the previous chunk anyway), views of its inputs and
    a few intermediates (factored gradients, hidden-activation gradients, retrieval
    pre-activations and the narrowing layers' ``r W0^T``, ``r S0^T``: O(n (D + E)) per memory);
    activations, key-side pre-activations and the n x n scores are recomputed in the backward
    pass (one small product each), which keeps the training peak down."""

    @staticmethod
    def forward(ctx, cfg, q, k, v, delta, A, B, C, e_end, m, *states):
        L, has_mom, shared, act, residual, max_norm, compiled, objective = cfg
        W0, S0, Wg = _split_states(states, L, has_mom, shared)
        y, W_end, S_end, (dzs, dhs, zs, proj, err) = _maybe_compiled(_chunk_forward, compiled)(
            q, k, v, A, B, C, e_end, m, W0, S0, Wg, act, residual, max_norm, keep=True, objective=objective, delta=delta
        )
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, delta, err, A, B, C, e_end, m, *states, *dzs, *dhs, *zs, *proj)
        return (y, *W_end, *(S_end or ()))

    @staticmethod
    @once_differentiable  # double backward raises instead of being silently wrong: use "autograd"
    def backward(ctx, gy, *g_end):
        L, has_mom, shared, act, residual, max_norm, compiled, objective = ctx.cfg
        q, k, v, delta, err, A, B, C, e_end, m, *rest = ctx.saved_tensors
        n_states = L * (1 + has_mom + (not shared))
        states, rest = rest[:n_states], rest[n_states:]
        dzs, dhs, zs, proj = rest[:L], rest[L : 2 * L - 1], rest[2 * L - 1 : 3 * L - 2], rest[3 * L - 2 :]
        W0, S0, Wg = _split_states(states, L, has_mom, shared)
        gWe = g_end[:L]
        gSe = g_end[L:] if has_mom else (None,) * L
        return (None,) + _maybe_compiled(_chunk_backward, compiled)(
            gy, gWe, gSe, q, k, v, A, B, C, e_end, m, W0, S0, Wg, shared, act, residual, max_norm, dzs, dhs, zs, proj,
            objective, delta, err,
        )  # fmt: skip


_COMPILED: dict = {}


def _maybe_compiled(fn, compiled: bool):
    """``fn`` itself, or its ``torch.compile``d version (built once per function, on first use).

    Compiling fuses the many elementwise passes of a chunk into a few loops; the first call pays
    the compile time (tens of seconds on CPU), later calls with new chunk lengths recompile once
    with a dynamic length."""
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _split_states(states, L, has_mom, shared):
    W0 = states[:L]
    S0 = states[L : 2 * L] if has_mom else None
    Wg = None if shared else states[-L:]  # None: the chunk-start weights W0 (see _chunk_forward)
    return W0, S0, Wg


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-memory inner product of two ``[N, ...]`` tensors. (``vecdot``, not a batched GEMV
    ``[N, 1, K] @ [N, K, 1]``: for [16, 256 x 64] float32 that took 307 us against 50 us here.)"""
    return torch.linalg.vecdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``[N, n, d]`` x ``[N, n, d]`` -> ``[N, n]``: each token's inner product."""
    return (a * b).sum(-1)


def _chunk_backward(
    gy, gWe, gSe, q, k, v, A, B, C, e_end, m, W0, S0, Wg, shared, act, residual, max_norm, dzs, dhs, zs, proj,
    objective=L2, delta=None, err=None,
):
    """Reverse mode of ``_chunk_forward``; names as there, ``g*`` = gradient of the loss.

    Runs without autograd, so buffers created here are updated in place (``baddbmm_``,
    ``addcmul_``): no copies of ``[n, E]`` operands; the inputs and saved tensors are only read.
    Row scalings go on the narrower operand, as in the forward."""
    L = len(W0)
    mT = lambda x: x.transpose(-1, -2)  # noqa: E731
    # Low-precision products (see _chunk_forward): the products run on q.dtype copies; the
    # gradients of the state and of the gates are accumulated in their own (full) precision.
    lo = _caster(q.dtype)
    W0l, S0l = lo(W0), lo(S0)
    Wgl = W0l if shared else lo(Wg)
    # Key side again: zk_l = h_l Wg_l^T, h_{l+1} = act(zk_l), and act', act'' where needed.
    hs, dk1, dk2 = [lo(k)], [], []
    for l in range(L - 1):
        a, d1, d2 = activation_with_grads(act, hs[l] @ mT(Wgl[l]), second=True)
        hs.append(a), dk1.append(d1), dk2.append(d2)
    if max_norm is not None:  # the forward ran on the clipped C, m: so does everything below
        scale, sq = clip_scale(dzs, hs, max_norm)
        C_raw, m_raw = C, m
        C = C * scale.unsqueeze(-2)
        m = None if m is None else m * scale
    Al, Bl, Cl, ml = lo(A), lo(B), lo(C), lo(m)
    # Query side: r_{l+1} = act(z_l).
    rs, dr1 = [q], []
    for z in zs:
        a, d1, _ = activation_with_grads(act, z)
        rs.append(a), dr1.append(d1)

    gA = None if A is None else torch.zeros_like(A)
    gB = None if S0 is None else torch.zeros_like(B)
    gC = torch.zeros_like(C)
    negC = -Cl  # the retrieval subtracts (Q * C) dz: negate the n x n factor, not an [n, E] product
    gW0, gS0 = [None] * L, [None] * L
    gh, gdz = [None] * L, [None] * L

    # Retrieval: z_l = A * (r W0^T) + B * (r S0^T) - ((r h^T) * C) dz, through the layers.
    gz = gy if gy is not None else torch.zeros_like(q)
    for l in reversed(range(L)):
        r, h, dz = rs[l], hs[l], dzs[l]
        rW, rS = proj[2 * l], proj[2 * l + 1]
        if rW is None:  # a widening layer (or no gates): scale the narrow inputs r
            gr = gz @ W0l[l]  # (N, n, in); row t dotted with r_t is dL/dA_t
            if A is not None:
                gA += _rowdot(gr, r)
                gr.mul_(Al.unsqueeze(-1))
                gW0[l] = mT(gz) @ (Al.unsqueeze(-1) * r)
            else:
                gW0[l] = mT(gz) @ r
            if S0 is not None:
                P2 = gz @ S0l[l]
                gB += _rowdot(P2, r)
                gr.addcmul_(Bl.unsqueeze(-1), P2)
                gS0[l] = mT(gz) @ (Bl.unsqueeze(-1) * r)
        else:  # scale the narrow output gradient gz; dL/dA_t = gz_t . (r W0^T)_t (kept)
            gzA = gz
            if A is not None:
                gA += _rowdot(gz, rW)
                gzA = Al.unsqueeze(-1) * gz
            gr = gzA @ W0l[l]
            gW0[l] = mT(gzA) @ r
            if S0 is not None:
                gB += _rowdot(gz, rS)
                gzB = Bl.unsqueeze(-1) * gz
                _add_product(gr, gzB, S0l[l])
                gS0[l] = mT(gzB) @ r
        Q = r @ mT(h)  # the forward's n x n scores, recomputed
        gPn = gz @ mT(dz)  # (N, n, n) = -dL/d(Q * C)
        gdz[l] = mT(Q * negC) @ gz
        gC.addcmul_(gPn, Q, value=-1)
        gQ = gPn * negC  # = dL/dQ
        _add_product(gr, gQ, h)
        gh[l] = mT(gQ) @ r
        gz = gr.mul_(dr1[l - 1]) if l > 0 else gr
    gq = gz.add_(gy) if (residual and gy is not None) else gz
    # The state's gradients carry across chunks: from here on in the state's dtype.
    full = _caster(W0[0].dtype)
    gW0, gS0 = full(gW0), (full(gS0) if S0 is not None else gS0)

    # End state: W_end = A_n W0 + B_n S0 - dz^T (c h),  S_end = e_n S0 - dz^T (m h).
    c = Cl[:, -1, :]
    gc = torch.zeros_like(C[:, -1, :])
    ge_end = None if S0 is None else torch.zeros_like(e_end)
    gm = None if S0 is None else torch.zeros_like(m)
    for l in range(L):
        h, dz = hs[l], dzs[l]
        G = gWe[l]
        if G is not None:
            if A is not None:
                gA[:, -1] += _dot(G, W0[l])
                gW0[l].addcmul_(A[:, -1, None, None], G)
            else:
                gW0[l].add_(G)
            if S0 is not None:
                gB[:, -1] += _dot(G, S0[l])
                gS0[l].addcmul_(B[:, -1, None, None], G)
            _outer_backward(lo(G), dz, h, c, gc, gdz[l], gh[l])
        G = gSe[l]
        if G is not None:
            ge_end += _dot(G, S0[l])
            gS0[l].addcmul_(e_end[:, None, None], G)
            _outer_backward(lo(G), dz, h, ml, gm, gdz[l], gh[l])
    gC[:, -1, :] += gc
    if max_norm is not None:  # back through C = C_raw diag(scale), m = m_raw * scale
        gscale = _rowdot(mT(gC), mT(C_raw))  # (N, n): column sums of gC * C_raw
        gC.mul_(scale.unsqueeze(-2))
        if gm is not None:
            gscale += gm * m_raw
            gm.mul_(scale)
        _clip_backward(gscale, scale, sq, max_norm, dzs, hs, gdz, gh)

    # Per-token gradients: zk_l = h_l Wg_l^T, h_{l+1} = act(zk_l), dz_{L-1} = g(zk_{L-1} (+k) - v)
    # (g(e) = 2e for l2: see objectives.py),
    # dz_{l-1} = dh_l * act'(zk_{l-1}) with dh_l = dz_l Wg_l (kept). First back along the dz chain.
    gWg = [None] * L
    gzk = [None] * L
    for l in range(1, L):
        g = gdz[l - 1]
        gdh = g * dk1[l - 1]
        gzk[l - 1] = torch.mul(dhs[l - 1], g).mul_(dk2[l - 1])  # g * dh * act''
        _add_product(gdz[l], gdh, mT(Wgl[l]))
        gWg[l] = mT(dzs[l]) @ gdh
    gdelta = None
    if objective.name == "l2":
        gout = gdz[L - 1].mul_(2)
    else:  # the objective's own second derivative, in the error's (full) precision
        gout, gdelta = objective.grad_backward(err, delta, gdz[L - 1].to(err.dtype))
        gout = lo(gout)
    gv = -gout
    gzk[L - 1] = gout
    for l in reversed(range(L)):
        if gWg[l] is None:
            gWg[l] = mT(gzk[l]) @ hs[l]
        else:
            _add_product(gWg[l], mT(gzk[l]), hs[l])
        ghl = _add_product(gh[l], gzk[l], Wgl[l])
        if l > 0:
            gzk[l - 1].addcmul_(ghl, dk1[l - 1])
    gk = gh[0].add_(gout) if residual else gh[0]
    gk, gv = full(gk), full(gv)  # k and v came in the state's dtype

    if shared:
        g_states = tuple(a.add_(b) for a, b in zip(gW0, gWg)) + (tuple(gS0) if S0 is not None else ())
    else:
        g_states = tuple(gW0) + (tuple(gS0) if S0 is not None else ()) + tuple(full(gWg))
    return (gq, gk, gv, gdelta, gA, gB, gC, ge_end, gm) + g_states


def _clip_backward(gscale, scale, sq, max_norm, dzs, hs, gdz, gh) -> None:
    """Accumulate the gradients of ``clip_scale`` into gdz, gh in place. Where a token is clipped,
    scale = c sq^(-1/2), so d scale / d sq = -scale / (2 sq), and
    d sq / d dz(l) = 2 |h(l)|^2 dz(l), d sq / d h(l) = 2 |dz(l)|^2 h(l); elsewhere scale is 1."""
    clipped = sq > max_norm * max_norm
    gsq = torch.where(clipped, -gscale * scale / sq.clamp_min(max_norm * max_norm), torch.zeros_like(sq))
    for l, (dz, h) in enumerate(zip(dzs, hs)):  # gsq already carries the 2 of d sq / d(dz, h) over 2
        gdz[l].addcmul_((gsq * h.square().sum(-1)).unsqueeze(-1), dz)
        gh[l].addcmul_((gsq * dz.square().sum(-1)).unsqueeze(-1), h)


def _outer_backward(G: Tensor, dz: Tensor, h: Tensor, c: Tensor, gc: Tensor, gdz: Tensor, gh: Tensor) -> None:
    """Accumulate the gradients of ``- dz^T diag(c) h`` (an end-state term) given its gradient G
    ``[N, out, in]``: into gc ``[N, n]``, gdz ``[N, n, out]`` and gh ``[N, n, in]``, in place.
    The products run through the narrower of ``dz G`` (``[n, in]``) and ``h G^T`` (``[n, out]``)."""
    if h.shape[-1] <= dz.shape[-1]:
        _add_product(gdz, c.unsqueeze(-1) * h, G.transpose(-1, -2), alpha=-1)
        gch = dz @ G  # (N, n, in) = -dL/d(c h)
        gc -= _rowdot(gch, h)
        gh.addcmul_(c.unsqueeze(-1), gch, value=-1)
    else:
        P = h @ G.transpose(-1, -2)  # (N, n, out): dz_t . P_t = dz_t^T G h_t
        gc -= _rowdot(P, dz)
        gdz.addcmul_(c.unsqueeze(-1), P, value=-1)
        _add_product(gh, c.unsqueeze(-1) * dz, G, alpha=-1)


def _kl_plan(sizes: list[int], position: int, chunk_size: int, theta: Tensor, alpha: Tensor | None, log_a):
    """Memora's split of a call's spans (``sizes``, the first continuing a chunk at ``position``):
    every span that opens a chunk starts with its lag token, which takes the exact step; the kernel
    runs the span's other tokens. theta, alpha ``[N, T]`` (alpha None without forgetting), log_a
    the log of 1 - alpha. Returns the kernel's coefficients per span (None where it has no tokens)
    and an iterator over the lag tokens' ``(theta, alpha)``, ``[N, 1, 1]`` each. Gates are gathered
    once, not sliced per chunk (a slice's backward zero-fills a full-length gradient each time)."""
    opens, starts, p, T = [], [], position, 0
    for n in sizes:
        opens.append(p == 0)
        starts.append(T)
        p, T = (p + n) % chunk_size, T + n
    lags = [t0 for t0, o in zip(starts, opens) if o]
    lag_set = set(lags)
    rest = torch.tensor([t for t in range(T) if t not in lag_set], dtype=torch.long, device=theta.device)
    runs = [n - o for n, o in zip(sizes, opens)]
    pick = lambda x: None if x is None else x.index_select(1, rest)  # noqa: E731
    coefs = iter(_chunk_coefficients([r for r in runs if r], pick(theta), pick(log_a), None))
    coefficients = [next(coefs) if r else None for r in runs]
    at = torch.tensor(lags, dtype=torch.long, device=theta.device)
    N = theta.shape[0]
    th = theta.index_select(1, at).reshape(N, -1, 1, 1).unbind(1)
    al = [None] * len(lags) if alpha is None else alpha.index_select(1, at).reshape(N, -1, 1, 1).unbind(1)
    return coefficients, iter(zip(th, al))


def check_product_dtype(product_dtype: torch.dtype | None, compute: torch.dtype) -> torch.dtype:
    """The dtype of the chunk's products: ``compute`` (the state's dtype) unless bfloat16 is asked
    for, with a float32 state."""
    if product_dtype is None or product_dtype == compute:
        return compute
    if product_dtype != torch.bfloat16:
        raise ValueError(
            f"product_dtype must be None or torch.bfloat16, got {product_dtype!r} (float16's range overflows "
            f"on the squared gradient norms and large inner gradients)"
        )
    if compute != torch.float32:
        raise ValueError(
            f"product_dtype={product_dtype} needs float32 (or 16-bit) inputs: with {compute} inputs the "
            f"memory computes in {compute} throughout (the reference precision)"
        )
    return product_dtype


def chunk_memory(
    *,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor | None = None,
    alpha: Tensor | None = None,
    weights: Sequence[Tensor] | None = None,
    state: MemoryState | None = None,
    chunk_size: int = 64,
    activation: str = "silu",
    residual: bool = False,
    max_grad_norm: float | None = None,
    backward: str = "analytic",
    compile: bool = False,
    product_dtype: torch.dtype | None = None,
    objective: Objective | str | None = None,
    delta: Tensor | None = None,
    retention_q: float | None = None,
    gamma: Tensor | None = None,
    retention_kl: float | None = None,
    muon_steps: int | None = None,
) -> tuple[Tensor, MemoryState]:
    """Chunk-parallel neural memory; same signature and results as ``naive_memory``.

    ``backward``: "analytic" (default: hand-derived, first-order; one state and a few small
    intermediates per chunk in memory) or "autograd" (autograd through the same forward: the
    reference for tests, and the mode for second derivatives; keeps every intermediate).
    ``compile``: run each chunk's forward and analytic backward through ``torch.compile``
    (opt-in: faster steps after a one-off compile of tens of seconds on CPU).
    ``product_dtype``: ``torch.bfloat16`` runs the chunk's matrix products in bf16 (each product's
    inputs and output rounded to bf16) while the recurrent state (weights, momentum, their
    gradients and the gates' decays), the key side's forward and its error ``M(k) - v`` stay
    float32: faster only where the hardware multiplies bf16 natively (docs/speed.md; on a CPU its
    bf16 elementwise work is slower than float32's, a GPU gains more), outputs and per-chunk
    updates within ~1e-2 of the float64 loop (tests/test_memory_product_dtype.py). None
    (default): float32 throughout.
    ``muon_steps = k``: ATLAS's Muon (``naive_memory``), each chunk exact with respect to the token
    loop (``_muon_span``); "analytic" then means autograd through one chunk at a time, run again in
    the backward (``_MuonChunk``; no hand-derived backward: the training memory is one state per
    chunk plus one chunk's per-token tensors), "autograd" keeps every chunk's. ``compile`` leaves
    its chunks eager, and ``product_dtype`` must be None.
    """
    objective = as_objective(objective)
    check_inputs(q, k, v, theta, eta, alpha, weights, state, chunk_size, activation, max_grad_norm=max_grad_norm,
                 objective=objective, delta=delta, retention_q=retention_q, gamma=gamma, residual=residual,
                 retention_kl=retention_kl, muon_steps=muon_steps)  # fmt: skip
    return chunk_memory_unchecked(
        q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, weights=weights, state=state,
        chunk_size=chunk_size, activation=activation, residual=residual, max_grad_norm=max_grad_norm,
        backward=backward, compile=compile, product_dtype=product_dtype, objective=objective, delta=delta,
        retention_q=retention_q, gamma=gamma, retention_kl=retention_kl, muon_steps=muon_steps,
    )  # fmt: skip


@full_precision
def chunk_memory_unchecked(
    *,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor | None = None,
    alpha: Tensor | None = None,
    weights: Sequence[Tensor] | None = None,
    state: MemoryState | None = None,
    chunk_size: int = 64,
    activation: str = "silu",
    residual: bool = False,
    max_grad_norm: float | None = None,
    backward: str = "analytic",
    compile: bool = False,
    product_dtype: torch.dtype | None = None,
    objective: Objective | str | None = None,
    delta: Tensor | None = None,
    retention_q: float | None = None,
    gamma: Tensor | None = None,
    retention_kl: float | None = None,
    muon_steps: int | None = None,
) -> tuple[Tensor, MemoryState]:
    """``chunk_memory`` without ``check_inputs``, for callers that build q, k, v and the gates
    themselves from an input they validated once and then call the op many times (MAC, once
    per segment): the checks' finiteness pass and host sync would run on every call."""
    if backward not in ("analytic", "autograd"):
        raise ValueError(f"backward must be 'analytic' or 'autograd', got {backward!r}")
    if compile and backward != "analytic":
        raise ValueError("compile=True needs backward='analytic' (the autograd mode is the plain reference)")
    objective = as_objective(objective)
    dtype = q.dtype
    cd = compute_dtype(dtype)
    pd = check_product_dtype(product_dtype, cd)
    if muon_steps is not None and pd != cd:
        raise ValueError(f"product_dtype={product_dtype} does not apply to muon_steps (ATLAS's Muon): its spans "
                         f"compute in {cd}; pass product_dtype=None")  # fmt: skip
    B, T, H, D = q.shape
    N = B * H
    if state is None:
        state = initial_memory_state(weights, B, momentum=eta is not None, dtype=cd, retention_kl=retention_kl,
                                     muon_steps=muon_steps)
    L = state.depth
    has_mom = eta is not None

    def flat(x: Tensor, to: torch.dtype = cd) -> Tensor:  # (B, T, H, ...) -> (B*H, T, ...)
        return x.to(to).transpose(1, 2).reshape(N, T, *x.shape[3:])

    def flat_w(w: Tensor) -> Tensor:  # (B, H, o, i) -> (B*H, o, i)
        return w.to(cd).reshape(N, *w.shape[2:])

    qf, kf, vf, thf = flat(q, pd), flat(k), flat(v), flat(theta)  # k, v: see _chunk_forward
    delta_f = None if delta is None else flat(delta)  # (N, T)
    # The Omega rule: a chunk's key side also holds the c - 1 tokens before it, whose gradients are
    # taken at this chunk's start weights too, and C becomes C @ Gamma (README, "The Omega rule").
    c = 1 if gamma is None else gamma.shape[-1]
    if gamma is not None:
        gamma_f = flat(gamma)  # (N, T, c)
        kk, vv, dd, valid = window_tokens(state.window, c, kf, vf, delta_f)  # (N, c - 1 + T, ...)
    log_a = None if alpha is None else log_gate(1 - flat(alpha))
    log_eta = None if eta is None else log_gate(flat(eta))
    W = tuple(flat_w(w) for w in state.weights)
    Wg = tuple(flat_w(w) for w in state.chunk_weights)
    S = None
    if has_mom:
        S = tuple(flat_w(s) for s in state.momentum) if state.momentum is not None else tuple(
            torch.zeros_like(w) for w in W
        )

    # Cut [0, T) into chunk spans; the first one completes the state's pending chunk. Muon's spans
    # may be shorter (see _MUON_SPAN_FLOATS).
    block = T if muon_steps is None else _muon_block(N, [w.shape[-2:] for w in state.weights], chunk_size)
    sizes, t, pos = [], 0, state.position
    while t < T:
        sizes.append(min(chunk_size - pos, T - t, block))
        t += sizes[-1]
        pos = (pos + sizes[-1]) % chunk_size

    # split (not slicing in the loop): one backward node gathers every chunk's gradient at once.
    def split(x: Tensor | None) -> Sequence[Tensor | None]:
        return [None] * len(sizes) if x is None else x.split(sizes, dim=1)

    use_fn = backward == "analytic" and torch.is_grad_enabled()
    # Groups of fresh chunks run as one compiled call in inference; Moneta's retention renormalises
    # between chunks and Memora's steps exactly at each chunk's first token, so they run chunk by chunk.
    grouping = compile and not torch.is_grad_enabled() and retention_q is None and gamma is None
    grouping = grouping and retention_kl is None and muon_steps is None
    group_forward = _maybe_compiled(_chunk_group_forward, True) if grouping else None
    ys, pos = [], state.position
    if retention_kl is None:
        products = _decay_products if muon_steps is None else _muon_products
        coefficients = _chunk_coefficients(sizes, thf, log_a, log_eta, products)
    else:  # the kernel runs each chunk's tokens after its lag token (its first): their gates alone
        alpha_f = None if alpha is None else flat(alpha)
        coefficients, lag_gates = _kl_plan(sizes, state.position, chunk_size, thf, alpha_f, log_a)
        Z = tuple(flat_w(z) for z in state.log_weights)
    spans = list(zip(sizes, split(qf), split(kf), split(vf), coefficients, split(delta_f)))
    if gamma is not None:  # keys per span: the c - 1 tokens before it, then its own
        starts = list(itertools.accumulate([0, *sizes[:-1]]))
        k_spans, v_spans = _window_spans(kk, kf, sizes, starts, c), _window_spans(vv, vf, sizes, starts, c)
        d_spans = _window_spans(dd, delta_f, sizes, starts, c)

    def kernel(q_c, k_c, v_c, d_c, gates, W, S, Wg, fresh):
        """One span through ``_chunk_forward`` (its analytic backward when training)."""
        if use_fn:
            states = W + (S if has_mom else ()) + (() if fresh else Wg)
            cfg = (L, has_mom, fresh, activation, residual, max_grad_norm, compile, objective)
            out = _ChunkFunction.apply(cfg, q_c, k_c, v_c, d_c, *gates, *states)
            return out[0], tuple(out[1 : 1 + L]), (tuple(out[1 + L :]) if has_mom else None)
        forward = _maybe_compiled(_chunk_forward, compile and not torch.is_grad_enabled())
        y, W, S = forward(q_c, k_c, v_c, *gates, W, S, None if fresh else Wg, activation, residual, max_grad_norm,
                          objective=objective, delta=d_c)  # fmt: skip
        return y, tuple(W), (tuple(S) if has_mom else None)

    if muon_steps is not None:  # ATLAS's Muon (README, "Muon: the ATLAS inner optimiser"), chunk by chunk
        cfg = (activation, residual, max_grad_norm, objective, muon_steps)
        i = 0
        while i < len(spans):
            items, fresh = [], pos == 0
            while i < len(spans) and (not items or pos != 0):  # the spans up to the chunk's end
                n, q_c, k_c, v_c, gates, d_c = spans[i]
                mix = None
                if gamma is not None:
                    k_c, v_c, d_c = k_spans[i], v_spans[i], d_spans[i]
                    mix = window_weights(gamma_f, valid, starts[i], n).to(thf.dtype)  # (N, n, c - 1 + n)
                items.append((q_c, k_c, v_c, d_c, gates, mix))
                pos, i = (pos + n) % chunk_size, i + 1
            if fresh:
                Wg = W
            if use_fn:  # training: one node per chunk that recomputes it in the backward
                layout, flat = _muon_flatten(items, W, S, None if fresh else Wg)
                out = _MuonChunk.apply(cfg, layout, *flat)
                y, W, S = out[: len(items)], out[len(items) : len(items) + L], out[len(items) + L :] or None
            else:
                y, W, S = _muon_spans(items, W, S, None if fresh else Wg, cfg, checkpointed=False)
            ys.extend(y)
            W, S = tuple(W), (tuple(S) if has_mom else None)
        y = torch.cat(ys, dim=1).reshape(B, H, T, vf.shape[-1]).transpose(1, 2).to(dtype)
        window = next_window(kk, vv, dd, valid, c) if gamma is not None else None
        return y, state_from_flat(B, H, W, S, Wg, pos, window, muon_steps=muon_steps)

    i = 0
    while i < len(spans):
        n, q_c, k_c, v_c, gates, d_c = spans[i]
        if gamma is not None:
            k_c, v_c, d_c = k_spans[i], v_spans[i], d_spans[i]
            mix = window_weights(gamma_f, valid, starts[i], n).to(thf.dtype)  # (N, n, c - 1 + n)
            A_c, B_c, C_c, e_c, m_c = gates
            gates = (A_c, B_c, C_c @ mix, e_c, None if m_c is None else (m_c.unsqueeze(-2) @ mix).squeeze(-2))
        fresh = pos == 0
        if fresh:
            Wg = W
        g = _group_length(spans, i, chunk_size) if group_forward is not None and fresh else 1
        if g > 1:  # g fresh full chunks in one compiled call (inference only)
            group = spans[i : i + g]
            qkv = [torch.stack(x, 1) for x in zip(*(span[1:4] for span in group))]  # (N, g, n, D)
            coefs = [None if c[0] is None else torch.stack(c, 1) for c in zip(*(span[4] for span in group))]
            d_g = None if delta_f is None else torch.stack([span[5] for span in group], 1)  # (N, g, n)
            # Fresh copies: under inference_mode the state a previous call returned and the
            # weights a first call starts from differ in dispatch keys, which recompiles the graph.
            W_in, S_in = _fresh(W), (_fresh(S) if has_mom else None)
            y, W, S = group_forward(*qkv, *coefs, W_in, S_in, activation, residual, max_grad_norm, objective, d_g)
            ys.extend(y.unbind(1))
            W, S = tuple(W), (tuple(S) if has_mom else None)
            i += g  # whole chunks: pos stays 0, the next span is fresh
            continue
        if retention_kl is not None:  # Memora (README, "Memora: KL retention")
            if fresh:  # the lag token: the exact step from the chunk-start weights c softmax(Z)
                (q1, q_c), (k1, k_c), (v1, v_c) = (x.split([1, n - 1], 1) for x in (q_c, k_c, v_c))
                d1, d_c = (None, None) if d_c is None else d_c.split([1, n - 1], 1)
                th1, a1 = next(lag_gates)
                y1, W, Wg, Z = kl_step_flat(W, W, Z, q1.to(cd), k1, v1, th1, a1, activation, residual, max_grad_norm,
                                            objective, d1, retention_kl, lag=True, end=chunk_size == 1)  # fmt: skip
                ys.append(y1.to(qf.dtype))
            if gates is not None:  # the rest of the chunk: the kernel, linear in W from the lag token's weights
                W0, Z0 = W, Z
                y, W, _ = kernel(q_c, k_c, v_c, d_c, gates, W, None, Wg, fresh)
                ys.append(y)
                # The log-weights take the same gradient sum G: W_end = A W0 - G, so Z_end = A Z0 - G.
                A_end = None if gates[0] is None else gates[0][:, -1, None, None]
                Z = tuple(w + (z - w0 if A_end is None else A_end * (z - w0)) for w, z, w0 in zip(W, Z0, W0))
                if (pos + n) % chunk_size == 0:  # the chunk's end: back on the simplex
                    Z, W = kl_simplex(Z, retention_kl)
            pos = (pos + n) % chunk_size
            i += 1
            continue
        if retention_q is not None:  # the kernel is linear in the accumulators: scale in, scale back out
            s = lq_scale(W if fresh else Wg, retention_q)  # (N,): the chunk-start accumulator's scale
            A_c, B_c, C_c, e_c, m_c = gates
            gates = (A_c, B_c, C_c / s[:, None, None], e_c, None if m_c is None else m_c / s[:, None])
            start = Wg  # the chunk-start accumulator (the running one at a fresh chunk)
            W, Wg = _divided(W, s), _divided(Wg, s)
            S = _divided(S, s) if has_mom else None
        y, W, S = kernel(q_c, k_c, v_c, d_c, gates, W, S, Wg, fresh)
        if retention_q is not None:
            W, S, Wg = _multiplied(W, s), (_multiplied(S, s) if has_mom else None), start
        ys.append(y)
        pos = (pos + n) % chunk_size
        i += 1

    y = torch.cat(ys, dim=1).reshape(B, H, T, vf.shape[-1]).transpose(1, 2).to(dtype)

    window = next_window(kk, vv, dd, valid, c) if gamma is not None else None
    final = state_from_flat(B, H, W, S, Wg, pos, window, log_weights=Z if retention_kl is not None else None)
    return y, final
