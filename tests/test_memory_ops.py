"""The chunk-parallel form and the one-token step against the token-loop reference (docs/design.md,
§1 and §6), in float64 for exactness and float32 for tolerance."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from _helpers import (
    check_analytic_backward_equals_autograd,
    check_chunk_equals_naive,
    make_inputs,
    probe_loss,
    rel_rms,
    state_tensors,
    step_tokens,
)

from titans.ops.memory import chunk_memory, naive_memory, step_memory

FLAGS = list(itertools.product([True, False], repeat=3))  # momentum, forgetting, residual


def _assert_close(a, b, tol, what):
    err = rel_rms(a, b)
    assert err < tol, f"{what}: relative RMS {err:.3e} >= {tol:.0e}"


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
@pytest.mark.parametrize("T", [37, 100])
def test_chunk_equals_naive_float64(depth, chunk_size, T):
    """Outputs, final state and every gradient, for every momentum/forgetting/residual setting."""
    for momentum, forgetting, residual in FLAGS:
        kw, leaves = make_inputs(
            T=T, depth=depth, momentum=momentum, forgetting=forgetting, requires_grad=True,
            seed=depth * 100 + chunk_size + T,
        )  # fmt: skip
        what = f"depth={depth} b={chunk_size} T={T} mom={momentum} forget={forgetting} res={residual}"
        s, s_ref = check_chunk_equals_naive(kw, leaves, dict(chunk_size=chunk_size, residual=residual), what)
        assert s.position == s_ref.position == T % chunk_size
        assert (s.momentum is None) == (not momentum)


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_analytic_backward_equals_autograd(activation, depth):
    """The hand-derived backward against autograd through the same chunk forward, with the state
    entered mid-chunk (gradient weights != running weights) and gradients of the final state."""
    for momentum, forgetting, residual in FLAGS:
        kw, leaves = make_inputs(T=29, depth=depth, momentum=momentum, forgetting=forgetting, requires_grad=True, seed=depth)
        opts = dict(chunk_size=8, activation=activation, residual=residual)
        check_analytic_backward_equals_autograd(kw, leaves, opts, f"act={activation} mom={momentum} "
                                                f"forget={forgetting} res={residual}")  # fmt: skip


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_float32_within_tolerance(depth, chunk_size):
    """float32 chunk path against the float64 reference: ~1e-4 relative (docs/design.md §6)."""
    kw64, _ = make_inputs(B=2, T=200, H=2, D=16, depth=depth, seed=7)
    kw32 = {k: (v.float() if torch.is_tensor(v) else [w.float() for w in v]) for k, v in kw64.items()}
    y_ref, s_ref = naive_memory(**kw64, chunk_size=chunk_size)
    y, s = chunk_memory(**kw32, chunk_size=chunk_size)
    assert y.dtype == torch.float32
    _assert_close(y, y_ref, 1e-4, "float32 output")
    for a, b in zip(state_tensors(s), state_tensors(s_ref)):
        _assert_close(a, b, 1e-4, "float32 state")


def test_gradcheck_small_float64():
    """docs/design.md §6: gradients through the parallel form are the true derivatives."""
    for depth, residual in [(1, False), (2, True)]:
        kw, leaves = make_inputs(B=1, T=5, H=1, D=3, depth=depth, expansion=1.0, requires_grad=True, seed=depth)
        names = ["q", "k", "v", "theta", "eta", "alpha"]

        def fn(*xs):
            args = dict(zip(names, xs[:6]), weights=list(xs[6:]))
            y, s = chunk_memory(**args, chunk_size=3, residual=residual)
            return (y,) + tuple(s.weights) + tuple(s.momentum)

        assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Chunk size 1 is the pure online rule: gradient at M_{t-1}, no mini-batching at all.
# ---------------------------------------------------------------------------------------------


def _online_rule(q, k, v, theta, eta, alpha, weights, activation="silu"):
    """Independent loop of eq. 13/14: u_t at M_{t-1} via autograd, batch and heads unrolled."""
    B, T, H, D = q.shape
    y = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            M = [w[h].clone() for w in weights]
            S = [torch.zeros_like(m) for m in M]
            for t in range(T):
                Mg = [m.detach().requires_grad_(True) for m in M]
                x = k[b, t, h]
                for i, m in enumerate(Mg):
                    x = m @ x
                    if i < len(Mg) - 1:
                        x = torch.nn.functional.silu(x)
                grads = torch.autograd.grad((x - v[b, t, h]).pow(2).sum(), Mg)
                S = [eta[b, t, h] * s - theta[b, t, h] * g for s, g in zip(S, grads)]
                M = [(1 - alpha[b, t, h]) * m + s for m, s in zip(M, S)]
                r = q[b, t, h]
                for i, m in enumerate(M):
                    r = m @ r
                    if i < len(M) - 1:
                        r = torch.nn.functional.silu(r)
                y[b, t, h] = r
    return y


@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_size_one_is_online_rule(depth):
    kw, _ = make_inputs(B=2, T=20, H=2, D=4, depth=depth, seed=11)
    with torch.no_grad():
        y = chunk_memory(**kw, chunk_size=1)[0]
    y_ref = _online_rule(**{k: kw[k] for k in ("q", "k", "v", "theta", "eta", "alpha", "weights")})
    _assert_close(y, y_ref, 1e-12, "chunk_size=1 vs online rule")


def test_larger_chunks_differ_from_online_rule():
    """The mini-batch rule really takes gradients at the chunk start (a test that can fail)."""
    kw, _ = make_inputs(T=20, seed=3)
    with torch.no_grad():
        a = chunk_memory(**kw, chunk_size=1)[0]
        b = chunk_memory(**kw, chunk_size=8)[0]
    assert rel_rms(b, a) > 1e-3


# ---------------------------------------------------------------------------------------------
# Streaming: any split of a sequence into calls gives one call's outputs and final state.
# ---------------------------------------------------------------------------------------------


def _random_splits(T, rng, n_cuts):
    cuts = sorted(rng.sample(range(1, T), n_cuts))
    return list(zip([0] + cuts, cuts + [T]))


@pytest.mark.parametrize("chunk_size", [1, 5, 16])
@pytest.mark.parametrize("depth", [1, 2])
def test_streaming_random_splits(chunk_size, depth):
    kw, _ = make_inputs(T=61, depth=depth, seed=chunk_size + depth)
    rng = random.Random(chunk_size * 10 + depth)
    with torch.no_grad():
        y_full, s_full = chunk_memory(**kw, chunk_size=chunk_size)
        for trial in range(4):
            pieces = _random_splits(61, rng, n_cuts=rng.randint(1, 12))
            ys, state = [], None
            for a, b in pieces:
                part = {k: (kw[k][:, a:b] if kw[k] is not None else None) for k in ("q", "k", "v", "theta", "eta", "alpha")}
                start = dict(weights=kw["weights"]) if state is None else dict(state=state)
                # One-token pieces go through the decoding step, the rest through the chunk path.
                fn = step_memory if b - a == 1 else chunk_memory
                y, state = fn(**part, **start, chunk_size=chunk_size)
                ys.append(y)
            _assert_close(torch.cat(ys, 1), y_full, 1e-12, f"split {pieces}")
            assert state.position == s_full.position
            for u, w in zip(state_tensors(state), state_tensors(s_full)):
                _assert_close(u, w, 1e-12, "final state after splits")


def test_one_token_at_a_time_equals_one_call():
    kw, _ = make_inputs(T=40, depth=3, seed=5)
    with torch.no_grad():
        y_full, s_full = chunk_memory(**kw, chunk_size=7, residual=True)
        y, state = step_tokens(kw, chunk_size=7, residual=True)
    _assert_close(y, y_full, 1e-12, "token-by-token step")
    for u, w in zip(state_tensors(state), state_tensors(s_full)):
        _assert_close(u, w, 1e-12, "state after token-by-token step")


def test_streaming_keeps_gradients():
    """Two calls with the state carried (no detach) backpropagate like one call."""
    kw, leaves = make_inputs(T=30, requires_grad=True, seed=9)
    y_full, _ = chunk_memory(**kw, chunk_size=4)
    g_full = torch.autograd.grad(probe_loss(y_full), leaves)
    part = lambda a, b: {k: kw[k][:, a:b] for k in ("q", "k", "v", "theta", "eta", "alpha")}  # noqa: E731
    y1, s = chunk_memory(**part(0, 13), weights=kw["weights"], chunk_size=4)
    y2, _ = chunk_memory(**part(13, 30), state=s, chunk_size=4)
    g = torch.autograd.grad(probe_loss(torch.cat([y1, y2], 1)), leaves)
    for a, b in zip(g, g_full):
        _assert_close(a, b, 1e-12, "gradient through a carried state")


def test_state_size_is_constant():
    """docs/design.md §6: the state does not grow with the tokens seen."""
    sizes = []
    for T in (10, 1000):
        kw, _ = make_inputs(T=T, seed=1)
        with torch.no_grad():
            sizes.append(chunk_memory(**kw, chunk_size=16)[1].num_bytes())
    assert sizes[0] == sizes[1]


# ---------------------------------------------------------------------------------------------
# Causality and batch isolation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [chunk_memory, naive_memory])
def test_causal_inside_and_across_chunks(fn):
    kw, _ = make_inputs(T=40, seed=2)
    with torch.no_grad():
        y = fn(**kw, chunk_size=16)[0]
        for t in (0, 5, 15, 16, 23, 38):  # chunk starts, middles and ends
            pert = dict(kw)
            for name in ("q", "k", "v", "theta", "eta", "alpha"):
                x = kw[name].clone()
                x[:, t + 1 :] = x[:, t + 1 :].flip(1) * 0.5 + 0.1
                pert[name] = x.clamp(0, 1) if name in ("eta", "alpha") else x
            y2 = fn(**pert, chunk_size=16)[0]
            assert torch.equal(y[:, : t + 1], y2[:, : t + 1]), f"output at <= {t} saw the future"
            assert not torch.equal(y[:, t + 1 :], y2[:, t + 1 :])


def test_batch_isolation():
    kw, leaves = make_inputs(B=3, T=33, seed=4, requires_grad=True, batched_weights=True)
    y, s = chunk_memory(**kw, chunk_size=8)
    # d y[0] / d inputs[1:] is zero, exactly.
    grads = torch.autograd.grad(probe_loss(y[0]), leaves)
    for g in grads:
        assert g[1:].abs().max() == 0
    # Changing another sequence changes nothing in this one.
    kw2 = {k: (v.detach().clone() if torch.is_tensor(v) else [w.detach().clone() for w in v]) for k, v in kw.items()}
    kw2["v"][2] += 1.0
    kw2["weights"][0][2] += 0.5
    with torch.no_grad():
        y2, s2 = chunk_memory(**kw2, chunk_size=8)
    assert torch.equal(y[:2].detach(), y2[:2])
    assert torch.equal(s.weights[0][:2].detach(), s2.weights[0][:2])


# ---------------------------------------------------------------------------------------------
# Gates at the edges of their ranges.
# ---------------------------------------------------------------------------------------------


def test_gates_at_zero_and_one_stay_finite_and_exact():
    kw, leaves = make_inputs(T=24, seed=6, requires_grad=False)
    kw["alpha"] = kw["alpha"].clone()
    kw["eta"] = kw["eta"].clone()
    kw["alpha"][:, 5] = 1.0  # full forgetting at t = 5
    kw["alpha"][:, 6:9] = 0.0  # none at 6..8
    kw["eta"][:, 10] = 0.0  # momentum cleared
    kw["eta"][:, 11:13] = 1.0  # momentum fully kept
    for t in [kw["q"], kw["k"], kw["v"], kw["theta"], kw["eta"], kw["alpha"], *kw["weights"]]:
        t.requires_grad_(True)
    y_ref, _ = naive_memory(**kw, chunk_size=8)
    y, s = chunk_memory(**kw, chunk_size=8)
    _assert_close(y, y_ref, 1e-10, "gates at 0/1")
    grads = torch.autograd.grad(probe_loss(y), [kw["q"], kw["k"], kw["v"], kw["theta"], *kw["weights"]])
    assert all(torch.isfinite(g).all() for g in grads)
    # With alpha = 1 (and no write, theta = 0) at t = 5 nothing from before survives when there is
    # no momentum to carry it: M_5 = 0, so changing v[:, :5] or M_0 leaves y[:, 5:] alone.
    kw_nm = {k: (v.detach().clone() if torch.is_tensor(v) else [w.detach() for w in v]) for k, v in kw.items()}
    kw_nm["eta"] = None
    kw_nm["theta"][:, 5] = 0.0
    with torch.no_grad():
        y1 = chunk_memory(**kw_nm, chunk_size=1)[0]
        kw_nm["v"] = kw_nm["v"].clone()
        kw_nm["v"][:, :5] += 3.0
        kw_nm["weights"] = [w * 2 for w in kw_nm["weights"]]
        y2 = chunk_memory(**kw_nm, chunk_size=1)[0]
    assert y1[:, 5].abs().max() == 0
    assert torch.equal(y2[:, 5:], y1[:, 5:])
    assert not torch.equal(y2[:, :5], y1[:, :5])


def test_half_precision_inputs_run_in_float32():
    kw, _ = make_inputs(T=50, D=8, dtype=torch.float32, seed=8)
    kw16 = {k: (v.bfloat16() if torch.is_tensor(v) else [w.bfloat16() for w in v]) for k, v in kw.items()}
    with torch.no_grad():
        y16, s16 = chunk_memory(**kw16, chunk_size=16)
        y32, _ = chunk_memory(**{k: (v.bfloat16().float() if torch.is_tensor(v) else [w.bfloat16().float() for w in v]) for k, v in kw.items()}, chunk_size=16)
    assert y16.dtype == torch.bfloat16
    assert s16.weights[0].dtype == torch.float32
    _assert_close(y16, y32, 1e-2, "bfloat16 inputs")


def test_double_backward_needs_autograd_mode():
    """Second derivatives through the analytic backward raise; backward='autograd' gives them."""
    kw, leaves = make_inputs(T=12, requires_grad=True, seed=12)
    y, _ = chunk_memory(**kw, chunk_size=4)
    (g,) = torch.autograd.grad(probe_loss(y), [kw["v"]], create_graph=True)
    with pytest.raises(RuntimeError, match="twice|double|once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), [kw["q"]])
    y_a, _ = chunk_memory(**kw, chunk_size=4, backward="autograd")
    y_n, _ = naive_memory(**kw, chunk_size=4)
    (g_a,) = torch.autograd.grad(probe_loss(y_a), [kw["v"]], create_graph=True)
    (g_n,) = torch.autograd.grad(probe_loss(y_n), [kw["v"]], create_graph=True)
    (h_a,) = torch.autograd.grad(g_a.pow(2).sum(), [kw["q"]])
    (h_n,) = torch.autograd.grad(g_n.pow(2).sum(), [kw["q"]])
    _assert_close(h_a, h_n, 1e-9, "second derivative (autograd mode vs token loop)")


def test_batched_chunk_coefficients_match_per_chunk():
    """The gate coefficients of all chunk spans computed in batched runs equal the per-span
    ``_decay_products`` (irregular first and last spans included), and ``_decay_grid`` matches its
    definition."""
    from titans.ops.memory.chunk import _chunk_coefficients, _decay_grid, _decay_products

    g = torch.Generator().manual_seed(0)
    N, sizes = 3, [5, 8, 8, 8, 3]
    T = sum(sizes)
    theta = torch.rand(N, T, dtype=torch.float64, generator=g)
    log_a = torch.log(1 - 0.3 * torch.rand(N, T, dtype=torch.float64, generator=g))
    log_eta = torch.log(torch.rand(N, T, dtype=torch.float64, generator=g))
    for la, le in [(log_a, log_eta), (None, log_eta), (log_a, None), (None, None)]:
        got = _chunk_coefficients(sizes, theta, la, le)
        assert len(got) == len(sizes)
        t = 0
        for n, coefs in zip(sizes, got):
            span = slice(t, t + n)
            ref = _decay_products(theta[:, span], None if la is None else la[:, span], None if le is None else le[:, span])
            for a, b in zip(coefs, ref):
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.allclose(a, b, rtol=1e-14, atol=0)
            t += n
    x = log_eta[:, :8].clone().requires_grad_(True)
    grid = _decay_grid(x)
    for ti in range(8):
        for s in range(8):
            want = x[:, s + 1 : ti + 1].sum(-1).exp() if ti >= s else torch.zeros(N, dtype=x.dtype)
            assert torch.allclose(grid[:, ti, s], want, rtol=1e-14, atol=1e-15)
    # above the diagonal nothing flows back: a weight there must not reach any gate
    upper = torch.ones(8, 8, dtype=x.dtype).triu(1)
    (grad,) = torch.autograd.grad((grid * upper).sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_mlp_read_backward_matches_autograd():
    """``mlp_read`` (one node that keeps only its input and weights, recomputing activations in
    the backward) gives ``mlp_forward``'s values and gradients for every activation and depth."""
    from titans.ops.memory.mlp import mlp_forward, mlp_read

    g = torch.Generator().manual_seed(0)
    for act, depth, residual in itertools.product(("silu", "gelu", "relu"), (1, 2, 3), (False, True)):
        dims = [4] + [6] * (depth - 1) + [4]
        x = torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
        ws = [
            torch.randn(3, dims[i + 1], dims[i], dtype=torch.float64, generator=g, requires_grad=True)
            for i in range(depth)
        ]
        ref = mlp_forward(ws, x, act, residual)
        got = mlp_read(ws, x, act, residual)
        assert torch.allclose(got, ref, rtol=1e-14, atol=1e-15)
        probe = torch.randn(ref.shape, dtype=torch.float64, generator=g)
        want = torch.autograd.grad((ref * probe).sum(), [x, *ws])
        have = torch.autograd.grad((got * probe).sum(), [x, *ws])
        for a, b in zip(have, want):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), (act, depth, residual)


