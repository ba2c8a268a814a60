"""Memora's KL retention (``retention_kl``; MIRAS eqs. 19-21, 27, chunk approximation 30-32): the token
loop at chunk size 1 against eq. 27 written out here, the chunk path and the one-token step
against the token loop of the same chunk approximation (values, final state and every gradient,
float64), the simplex the weights live on, streaming in pieces, the approximation's distance from
the exact rule (the numbers in titans/ops/memory/README.md), and the settings that refuse it."""

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
    memora_gap,
    probe_loss,
    state_tensors,
    step_tokens,
)

from titans.ops.memory import chunk_memory, memory_shapes, naive_memory, step_memory
from titans.ops.memory.mlp import clip_scale, key_gradients
from titans.ops.memory.objectives import Objective
from titans.ops.memory.state import MemoryState

F64 = torch.float64


def _memora_inputs(T=37, depth=2, forgetting=True, seed=0, requires_grad=True, theta=1.0):
    """``make_inputs`` without momentum, theta scaled so that the softmax steps move the weights."""
    kw, leaves = make_inputs(T=T, depth=depth, momentum=False, forgetting=forgetting, seed=seed)
    kw["theta"] = kw["theta"] * theta * 10  # make_inputs' theta is in [0, 0.1]
    leaves = [kw["theta"] if t is leaves[3] else t for t in leaves]
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return kw, leaves


def _eq27(kw, c, activation="silu", residual=False):
    """MIRAS eq. 27 token by token, from the equation alone: every row of every layer's weights
    ``W_t = c softmax((1 - alpha_t) log W_{t-1} - theta_t grad ||M_{W_{t-1}}(k_t) - v_t||^2)``,
    ``W_0 = c softmax(rows of the logits kw["weights"])``, read ``y_t = M_{W_t}(q_t)``."""
    act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[activation]
    B, T = kw["q"].shape[:2]

    def mlp(ws, x):
        h = x
        for i, w in enumerate(ws):
            h = torch.einsum("bhoi,bhi->bho", w, h)
            h = act(h) if i < len(ws) - 1 else h
        return h + x if residual else h

    W = [c * torch.softmax(p, -1).expand(B, *p.shape) for p in kw["weights"]]
    ys = []
    for t in range(T):
        loss = (mlp(W, kw["k"][:, t]) - kw["v"][:, t]).square().sum()
        grads = torch.autograd.grad(loss, W, create_graph=True)
        keep = 1 if kw["alpha"] is None else 1 - kw["alpha"][:, t, :, None, None]
        th = kw["theta"][:, t, :, None, None]
        W = [c * torch.softmax(keep * torch.log(w) - th * g, -1) for w, g in zip(W, grads)]
        ys.append(mlp(W, kw["q"][:, t]))
    return torch.stack(ys, 1), W


@pytest.mark.parametrize("c", [1.0, 3.0])
@pytest.mark.parametrize("forgetting, residual, activation", [(True, False, "silu"), (False, True, "gelu")])
def test_chunk_size_one_is_eq_27(c, forgetting, residual, activation):
    """At chunk size 1 every token is a lag token: the token loop and the chunk path are eq. 27
    (outputs, final weights, every gradient: theta's and alpha's, the logits', q, k, v)."""
    kw, leaves = _memora_inputs(T=13, forgetting=forgetting, seed=int(c))
    y_ref, W_ref = _eq27(kw, c, activation, residual)
    g_ref = torch.autograd.grad(probe_loss(y_ref) + sum(probe_loss(w) for w in W_ref), leaves)
    opts = dict(chunk_size=1, retention_kl=c, activation=activation, residual=residual)
    for fn in (naive_memory, chunk_memory):
        y, s = fn(**kw, **opts)
        assert_close(y, y_ref, 1e-12, f"{fn.__name__} outputs")
        for w, w_ref in zip(s.weights, W_ref):
            assert_close(w, w_ref, 1e-12, f"{fn.__name__} weights")
            assert_close(s.log_weights[0].exp(), s.weights[0], 1e-14, "log-weights")
        g = torch.autograd.grad(probe_loss(y) + sum(probe_loss(w) for w in s.weights), leaves)
        for i, (a, b) in enumerate(zip(g, g_ref)):
            assert_close(a, b, 1e-10, f"{fn.__name__} gradient of leaf {i}")


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunk_equals_naive_float64(depth, chunk_size):
    """The chunk path (lag token, then the kernel from its weights, log-weights carried) against
    the token loop of the same approximation: outputs, state, every gradient."""
    for forgetting, residual, c in [(True, False, 1.0), (False, True, 2.5)]:
        kw, leaves = _memora_inputs(depth=depth, forgetting=forgetting, seed=depth * 10 + chunk_size)
        what = f"depth={depth} b={chunk_size} forget={forgetting} res={residual} c={c}"
        check_chunk_equals_naive(kw, leaves, dict(chunk_size=chunk_size, residual=residual, retention_kl=c), what)


