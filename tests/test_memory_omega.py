"""The Omega rule (ATLAS eq. 9-10): a token's update sums the gradients of the c latest tokens,
weighted by gamma, each taken at the chunk-start weights. The chunk path (analytic backward), the
one-token step and streaming must equal the token loop in float64, every gradient included."""

from __future__ import annotations

import pytest
import torch

from titans.ops.memory import chunk_memory, memory_shapes, naive_memory, step_memory
from titans.ops.memory.state import MemoryState, initial_memory_state

F64 = torch.float64


def _inputs(B=2, T=13, H=2, D=4, c=3, depth=2, seed=0, theta=0.1, huber=False):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    uni = lambda *s: torch.rand(*s, generator=g, dtype=F64)  # noqa: E731
    kw = dict(q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D), theta=uni(B, T, H) * theta,
              eta=uni(B, T, H), alpha=uni(B, T, H) * 0.1, gamma=uni(B, T, H, c))  # fmt: skip
    kw["weights"] = [rnd(H, o, i) * 0.3 for o, i in memory_shapes(D, depth, 2.0)]
    if huber:
        kw.update(objective="huber", delta=uni(B, T, H) + 0.1)
    return kw


def _leaves(kw):
    for name in ("q", "k", "v", "theta", "eta", "alpha", "gamma", "delta"):
        if kw.get(name) is not None:
            kw[name] = kw[name].clone().requires_grad_()
    kw["weights"] = [w.clone().requires_grad_() for w in kw["weights"]]
    return [kw[n] for n in ("q", "k", "v", "theta", "eta", "alpha", "gamma", "delta") if kw.get(n) is not None] + kw["weights"]


@pytest.mark.parametrize(
    ("c", "chunk", "extra"),
    [(2, 4, {}), (3, 4, {"max_grad_norm": 0.3}), (6, 4, {}), (9, 3, {}), (4, 16, {}), (3, 1, {}),
     (3, 4, {"huber": True}), (3, 4, {"no_gates": True}), (5, 4, {"depth": 1})],
)  # fmt: skip
def test_chunk_equals_token_loop_with_every_gradient(c, chunk, extra):
    extra = dict(extra)
    no_gates = extra.pop("no_gates", False)
    mgn = extra.pop("max_grad_norm", None)
    kw = _inputs(c=c, **extra)
    if no_gates:
        kw.update(eta=None, alpha=None)
    leaves = _leaves(kw)
    yn, sn = naive_memory(**kw, chunk_size=chunk, max_grad_norm=mgn)
    yc, sc = chunk_memory(**kw, chunk_size=chunk, max_grad_norm=mgn)
    ya, sa = chunk_memory(**kw, chunk_size=chunk, max_grad_norm=mgn, backward="autograd")
    torch.testing.assert_close(yc, yn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ya, yn, rtol=1e-10, atol=1e-12)
    for a, b in zip(sc.weights, sn.weights):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert sc.window.valid == sn.window.valid == min(c - 1, 13)
    torch.testing.assert_close(sc.window.k, sn.window.k)

    def loss(y, s):
        mom = s.momentum or ()
        return (y**2).sum() + sum((w**2).sum() for w in (*s.weights, *mom))

    gn = torch.autograd.grad(loss(yn, sn), leaves)
    for y, s in ((yc, sc), (ya, sa)):
        for a, b in zip(torch.autograd.grad(loss(y, s), leaves), gn):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_a_window_of_one_is_the_titans_rule():
    kw = _inputs(c=1)
    ones = dict(kw, gamma=torch.ones_like(kw["gamma"]))
    plain = {k: v for k, v in kw.items() if k != "gamma"}
    for op in (naive_memory, chunk_memory):
        y0, s0 = op(**plain, chunk_size=4)
        y1, s1 = op(**ones, chunk_size=4)
        torch.testing.assert_close(y1, y0, rtol=0, atol=1e-14)
        assert s1.window is None


def test_the_update_sums_the_windows_gradients_by_hand():
    """A linear memory, no momentum, no decay, one chunk: W_t = W_0 - sum_{s<=t} theta_s sum_j
    gamma[s, j] u_{s-j}, with u_i = 2 (W_0 k_i - v_i) k_i^T: written out here, not through the ops."""
    kw = _inputs(B=1, T=6, H=1, D=3, c=3, depth=1)
    kw.update(eta=None, alpha=None)
    W0 = kw["weights"][0][0]
    k, v, th, gam = kw["k"][0, :, 0], kw["v"][0, :, 0], kw["theta"][0, :, 0], kw["gamma"][0, :, 0]
    u = [2 * torch.outer(W0 @ k[i] - v[i], k[i]) for i in range(6)]
    W, expected = W0.clone(), []
    for t in range(6):
        W = W - th[t] * sum(gam[t, j] * u[t - j] for j in range(3) if t - j >= 0)
        expected.append(W @ kw["q"][0, t, 0])
    for op in (naive_memory, chunk_memory):
        y, _ = op(**kw, chunk_size=8)
        torch.testing.assert_close(y[0, :, 0], torch.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cuts", [(5,), (1, 2, 3), (7, 1), (4, 4)])
def test_streaming_and_steps_continue_the_window_exactly(cuts):
    kw = _inputs(c=4, T=13)
    y_all, s_all = naive_memory(**kw, chunk_size=4, max_grad_norm=0.5)
    per_token = ("q", "k", "v", "theta", "eta", "alpha", "gamma")
    bounds = [0, *cuts, 13]
    bounds = sorted(set(b for b in bounds if b <= 13))
    ys, state = [], None
    for a, b in zip(bounds, bounds[1:]):
        part = {n: kw[n][:, a:b] for n in per_token}
        start = {"weights": kw["weights"]} if state is None else {"state": state}
        y, state = chunk_memory(**part, **start, chunk_size=4, max_grad_norm=0.5)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_all, rtol=1e-10, atol=1e-12)
    ys, state = [], None
    for t in range(13):
        part = {n: kw[n][:, t : t + 1] for n in per_token}
        start = {"weights": kw["weights"]} if state is None else {"state": state}
        y, state = step_memory(**part, **start, chunk_size=4, max_grad_norm=0.5)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_all, rtol=1e-10, atol=1e-12)
    for a, b in zip(state.weights, s_all.weights):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    moved = state.to(torch.float32).detach()
    assert moved.window.k.dtype == torch.float32 and moved.window.valid == 3


