"""ATLAS's Muon inner optimiser (``muon_steps``; ATLAS eqs. 32-33, the chunk form of section 5.1):
Newton-Schulz against Muon's quintic written out, the token loop and the chunk path against the
rule written out here from the equations (every gradient at the chunk's start weights, each
token's momentum orthogonalised), the chunk path and the one-token step against the token loop
(values, final state and every gradient, float64) with and without momentum, forgetting, window,
clipping, other objectives and keys wider than values, split calls, the checkpointed backward
against plain autograd, and the settings that refuse it."""

from __future__ import annotations

import random

import pytest
import torch
from _helpers import (
    assert_close,
    check_analytic_backward_equals_autograd,
    check_chunk_equals_naive,
    check_layer_streams_in_pieces,
    check_setting_keeps_states_apart,
    make_inputs,
    probe_loss,
    state_tensors,
    step_tokens,
)

import titans.ops.memory.chunk as chunk_mod
from titans.ops.memory import chunk_memory, memory_shapes, naive_memory, step_memory
from titans.ops.memory.muon import newton_schulz
from titans.ops.memory.objectives import Objective

F64 = torch.float64


def _quintic(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's iteration for one matrix, as Jordan et al. write it (no transposition)."""
    X = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X


@pytest.mark.parametrize("gram", [None, False, True], ids=["cheaper", "as-written", "gram"])
def test_newton_schulz_is_muons_quintic(gram):
    """Batched, either orientation, every matrix on its own, in either form (the iteration as
    written, the Gram form, the cheaper of the two): Muon's quintic written out; odd, blind to the
    scale, singular values pushed toward 1; zero stays zero with a finite gradient."""
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5, 4, 9), (2, 9, 4), (6, 6), (2, 3, 16), (16, 3)]:
        x = torch.randn(*shape, generator=g, dtype=F64)
        for steps in (1, 2, 5):
            out = newton_schulz(x, steps, gram=gram)
            ref = torch.stack([_quintic(m, steps) for m in x.reshape(-1, *shape[-2:])]).reshape(shape)
            assert_close(out, ref, 1e-13, f"NS_{steps} of {shape}")
            assert out.is_contiguous()
        ns = lambda t: newton_schulz(t, 5, gram=gram)  # noqa: E731
        torch.testing.assert_close(ns(-x), -ns(x), rtol=0, atol=0)
        assert_close(ns(1e3 * x), ns(x), 1e-6, "scale")  # up to the eps of |x|_F + eps
        s = torch.linalg.svdvals(ns(x))
        assert 0.6 < float(s.min()) and float(s.max()) < 1.2
    zero = torch.zeros(2, 4, 3, dtype=F64, requires_grad=True)
    out = newton_schulz(zero, 5, gram=gram)
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad(probe_loss(out), zero)
    assert torch.isfinite(grad).all()
    for shape in [(2, 3, 5), (2, 7, 3)]:  # wide and tall
        x = torch.randn(*shape, generator=g, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: newton_schulz(t, 3, gram=gram), (x,))


def _atlas_written_out(kw, chunk_size, steps, c=1):
    """ATLAS's Muon from its equations alone, token by token, in the project's gate names: every
    token t of a chunk takes its gradients at the chunk's start weights M_c,
    G_t = sum_{j<c} gamma[t, j] grad ||M_c(k_{t-j}) - v_{t-j}||^2 (gamma = 1 without a window),
    S_t = eta_t S_{t-1} - G_t, M_t = (1 - alpha_t) M_{t-1} + theta_t NS(S_t) per weight matrix and
    memory (``_quintic``), y_t = M_t(q_t)."""
    act = torch.nn.functional.silu
    B, T, H, _ = kw["q"].shape

    def mlp(ws, x):
        h = x
        for i, w in enumerate(ws):
            h = torch.einsum("bhoi,bhi->bho", w, h)
            h = act(h) if i < len(ws) - 1 else h
        return h

    def ns(s):  # every [out, in] matrix of every memory
        return torch.stack([_quintic(m, steps) for m in s.reshape(-1, *s.shape[-2:])]).reshape(s.shape)

    W = [w.expand(B, *w.shape) for w in kw["weights"]]
    S = [torch.zeros_like(w) for w in W]
    ys = []
    for t in range(T):
        if t % chunk_size == 0:
            Wc = W
        G = [torch.zeros_like(w) for w in W]
        for j in range(c):
            if t - j < 0:
                break
            loss = (mlp(Wc, kw["k"][:, t - j]) - kw["v"][:, t - j]).square().sum()
            grads = torch.autograd.grad(loss, Wc, create_graph=True)
            weight = 1.0 if kw.get("gamma") is None else kw["gamma"][:, t, :, j, None, None]
            G = [a + weight * b for a, b in zip(G, grads)]
        eta = 0.0 if kw["eta"] is None else kw["eta"][:, t, :, None, None]
        keep = 1.0 if kw["alpha"] is None else 1 - kw["alpha"][:, t, :, None, None]
        S = [eta * s - g for s, g in zip(S, G)]
        W = [keep * w + kw["theta"][:, t, :, None, None] * ns(s) for w, s in zip(W, S)]
        ys.append(mlp(W, kw["q"][:, t]))
    return torch.stack(ys, 1), W, S