@pytest.mark.parametrize("objective", [Objective("huber"), Objective("lp", p=3.0)], ids=["huber", "lp3"])
def test_other_objectives_and_clipping(objective):
    """The KL retention with another attentional bias, and with the inner gradient clipped on some
    tokens and not on others (the lag token's and the kernel's), chunk path = token loop."""
    kw, leaves = _memora_inputs(T=29, seed=7, theta=0.3)
    kw["objective"] = objective
    if objective.needs_delta:
        delta = (0.5 + 2.5 * torch.rand(kw["theta"].shape, generator=torch.Generator().manual_seed(1), dtype=F64))
        kw["delta"] = delta.requires_grad_(True)
        leaves = [*leaves, delta]
    for max_grad_norm in (None, 0.5):
        opts = dict(chunk_size=6, retention_kl=1.0, max_grad_norm=max_grad_norm)
        check_chunk_equals_naive(kw, leaves, opts, f"{objective} clip={max_grad_norm}")
    # 0.5 lies inside the range of the first chunk's gradient norms (taken at M_0), so the clip acts on some
    B, H = kw["q"].shape[0], kw["q"].shape[2]
    W0 = [torch.softmax(w.detach(), -1).expand(B, *w.shape).reshape(B * H, *w.shape[1:]) for w in kw["weights"]]
    flat = lambda x: x[:, :6].detach().transpose(1, 2).reshape(B * H, 6, *x.shape[3:])  # noqa: E731
    delta = None if "delta" not in kw else flat(kw["delta"])
    hs, _, dzs = key_gradients(W0, flat(kw["k"]), flat(kw["v"]), "silu", False, objective, delta)
    norms = clip_scale(dzs, hs, 0.5)[1].sqrt()
    assert bool((norms > 0.5).any()) and bool((norms < 0.5).any())


@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_analytic_backward_equals_autograd(activation):
    kw, leaves = _memora_inputs(T=29, seed=3)
    opts = dict(chunk_size=8, activation=activation, retention_kl=2.0)
    check_analytic_backward_equals_autograd(kw, leaves, opts, f"memora act={activation}")


def test_one_token_steps_equal_the_token_loop():
    kw, _ = _memora_inputs(T=19, seed=5, requires_grad=False)
    for chunk_size in (1, 4):
        y_ref, s_ref = naive_memory(**kw, chunk_size=chunk_size, retention_kl=1.5, max_grad_norm=2.0)
        y, state = step_tokens(kw, chunk_size=chunk_size, retention_kl=1.5, max_grad_norm=2.0)
        assert_close(y, y_ref, 1e-12, f"one-token steps, chunk {chunk_size}")
        assert state.position == s_ref.position == 19 % chunk_size
        for a, b in zip(state_tensors(state), state_tensors(s_ref)):
            assert_close(a, b, 1e-12, "final state")


def test_streaming_random_splits_equal_one_call():
    """Pieces of every length (one-token pieces through the step), cut inside and at chunk
    boundaries, continue exactly: outputs and the whole state."""
    kw, _ = _memora_inputs(T=41, seed=11, requires_grad=False)
    rng = random.Random(0)
    y_full, s_full = chunk_memory(**kw, chunk_size=5, retention_kl=1.0)
    for trial in range(4):
        cuts = sorted(rng.sample(range(1, 41), rng.randint(2, 12))) + [41]
        ys, state, a = [], None, 0
        for b in cuts:
            part = {n: kw[n][:, a:b] for n in ("q", "k", "v", "theta", "alpha")}
            start = dict(weights=kw["weights"]) if state is None else dict(state=state)
            fn = step_memory if b - a == 1 else chunk_memory
            y, state = fn(**part, **start, chunk_size=5, retention_kl=1.0)
            ys.append(y)
            a = b
        assert_close(torch.cat(ys, 1), y_full, 1e-12, f"pieces ending at {cuts}")
        for u, w in zip(state_tensors(state), state_tensors(s_full)):
            assert_close(u, w, 1e-12, "final state after pieces")