def test_bad_windows_are_refused_with_their_name():
    kw = _inputs(c=3, T=5)
    with pytest.raises(ValueError, match=r"gamma must have shape \[B, T, H, c\]"):
        chunk_memory(**dict(kw, gamma=kw["gamma"][:, :4]), chunk_size=4)
    with pytest.raises(ValueError, match="gamma .* must lie in"):
        chunk_memory(**dict(kw, gamma=kw["gamma"] + 1), chunk_size=4)
    with pytest.raises(Exception, match="gamma"):
        chunk_memory(**dict(kw, gamma=kw["gamma"].clone().fill_(float("nan"))), chunk_size=4)
    with pytest.raises(ValueError, match="do not combine"):
        chunk_memory(**kw, chunk_size=4, retention_q=3.0)
    _, state = chunk_memory(**kw, chunk_size=4)
    rest = {n: kw[n] for n in ("q", "k", "v", "theta", "eta", "alpha")}
    with pytest.raises(ValueError, match="pass gamma"):
        chunk_memory(**rest, state=state, chunk_size=4)
    with pytest.raises(ValueError, match="gamma asks for 4"):
        chunk_memory(**rest, gamma=torch.rand(*kw["gamma"].shape[:3], 4, dtype=F64), state=state, chunk_size=4)
    fresh = initial_memory_state(kw["weights"], 2, momentum=True, dtype=F64)
    assert isinstance(fresh, MemoryState) and fresh.window is None  # a fresh state starts a window
    y, _ = chunk_memory(**rest, gamma=kw["gamma"], state=fresh, chunk_size=4)
    torch.testing.assert_close(y, chunk_memory(**kw, chunk_size=4)[0])


def test_the_layer_and_config_carry_the_window():
    from titans.layers.neural_memory import NeuralMemory
    from titans.model import TitansConfig, TitansLM

    torch.manual_seed(0)
    layer = NeuralMemory(16, heads=2, chunk_size=4, window=4).double()
    x = torch.randn(2, 11, 16, dtype=F64)
    gamma = layer.window_gates(x)
    assert gamma.shape == (2, 11, 2, 4)
    torch.testing.assert_close(gamma.mean(), torch.tensor(0.25, dtype=F64), atol=0.02, rtol=0)  # starts at 1/window
    y, state = layer(x)
    assert state.memory.window.k.shape == (2, 2, 3, 8) and state.memory.window.valid == 3
    y1, s1 = layer(x[:, :5])
    y2, _ = layer(x[:, 5:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    step = layer.step_state(state, 2)  # one-token decoding carries the window as flat tensors
    assert step.window_k.shape == (4, 3, 8) and int(step.window_valid) == 3
    y3, s3 = layer(x[:, :1], state)
    y4, after = layer.step(x[:, :1], step)
    torch.testing.assert_close(y4, y3)
    back = layer.state_after_step(state, after)
    torch.testing.assert_close(back.memory.window.k, s3.memory.window.k)
    assert back.memory.window.valid == 3
    plain = NeuralMemory(16, heads=2, chunk_size=4).double()
    assert plain.to_gamma is None and plain.window_gates(x) is None
    with pytest.raises(ValueError, match="do not combine yet"):
        NeuralMemory(16, heads=2, window=3, retention_q=4.0)
    with pytest.raises(ValueError, match="do not combine yet"):
        TitansConfig(variant="mag", memory_window=3, memory_retention_q=4.0)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="window must be an integer"):
            NeuralMemory(16, heads=2, window=bad)
        with pytest.raises(ValueError, match="memory_window must be an integer"):
            TitansConfig(variant="mag", memory_window=bad)
    one = TitansLM(TitansConfig(variant="mag", vocab_size=32, dim=16, heads=2, memory_window=1))
    three = TitansLM(TitansConfig(variant="mag", vocab_size=32, dim=16, heads=2, memory_window=3))
    assert one.state_fingerprint() != three.state_fingerprint()  # a state fits only its own window