@pytest.mark.parametrize(("chunk_size", "c", "depth"), [(1, 1, 2), (1, 3, 1), (4, 1, 2), (4, 3, 2), (3, 2, 1)])
def test_token_loop_and_chunk_path_are_atlas_written_out(chunk_size, c, depth):
    """The token loop and the chunk path against ATLAS's eqs. 32-33 written out above (chunk size 1:
    the online rule, every gradient at M_{t-1}; larger: at the chunk's start weights): outputs,
    final weights and momentum, and every gradient (q, k, v, theta, eta, alpha, gamma, M_0)."""
    kw, leaves = make_inputs(T=11, depth=depth, seed=chunk_size * 10 + c, requires_grad=False)
    if c > 1:
        kw["gamma"] = torch.rand(*kw["theta"].shape, c, generator=torch.Generator().manual_seed(c), dtype=F64)
        leaves = leaves + [kw["gamma"]]
    for t in leaves:
        t.requires_grad_(True)
    y_ref, W_ref, S_ref = _atlas_written_out(kw, chunk_size, 5, c)
    g_ref = torch.autograd.grad(probe_loss(y_ref) + sum(probe_loss(w) for w in W_ref + S_ref), leaves)
    for fn in (naive_memory, chunk_memory):
        y, s = fn(**kw, chunk_size=chunk_size, muon_steps=5)
        assert_close(y, y_ref, 1e-12, f"{fn.__name__} outputs")
        for a, b in zip(s.weights + s.momentum, W_ref + S_ref):
            assert_close(a, b, 1e-12, f"{fn.__name__} state")
        g = torch.autograd.grad(probe_loss(y) + sum(probe_loss(w) for w in s.weights + s.momentum), leaves)
        for i, (a, b) in enumerate(zip(g, g_ref)):
            assert_close(a, b, 1e-10, f"{fn.__name__} gradient of leaf {i}")


def _window(kw, leaves, c, seed=0):
    gamma = torch.rand(*kw["theta"].shape, c, generator=torch.Generator().manual_seed(seed), dtype=F64)
    kw["gamma"] = gamma.requires_grad_(True)
    return leaves + [gamma]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunk_equals_naive_float64(depth, chunk_size):
    """Momentum and forgetting on and off, with and without the Omega window."""
    cases = [(True, True, 1), (False, True, 1), (True, False, 3), (False, False, 5)]
    for momentum, forgetting, c in cases:
        kw, leaves = make_inputs(T=23, depth=depth, momentum=momentum, forgetting=forgetting, requires_grad=True,
                                 seed=depth * 100 + chunk_size + c)  # fmt: skip
        if c > 1:
            leaves = _window(kw, leaves, c, seed=c)
        what = f"depth={depth} b={chunk_size} momentum={momentum} forget={forgetting} c={c}"
        check_chunk_equals_naive(kw, leaves, dict(chunk_size=chunk_size, muon_steps=5), what)