def test_weights_are_on_the_simplex_and_the_rule_moves_them():
    """Every row of every layer sums to c and is positive: M_0 (the softmax of the logits) and the
    state at every chunk boundary. The forget gate pulls the rows toward uniform (alpha = 1
    forgets everything: the rows are then the softmax of this token's gradient step alone)."""
    c = 2.0
    kw, _ = _memora_inputs(T=24, seed=13, requires_grad=False)
    state = None
    for t0 in range(0, 24, 4):  # one chunk per call: the state is at a boundary after each
        part = {n: kw[n][:, t0 : t0 + 4] for n in ("q", "k", "v", "theta", "alpha")}
        start = dict(weights=kw["weights"]) if state is None else dict(state=state)
        _, state = chunk_memory(**part, **start, chunk_size=4, retention_kl=c)
        assert state.position == 0
        for w, z in zip(state.weights, state.log_weights):
            assert bool((w > 0).all())
            torch.testing.assert_close(w.sum(-1), torch.full_like(w.sum(-1), c), rtol=1e-14, atol=0)
            torch.testing.assert_close(z.exp(), w, rtol=1e-14, atol=0)
    moved = max(float((w - c * torch.softmax(p, -1)).abs().max()) for w, p in zip(state.weights, kw["weights"]))
    assert moved > 1e-2  # the writes moved the weights
    # alpha = 1 keeps nothing of log W: with theta = 0 a token leaves uniform rows
    part = {n: kw[n][:, :3] for n in ("q", "k", "v", "alpha")}
    part["alpha"] = torch.ones_like(part["alpha"])
    _, s_forgot = naive_memory(**part, theta=torch.zeros_like(part["alpha"]), weights=kw["weights"], chunk_size=1,
                               retention_kl=c)  # fmt: skip
    for w in s_forgot.weights:
        torch.testing.assert_close(w, torch.full_like(w, c / w.shape[-1]), rtol=1e-14, atol=0)


def test_keys_wider_than_values():
    g = torch.Generator().manual_seed(2)
    B, T, H, Dk, Dv = 2, 11, 2, 6, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    kw = dict(q=rnd(B, T, H, Dk), k=rnd(B, T, H, Dk), v=rnd(B, T, H, Dv),
              theta=torch.rand(B, T, H, generator=g, dtype=F64), alpha=0.1 * torch.rand(B, T, H, generator=g, dtype=F64))  # fmt: skip
    kw["weights"] = [rnd(H, o, i) for o, i in memory_shapes(Dv, 2, 2.0, key_dim=Dk)]
    leaves = [kw[n].requires_grad_() for n in ("q", "k", "v", "theta", "alpha")] + [w.requires_grad_() for w in kw["weights"]]
    check_chunk_equals_naive(kw, leaves, dict(chunk_size=4, retention_kl=1.0), "D_k != D_v")


def test_the_chunk_approximation_is_as_far_from_eq_27_as_documented():
    """The numbers of the README's table (theta scale 0.1; benchmarks/memora_approximation.py):
    chunk size 1 is the exact rule; larger chunks read with the papers' linear weights, which move
    far more than the exact rule's inside a chunk, while the weights carried to the next chunk stay
    close to it."""
    gap = memora_gap(0.1, (1, 16, 64))
    assert gap[1][0] < 1e-13 and gap[1][1] < 1e-13
    documented = {"writes": 0.053, 16: (0.66, 0.0007), 64: (1.1, 0.0026)}
    assert abs(gap["writes"] / documented["writes"] - 1) < 0.05
    for b in (16, 64):
        for got, want in zip(gap[b], documented[b]):
            assert abs(got / want - 1) < 0.05, (b, got, want)


def test_bad_arguments_are_named():
    kw, _ = _memora_inputs(T=5, depth=1, seed=9, requires_grad=False)
    with pytest.raises(ValueError, match="retention_kl must be None or a number in"):
        chunk_memory(**kw, retention_kl=0.0)
    with pytest.raises(ValueError, match="retention_kl must be None or a number in"):
        naive_memory(**kw, retention_kl=True)
    eta = torch.full_like(kw["theta"], 0.5)
    with pytest.raises(ValueError, match="retention_kl .* without momentum: pass eta=None"):
        chunk_memory(**dict(kw, eta=eta), retention_kl=1.0)
    with pytest.raises(ValueError, match="retention_kl .* and retention_q .* pass one"):
        step_memory(**{n: (x[:, :1] if isinstance(x, torch.Tensor) else x) for n, x in kw.items()},
                    retention_kl=1.0, retention_q=4.0)  # fmt: skip
    gamma = torch.ones(*kw["theta"].shape, 2, dtype=F64)
    with pytest.raises(ValueError, match="gamma .* and retention_kl .* do not combine"):
        chunk_memory(**kw, retention_kl=1.0, gamma=gamma)
    _, plain = chunk_memory(**kw, chunk_size=4)
    with pytest.raises(ValueError, match="state has no log-weights"):
        chunk_memory(**{n: x for n, x in kw.items() if n != "weights"}, state=plain, chunk_size=4, retention_kl=1.0)
    _, kl = chunk_memory(**kw, chunk_size=4, retention_kl=1.0)
    assert isinstance(kl, MemoryState) and kl.log_weights is not None
    with pytest.raises(ValueError, match="state holds Memora's log-weights: pass retention_kl"):
        chunk_memory(**{n: x for n, x in kw.items() if n != "weights"}, state=kl, chunk_size=4)