def test_unchecked_entry_equals_checked_one():
    """``chunk_memory_unchecked`` (for callers that validated once, e.g. MAC's segment loop) gives
    ``chunk_memory``'s results; the public entry still refuses bad input by name."""
    from titans.ops.memory.chunk import chunk_memory_unchecked

    kw, _ = make_inputs(B=2, T=11, H=2, D=4, depth=2, seed=3)
    y, st = chunk_memory(**kw, chunk_size=4)
    y2, st2 = chunk_memory_unchecked(**kw, chunk_size=4)
    assert torch.equal(y, y2)
    for a, b in zip(state_tensors(st), state_tensors(st2)):
        assert torch.equal(a, b)
    bad = dict(kw, q=kw["q"].clone())
    bad["q"][0, 3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        chunk_memory(**bad, chunk_size=4)


@pytest.mark.parametrize("shared", [True, False])
def test_chunk_forward_and_backward_trace_as_one_graph(shared):
    """``compile=True`` compiles ``_chunk_forward`` and ``_chunk_backward``: each must trace as one
    graph. A graph break splits it into many small compiled pieces with eager code between them
    (``Wg is W0`` on tuples once did that, and the compiled path ran no faster than eager)."""
    from titans.ops.memory.chunk import _chunk_backward, _chunk_forward, _decay_products

    N, n, D, E = 2, 8, 4, 8
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(N, n, D, generator=g) for _ in range(3))
    theta = torch.rand(N, n, generator=g) * 0.1
    log_a = torch.log(1 - torch.rand(N, n, generator=g) * 0.1)
    log_eta = torch.log(torch.rand(N, n, generator=g))
    gates = _decay_products(theta, log_a, log_eta)
    W0 = (torch.randn(N, E, D, generator=g), torch.randn(N, D, E, generator=g))
    S0 = tuple(torch.randn_like(w) for w in W0)
    Wg = None if shared else tuple(torch.randn_like(w) for w in W0)
    fwd_args = (q, k, v, *gates, W0, S0, Wg, "silu", False, 1.0)
    explained = torch._dynamo.explain(_chunk_forward)(*fwd_args, keep=True)
    assert explained.graph_break_count == 0, explained.break_reasons
    y, W_end, S_end, (dzs, dhs, zs, proj, _) = _chunk_forward(*fwd_args, keep=True)
    gWe, gSe = [torch.randn_like(w) for w in W_end], [torch.randn_like(s) for s in S_end]
    bwd_args = (torch.randn_like(y), gWe, gSe, q, k, v, *gates, W0, S0, Wg, shared, "silu", False, 1.0,
                dzs, dhs, zs, proj)  # fmt: skip
    explained = torch._dynamo.explain(_chunk_backward)(*bwd_args)
    assert explained.graph_break_count == 0, explained.break_reasons