@pytest.mark.parametrize("objective", [Objective("huber"), Objective("lp", p=3.0)], ids=["huber", "lp3"])
def test_other_objectives_clipping_and_residual(objective):
    kw, leaves = make_inputs(T=21, seed=7, requires_grad=True)
    leaves = _window(kw, leaves, 3)
    kw["objective"] = objective
    if objective.needs_delta:
        delta = 0.5 + 2.5 * torch.rand(kw["theta"].shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        kw["delta"] = delta.requires_grad_(True)
        leaves = [*leaves, delta]
    for max_grad_norm, residual in ((None, True), (0.5, False)):
        opts = dict(chunk_size=6, muon_steps=3, max_grad_norm=max_grad_norm, residual=residual)
        check_chunk_equals_naive(kw, leaves, opts, f"{objective} clip={max_grad_norm} residual={residual}")


def test_keys_wider_than_values():
    """Polynomial keys make the first layer wide (``[E, C(D + p, p)]``): its Newton-Schulz runs on
    the smaller Gram matrix, transposed against the last layer's."""
    g = torch.Generator().manual_seed(2)
    B, T, H, Dk, Dv = 2, 13, 2, 10, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    kw = dict(q=rnd(B, T, H, Dk), k=rnd(B, T, H, Dk), v=rnd(B, T, H, Dv),
              theta=0.1 * torch.rand(B, T, H, generator=g, dtype=F64), eta=torch.rand(B, T, H, generator=g, dtype=F64),
              alpha=0.1 * torch.rand(B, T, H, generator=g, dtype=F64))  # fmt: skip
    kw["weights"] = [rnd(H, o, i) / i**0.5 for o, i in memory_shapes(Dv, 2, 1.5, key_dim=Dk)]
    assert [tuple(w.shape[1:]) for w in kw["weights"]] == [(6, 10), (4, 6)]
    leaves = [kw[n].requires_grad_() for n in ("q", "k", "v", "theta", "eta", "alpha")] + [
        w.requires_grad_() for w in kw["weights"]
    ]
    leaves = _window(kw, leaves, 2)
    check_chunk_equals_naive(kw, leaves, dict(chunk_size=4, muon_steps=5), "D_k != D_v")


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_checkpointed_backward_equals_autograd(activation):
    """The default backward (autograd through one recomputed span at a time) against autograd that
    keeps every span, entered mid-chunk (gradient weights != running weights)."""
    kw, leaves = make_inputs(T=29, seed=3, requires_grad=True)
    leaves = _window(kw, leaves, 4)
    opts = dict(chunk_size=8, activation=activation, muon_steps=5, max_grad_norm=1.0)
    check_analytic_backward_equals_autograd(kw, leaves, opts, f"muon act={activation}")


def test_spans_cut_for_memory_give_the_same_results(monkeypatch):
    """A wide memory runs its chunks in shorter spans (``_MUON_SPAN_FLOATS``), gradients still at
    each chunk's start weights: outputs, state and every gradient as the token loop's."""
    calls = []
    span = chunk_mod._muon_span
    monkeypatch.setattr(chunk_mod, "_muon_span", lambda *a: calls.append(a[0].shape[1]) or span(*a))
    kw, leaves = make_inputs(T=19, seed=5, requires_grad=True)
    leaves = _window(kw, leaves, 3)
    B, H = kw["q"].shape[0], kw["q"].shape[2]
    per_token = B * H * sum(o * i for o, i in memory_shapes(4, 2, 2.0))
    monkeypatch.setattr(chunk_mod, "_MUON_SPAN_FLOATS", 3 * per_token)  # 3 tokens per span
    with torch.no_grad():
        chunk_memory(**kw, chunk_size=8, muon_steps=4)
    assert calls == [3, 3, 2, 3, 3, 2, 3]  # chunks of 8, 8 and 3 tokens, cut into spans of at most 3
    check_chunk_equals_naive(kw, leaves, dict(chunk_size=8, muon_steps=4), "spans of 3")
    check_analytic_backward_equals_autograd(kw, leaves, dict(chunk_size=8, muon_steps=4), "spans of 3, nested")


def test_one_token_steps_and_random_splits_equal_one_call():
    kw, _ = make_inputs(T=29, seed=11)
    kw["gamma"] = torch.rand(*kw["theta"].shape, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    opts = dict(chunk_size=5, muon_steps=5, max_grad_norm=0.8)
    y_ref, s_ref = naive_memory(**kw, **opts)
    per_token = ("q", "k", "v", "theta", "eta", "alpha", "gamma")
    rng = random.Random(0)
    for trial in range(3):
        cuts = sorted(rng.sample(range(1, 29), rng.randint(2, 10))) + [29]
        if trial == 0:
            cuts = list(range(1, 30))  # every token through the one-token step
        ys, state, a = [], None, 0
        for b in cuts:
            part = {n: kw[n][:, a:b] for n in per_token}
            start = dict(weights=kw["weights"]) if state is None else dict(state=state)
            fn = step_memory if b - a == 1 else chunk_memory
            y, state = fn(**part, **start, **opts)
            ys.append(y)
            a = b
        assert_close(torch.cat(ys, 1), y_ref, 1e-12, f"pieces ending at {cuts}")
        for t in state.tensors():  # its own storage: not a view into a span's per-token tensors
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert state.position == s_ref.position and state.window.valid == s_ref.window.valid
        for u, w in zip(state_tensors(state) + [state.window.k], state_tensors(s_ref) + [s_ref.window.k]):
            assert_close(u, w, 1e-12, "final state after pieces")
    y, state = step_tokens({n: kw[n] for n in ("q", "k", "v", "theta", "eta", "alpha", "weights")}, chunk_size=4,
                           muon_steps=2)  # fmt: skip
    y_ref, s_ref = naive_memory(**{n: kw[n] for n in ("q", "k", "v", "theta", "eta", "alpha", "weights")},
                                chunk_size=4, muon_steps=2)  # fmt: skip
    assert_close(y, y_ref, 1e-12, "one-token steps without a window")
    for u, w in zip(state_tensors(state), state_tensors(s_ref)):
        assert_close(u, w, 1e-12, "state after one-token steps")


def test_theta_scales_the_step_and_the_gradients_scale_does_not():
    """What sets Muon apart from the Titans step: a token's step is theta times an orthogonalised
    direction, so twice theta moves the weights twice as far, while a gradient ten times larger
    (values scaled) moves a linear memory without momentum no further (NS is blind to scale)."""
    kw, _ = make_inputs(B=1, T=1, H=1, D=6, depth=1, momentum=False, forgetting=False, seed=4)
    kw["weights"] = [torch.zeros_like(w) for w in kw["weights"]]  # gradient -2 v k^T: scaled with v
    W0 = kw["weights"][0]

    def step(**change):
        _, s = chunk_memory(**{**kw, **change}, chunk_size=1, muon_steps=5)
        return s.weights[0][0] - W0

    base = step()
    assert float(base.norm()) > 0.1 * float(kw["theta"].max())
    assert_close(step(theta=2 * kw["theta"]), 2 * base, 1e-14, "twice theta")
    assert_close(step(v=10 * kw["v"]), base, 1e-7, "a ten times larger gradient")
    titans = [chunk_memory(**{**kw, "v": s * kw["v"]}, chunk_size=1)[1].weights[0] for s in (1, 10)]
    assert_close(titans[1], 10 * titans[0], 1e-12, "the Titans step: ten times as far")


def test_bad_settings_are_refused_by_name():
    from titans.layers.neural_memory import NeuralMemory
    from titans.model import TitansConfig

    kw, _ = make_inputs(T=5)
    for bad in (0, 65, True, 2.5, "5"):
        with pytest.raises(ValueError, match=r"muon_steps must be None or an integer in \[1, 64\]"):
            chunk_memory(**kw, muon_steps=bad)
        with pytest.raises(ValueError, match=r"muon_steps must be None or an integer in \[1, 64\]"):
            NeuralMemory(16, heads=2, muon_steps=bad)
        with pytest.raises(ValueError, match=r"memory_muon_steps must be None or an integer in \[1, 64\]"):
            TitansConfig(memory_muon_steps=bad)
    no_mom = dict(kw, eta=None)
    with pytest.raises(ValueError, match="muon_steps .* and retention_q .* do not combine yet"):
        naive_memory(**kw, muon_steps=5, retention_q=4.0)
    with pytest.raises(ValueError, match="muon_steps .* and retention_kl .* do not combine"):
        step_memory(**{n: (x[:, :1] if torch.is_tensor(x) and x.dim() >= 3 and x.shape[1] == 5 else x)
                       for n, x in no_mom.items()}, muon_steps=5, retention_kl=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="product_dtype=torch.bfloat16 does not apply to muon_steps"):
        chunk_memory(**{n: (x.float() if torch.is_tensor(x) else [w.float() for w in x] if isinstance(x, list) else x)
                        for n, x in kw.items()}, muon_steps=5, product_dtype=torch.bfloat16)  # fmt: skip
    with pytest.raises(ValueError, match="muon_steps .* and retention_q .* do not combine yet"):
        NeuralMemory(16, heads=2, muon_steps=5, retention_q=4.0)
    with pytest.raises(ValueError, match="muon_steps .* and retention_kl .* do not combine"):
        NeuralMemory(16, heads=2, muon_steps=5, retention_kl=1.0, momentum=False)
    with pytest.raises(ValueError, match="muon_steps .* and product_dtype='bfloat16' do not combine"):
        NeuralMemory(16, heads=2, muon_steps=5, product_dtype="bfloat16")
    with pytest.raises(ValueError, match="memory_muon_steps .* and memory_retention_q .* do not combine yet"):
        TitansConfig(memory_muon_steps=5, memory_retention_q=4.0)
    with pytest.raises(ValueError, match="memory_muon_steps .* and memory_retention_kl .* do not combine"):
        TitansConfig(memory_muon_steps=5, memory_retention_kl=1.0, memory_momentum=False)
    with pytest.raises(ValueError, match="memory_muon_steps .* and memory_product_dtype='bfloat16' do not combine"):
        TitansConfig(memory_muon_steps=5, memory_product_dtype="bf16")


def test_the_layer_streams_decodes_and_learns():
    """``NeuralMemory.from_rule("atlas")``: pieces give one call's outputs and state, the one-token
    decode step gives the forward's, and the outer gradients reach the learning-rate projection
    (theta acts outside Newton-Schulz) and the window gates."""
    from titans.layers.neural_memory import NeuralMemory

    torch.manual_seed(0)
    layer = NeuralMemory.from_rule("atlas", 16, heads=2, chunk_size=4, theta_init=0.05).double()
    assert layer.muon_steps == 5 and layer.window == 8 and layer.features.degree == 2
    x = torch.randn(2, 15, 16, dtype=F64)
    y, state, _, _ = check_layer_streams_in_pieces(layer, x)
    step = layer.step_state(state, 2)
    y1, s1 = layer(x[:, :1], state)
    y2, after = layer.step(x[:, :1], step)
    assert_close(y2, y1, 1e-12, "decode step against the forward")
    for a, b in zip(layer.state_after_step(state, after).memory.tensors(), s1.memory.tensors()):
        assert_close(a, b, 1e-12, "state after the decode step")
    y.square().sum().backward()
    assert float(layer.to_theta.weight.grad.abs().sum()) > 0 and float(layer.to_gamma.weight.grad.abs().sum()) > 0
    assert "muon_steps=5" in repr(layer)


def test_states_do_not_cross_optimisers_and_older_fingerprints_stay():
    """A Muon model's state names the setting; a plain model's fingerprint does not name it at all
    (as before it existed, so its saved states still load), and neither continues the other's."""
    check_setting_keeps_states_apart("memory_muon_steps", 5, variant="lmm", dim=32, depth=1, heads=2, memory_chunk=4)


def test_momentum_states_do_not_cross_optimisers():
    """A Titans momentum (theta-scaled gradients) continued with ``muon_steps`` (raw gradients), or
    the reverse, is refused by every op and by the layer, naming both sides; another k continues
    (the momentum means the same), and a state without momentum continues under either."""
    from titans.errors import StateMismatchError
    from titans.layers.neural_memory import NeuralMemory

    kw, _ = make_inputs(T=6, seed=9)
    first = {n: (x[:, :3] if torch.is_tensor(x) and x.dim() >= 3 and x.shape[1] == 6 else x) for n, x in kw.items()}
    rest = {n: x[:, 3:] for n, x in kw.items() if n != "weights"}
    one = {n: x[:, :1] for n, x in rest.items()}
    titans_side = r"muon_steps=None \(the Titans step: its momentum sums theta-scaled gradients\)"
    muon_side = r"muon_steps=5 \(ATLAS's Muon: its momentum sums the raw gradients\)"
    for made, then, sides in ((None, 5, (titans_side, muon_side)), (5, None, (muon_side, titans_side))):
        state = chunk_memory(**first, chunk_size=4, muon_steps=made)[1]
        assert state.muon_steps == made
        for fn, part in ((chunk_memory, rest), (naive_memory, rest), (step_memory, one)):
            with pytest.raises(ValueError, match=f"state.momentum was written with {sides[0]}; this call has {sides[1]}"):
                fn(**part, state=state, chunk_size=4, muon_steps=then)
    state = chunk_memory(**first, chunk_size=4, muon_steps=5)[1]
    chunk_memory(**rest, state=state, chunk_size=4, muon_steps=3)  # another k: the same momentum
    no_mom = {**first, "eta": None}
    state = chunk_memory(**no_mom, chunk_size=4, muon_steps=5)[1]
    chunk_memory(**{**rest, "eta": None}, state=state, chunk_size=4)  # no momentum: weights mean the same

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    titans = NeuralMemory(16, heads=2, chunk_size=4)
    muon = NeuralMemory(16, heads=2, chunk_size=4, muon_steps=5)
    muon.load_state_dict(titans.state_dict())
    with torch.no_grad():
        for a, b in ((titans, muon), (muon, titans)):
            state = a(x)[1]
            named = (f"the state's momentum was written with muon_steps={a.muon_steps}, this layer has "
                     f"muon_steps={b.muon_steps}")  # fmt: skip
            for part in (x, x[:, :1]):  # the chunk path and the one-token step
                with pytest.raises(StateMismatchError, match=named):
                    b(part, state)
            assert b.step_state(state, 2) is None  # the decode path leaves it to the checked one
            assert a.step_state(state, 2) is not None