# ---- the layer and the model ------------------------------------------------------------------


def test_layer_streams_decodes_and_refuses_contradictions():
    from titans.layers.neural_memory import NeuralMemory
    from titans.model import TitansConfig

    torch.manual_seed(0)
    layer = NeuralMemory.from_rule("memora", 32, heads=2, chunk_size=4, theta_init=0.5).double()
    assert layer.retention_kl == 1.0 and not layer.momentum and layer.objective.name == "l2"
    start = layer.initial_weights_for(3)
    for w, p in zip(start, layer.initial_weights):
        torch.testing.assert_close(w, torch.softmax(p, -1).expand_as(w))  # what MAC reads before any write
    x = torch.randn(2, 19, 32, dtype=F64)
    y, s, s1, y2 = check_layer_streams_in_pieces(layer, x)
    with torch.no_grad():  # the one-token step of the decode graph (tensor position) against the general path
        step, state, outs = layer.step_state(s1, 2), s1, []
        for t in range(7, 19):
            out, step = layer.step(x[:, t : t + 1], step)
            state = layer.state_after_step(state, step)
            step = layer.step_state(state, 2)
            outs.append(out)
    assert_close(torch.cat(outs, 1), y2, 1e-12, "decode steps")
    for a, b in zip(state.memory.tensors(), s.memory.tensors()):
        assert_close(a, b, 1e-12, "state after decode steps")
    y.square().sum().backward()
    assert layer.initial_weights[0].grad.abs().sum() > 0 and layer.to_alpha.weight.grad.abs().sum() > 0
    assert "retention_kl=1.0" in repr(layer)
    assert layer.step_state(NeuralMemory(32, heads=2, chunk_size=4).double()(x)[1], 2) is None  # no log-weights
    with pytest.raises(ValueError, match="retention_kl .* without momentum: pass momentum=False"):
        NeuralMemory(16, heads=2, retention_kl=1.0)
    with pytest.raises(ValueError, match="retention_kl .* and retention_q .* pass one"):
        NeuralMemory(16, heads=2, retention_kl=1.0, retention_q=4.0, momentum=False)
    with pytest.raises(ValueError, match="window .* and retention_kl .* do not combine"):
        NeuralMemory(16, heads=2, retention_kl=1.0, window=3, momentum=False)
    with pytest.raises(ValueError, match="retention_kl must be None or a number in"):
        NeuralMemory(16, heads=2, retention_kl=-1.0, momentum=False)
    with pytest.raises(ValueError, match="memory_retention_kl must be None or a number in"):
        TitansConfig(memory_retention_kl=float("nan"), memory_momentum=False)
    with pytest.raises(ValueError, match="memory_retention_kl must be None or a number in"):
        TitansConfig(memory_retention_kl="1", memory_momentum=False)
    with pytest.raises(ValueError, match="memory_retention_kl .* set memory_momentum=False"):
        TitansConfig(memory_retention_kl=1.0)
    with pytest.raises(ValueError, match="memory_retention_kl .* and memory_retention_q .* set one"):
        TitansConfig(memory_retention_kl=1.0, memory_retention_q=4.0, memory_momentum=False)
    with pytest.raises(ValueError, match="memory_window .* and memory_retention_kl .* do not combine"):
        TitansConfig(memory_retention_kl=1.0, memory_window=2, memory_momentum=False)
    with pytest.raises(ValueError, match="memory rule 'memora' sets memory_momentum=False"):
        TitansConfig.with_memory_rule("memora", memory_momentum=True)
    assert TitansConfig(memory_retention_kl=2, memory_momentum=False).memory_retention_kl == 2.0


def test_states_do_not_cross_retentions_and_older_fingerprints_stay():
    """A Memora model's state names its retention; a plain model's fingerprint does not name the
    setting at all (as before it existed, so its saved states still load), and neither model
    continues the other's state."""
    check_setting_keeps_states_apart("memory_retention_kl", 1.0, variant="lmm", dim=32, depth=1, heads=2,
                                     memory_chunk=4, memory_momentum=False)  # fmt: skip


def test_bf16_products_stay_near_float32():
    from titans.layers.neural_memory import NeuralMemory

    torch.manual_seed(1)
    layer = NeuralMemory.from_rule("memora", 32, heads=2, chunk_size=8, theta_init=0.5)
    low = NeuralMemory.from_rule("memora", 32, heads=2, chunk_size=8, theta_init=0.5, product_dtype="bfloat16")
    low.load_state_dict(layer.state_dict())
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        (y, s), (y_low, s_low) = layer(x), low(x)
    assert_close(y_low, y, 3e-2, "outputs with bf16 products")
    for a, b in zip(s_low.memory.log_weights, s.memory.log_weights):
        assert a.dtype == torch.float32
        assert_close(a, b, 1e-2, "log-weights with bf16 products")
