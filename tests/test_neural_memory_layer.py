"""The NeuralMemory layer: streaming, causality, gradients to every parameter, ablations, errors."""

from __future__ import annotations

import random

import pytest
import torch
from _helpers import rel_rms

from titans.layers import NeuralMemory, NeuralMemoryState


def _layer(**kw):
    torch.manual_seed(0)
    opts = dict(dim=24, heads=2, depth=2, expansion=2.0, chunk_size=8)
    opts.update(kw)
    layer = NeuralMemory(**opts).double()
    if layer.gate_kernel:  # taps that read earlier tokens, so that a lost tail would show
        with torch.no_grad():
            layer.gate_conv.weight.normal_(std=0.5)
            layer.to_theta.weight.normal_(std=0.5)
    return layer


ABLATIONS = {
    "full": {},
    "linear memory": dict(depth=1),
    "no momentum": dict(momentum=False),
    "no forgetting": dict(forgetting=False),
    "no convolution": dict(conv_kernel=0),
    "residual memory, gelu, sigmoid lr": dict(residual=True, activation="gelu", theta_activation="sigmoid"),
    "no SiLU on queries and keys": dict(qk_activation="identity"),
    "gates read the last 3 tokens": dict(gate_kernel=3),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_streaming_equals_one_call(name):
    layer = _layer(**ABLATIONS[name])
    x = torch.randn(2, 45, 24, dtype=torch.float64)
    with torch.no_grad():
        y_full, s_full = layer(x)
        rng = random.Random(0)
        cuts = sorted(rng.sample(range(1, 45), 9)) + [45]
        ys, state, a = [], None, 0
        for b in [1, 2, 3] + [c for c in cuts if c > 3]:  # single tokens first, then pieces
            y, state = layer(x[:, a:b], state)
            ys.append(y)
            a = b
    assert rel_rms(torch.cat(ys, 1), y_full) < 1e-12
    assert state.memory.position == s_full.memory.position
    for u, w in zip(state.memory.weights, s_full.memory.weights):
        assert rel_rms(u, w) < 1e-12
    if state.conv is not None:
        assert rel_rms(state.conv, s_full.conv) < 1e-12
    assert (state.gate_conv is None) == (s_full.gate_conv is None) == ("gate_kernel" not in ABLATIONS[name])
    if state.gate_conv is not None:
        assert rel_rms(state.gate_conv, s_full.gate_conv) < 1e-12


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_parameter_gets_a_gradient(name):
    layer = _layer(**ABLATIONS[name])
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    y, _ = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    names = dict(layer.named_parameters())
    assert any(n.startswith("initial_weights") for n in names)
    assert "to_theta.weight" in names
    assert ("to_eta.weight" in names) == ABLATIONS[name].get("momentum", True)
    assert ("to_alpha.weight" in names) == ABLATIONS[name].get("forgetting", True)


def test_ablation_switches_shape_the_memory():
    assert len(_layer(depth=1).initial_weights) == 1
    assert _layer(depth=3).initial_weights[1].shape == (2, 24, 24)  # hidden = 2 x head dim 12
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    with torch.no_grad():
        assert _layer(momentum=False)(x)[1].memory.momentum is None
        assert _layer(conv_kernel=0)(x)[1].conv is None
        assert _layer(conv_kernel=4)(x)[1].conv.shape == (1, 3, 3 * 24)


def test_causal():
    layer = _layer()
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)[0]
        for t in (0, 7, 12, 30):
            x2 = x.clone()
            x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
            y2 = layer(x2)[0]
            assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
            assert not torch.equal(y[:, t + 1 :], y2[:, t + 1 :])


def test_batch_isolation():
    layer = _layer()
    x = torch.randn(3, 20, 24, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)[0]
        x2 = x.clone()
        x2[1] += 1.0
        y2 = layer(x2)[0]
    assert torch.equal(y[0], y2[0]) and torch.equal(y[2], y2[2])


def test_gate_initialisation():
    layer = _layer(theta_init=0.02, eta_init=0.8, alpha_init=0.005)
    x = torch.zeros(1, 3, 24, dtype=torch.float64)
    theta, eta, alpha = layer.gates(x)
    assert torch.allclose(theta, torch.full_like(theta, 0.02))
    assert torch.allclose(eta, torch.full_like(eta, 0.8))
    assert torch.allclose(alpha, torch.full_like(alpha, 0.005))
    s = _layer(theta_activation="sigmoid", max_lr=0.05, theta_init=0.01)
    assert torch.allclose(s.gates(x)[0], torch.full_like(theta, 0.01))


def test_gates_are_per_token_and_per_sequence():
    """Gates are never averaged over the batch or the chunk (a bug we saw in ports)."""
    layer = _layer()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    theta, eta, alpha = layer.gates(x)
    for g in (theta, eta, alpha):
        assert g.shape == (2, 10, 2)
        assert not torch.allclose(g[0], g[1]) and not torch.allclose(g[:, 0], g[:, 1])


def test_state_helpers():
    layer = _layer()
    x = torch.randn(2, 10, 24, dtype=torch.float64, requires_grad=True)
    _, s = layer(x)
    d = s.detach()
    assert all(not t.requires_grad for t in d.memory.tensors())
    assert d.to(torch.float32).memory.weights[0].dtype == torch.float32
    assert d.num_bytes() == s.num_bytes() > 0


def test_float32_module_runs_and_backprops():
    torch.manual_seed(0)
    layer = NeuralMemory(dim=32, heads=4, chunk_size=16)
    x = torch.randn(2, 100, 32)
    y, s = layer(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=24, heads=5), "must divide"),
        (dict(dim=24, chunk_size=0), "chunk_size"),
        (dict(dim=24, depth=0), "depth"),
        (dict(dim=24, activation="tanh"), "activation"),
        (dict(dim=24, theta_activation="exp"), "theta_activation"),
        (dict(dim=24, eta_init=1.0), "eta_init"),
        (dict(dim=24, conv_kernel=-1), "conv_kernel"),
        (dict(dim=24, qk_activation="tanh"), "qk_activation"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralMemory(**kwargs)


def test_bad_forward_inputs():
    layer = _layer()
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 5, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty time"):
        layer(torch.randn(2, 0, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        layer(torch.full((1, 3, 24), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, 3, 24, dtype=torch.long))
    _, s = layer(torch.randn(2, 5, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch size 2"):
        layer(torch.randn(3, 5, 24, dtype=torch.float64), s)
    with pytest.raises(TypeError, match="NeuralMemoryState"):
        layer(torch.randn(2, 5, 24, dtype=torch.float64), s.memory)
    assert isinstance(s, NeuralMemoryState)


def test_retrieve_reads_without_writing():
    """retrieve(x, W) is the memory's answer with fixed weights: equal to forward with theta = 0
    (no write) when started from the same weights, and streaming with its conv tail."""
    layer = _layer(momentum=False, forgetting=False)
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    with torch.no_grad():
        layer.to_theta.weight.zero_()
        layer.to_theta.bias.fill_(-1e4)  # softplus(-1e4) = 0: forward writes nothing
        y_fwd, _ = layer(x)
        W = layer.initial_weights_for(2)
        y_read, _ = layer.retrieve(x, W)
        assert rel_rms(y_read, y_fwd) < 1e-12
        y1, tail = layer.retrieve(x[:, :7], W)
        y2, _ = layer.retrieve(x[:, 7:], W, tail)
        assert rel_rms(torch.cat([y1, y2], 1), y_read) < 1e-12


@pytest.mark.parametrize("T", [1, 2, 5, 40])
@pytest.mark.parametrize("with_tail", [False, True])
def test_causal_depthwise_matches_conv1d(T, with_tail):
    """The shifted multiply-add convolution (and its hand-written backward) against F.conv1d on
    ``[tail || u]``, including pieces shorter than the kernel."""
    import torch.nn.functional as F

    from titans.layers.neural_memory import _causal_depthwise, _next_tail

    g = torch.Generator().manual_seed(T)
    u = torch.randn(2, T, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    tail = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True) if with_tail else None
    full = torch.cat([tail if with_tail else u.new_zeros(2, 3, 6), u], dim=1)
    ref = F.conv1d(full.transpose(1, 2), w, groups=6).transpose(1, 2)
    out = _causal_depthwise(u, tail, w)
    assert rel_rms(out, ref) < 1e-14
    assert torch.equal(_next_tail(u, tail, 4), full[:, -3:])
    probe = torch.randn(out.shape, dtype=torch.float64, generator=g)
    leaves = [u, w] + ([tail] if with_tail else [])
    for a, b in zip(torch.autograd.grad(out, leaves, probe), torch.autograd.grad(ref, leaves, probe)):
        assert rel_rms(a, b) < 1e-13


def _recall_at_init(associative: bool, qk_activation: str = "silu") -> tuple[float, float]:
    """Mean cosine between the untrained memory's answer at a key's second occurrence and the
    value written after its first occurrence (true), and other pairs' values (other)."""
    torch.manual_seed(0)
    layer = NeuralMemory(64, heads=2, chunk_size=4, theta_activation="sigmoid", max_lr=0.5,
                         theta_init=0.03, eta_init=0.5, alpha_init=1e-4, associative_init=associative,
                         qk_activation=qk_activation)  # fmt: skip
    with torch.no_grad():
        layer.initial_weights[-1].zero_()  # M_0 answers nothing: only the writes show
    vocab = torch.randn(40, 64)
    g = torch.Generator().manual_seed(1)
    filler = torch.randint(16, 40, (160,), generator=g)
    keys, vals = torch.arange(8), torch.arange(8, 16)
    ids = filler.clone()
    for i in range(8):  # pairs (key, value) in the first half, each key again in the second half
        ids[8 * i], ids[8 * i + 1] = keys[i], vals[i]
        ids[100 + 6 * i] = keys[(i * 3) % 8]
    x = vocab[ids][None]  # (1, T, dim)
    with torch.no_grad():
        y, _ = layer.memorize(x)  # (1, T, H, D)
        qkv, _ = layer._conv(layer.to_qkv(x), None)
        v = torch.nn.functional.silu(qkv)[..., 128:].view(1, -1, 2, 32)
    true, other = [], []
    for i in range(8):
        at, key = 100 + 6 * i, (i * 3) % 8
        cos = torch.nn.functional.cosine_similarity(y[0, at].flatten()[None], v[0, 8 * torch.arange(8) + 1].flatten(1))
        true.append(cos[key].item())
        other.append(torch.cat([cos[:key], cos[key + 1 :]]).mean().item())
    return sum(true) / 8, sum(other) / 8


def test_associative_init_reads_back_what_followed():
    true, other = _recall_at_init(associative=True)
    assert true > 0.15 and true > other + 0.15, (true, other)
    true, other = _recall_at_init(associative=False)  # the default init has no such structure
    assert true < 0.1, (true, other)


def test_keys_without_silu_recall_the_asked_key_better_at_init():
    """SiLU leaves every key in one cone (cosine ~0.7 after normalisation): the answer at a key
    blends the other pairs' values in. Without it, they bleed in far less."""
    true_silu, other_silu = _recall_at_init(associative=True)
    true_id, other_id = _recall_at_init(associative=True, qk_activation="identity")
    seen = (true_id, other_id, true_silu, other_silu)  # measured: 0.33, 0.03 / 0.36, 0.14
    assert other_id < 0.5 * other_silu and true_id - other_id > true_silu - other_silu + 0.05, seen


def test_associative_init_layout_and_finite_gradients():
    layer = NeuralMemory(32, heads=2, chunk_size=4, associative_init=True)
    inner = 32
    w, taps = layer.to_qkv.weight, layer.conv.weight
    assert torch.equal(w[inner : 2 * inner], w[:inner])
    assert (taps[:inner, 0, -1] > 0.9).all() and (taps[inner : 2 * inner, 0, -2] > 0.9).all()
    assert (taps[2 * inner :, 0, -1] > 0.9).all() and taps.abs().min() > 0  # no exactly-zero tap
    layer.reset_parameters()  # idempotent: re-initialises, does not shift twice
    # once: 1 + tap / 10 with |tap| <= 1/sqrt(K) = 0.5; applied twice it would be ~1.1
    assert (layer.conv.weight[:inner, 0, -1] <= 1.0 + 0.1 * 0.5 + 1e-6).all()
    x = torch.randn(2, 24, 32, requires_grad=True)
    y, _ = layer(x)
    y.square().sum().backward()
    grads = [p.grad for p in layer.parameters()] + [x.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert layer.conv.weight.grad.norm() < 1e3  # a zero key's normalisation would give ~1e10


def test_associative_init_needs_a_convolution():
    with pytest.raises(ValueError, match="associative_init.*conv_kernel"):
        NeuralMemory(32, heads=2, conv_kernel=0, associative_init=True)


def test_l2_normalize_matches_f_normalize():
    """The layer's q/k normalisation (one autograd node) against ``F.normalize``: values and
    gradients in float64, rows of norm 0 and below F.normalize's 1e-12 clamp included, and a
    gradcheck of the node itself."""
    import torch.nn.functional as F

    from titans.layers.neural_memory import l2_normalize

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 4, 8, dtype=torch.float64, generator=g)
    x[0, 0, 0] = 0.0
    x[0, 1, 1] *= 1e-14
    x.requires_grad_(True)
    gy = torch.randn(x.shape, dtype=torch.float64, generator=g)
    ours, ref = l2_normalize(x), F.normalize(x, dim=-1)
    assert torch.allclose(ours, ref, rtol=1e-14, atol=1e-15)
    g_ours, g_ref = (torch.autograd.grad(y, x, gy)[0] for y in (ours, ref))
    assert torch.allclose(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the path without a node computes the same values
        assert torch.equal(l2_normalize(x), ours.detach())
    x2 = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (x2,))
    # bit for bit in the training dtypes, tiny float16 rows included (eps rounds to 0 there)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x3 = torch.randn(64, 4, 16, generator=g).to(dtype)
        x3[0, 0] = 1e-6
        assert torch.equal(l2_normalize(x3), F.normalize(x3, dim=-1)), dtype


@pytest.mark.parametrize("rule", ["titans", "moneta", "yaad", "memora"])
@pytest.mark.parametrize("first", [8, 6])  # the state at a chunk start, and 2 tokens into a chunk of 4
def test_a_read_without_writes_answers_what_the_memory_answers(rule, first):
    """``read(read_weights(state))`` (the MAC's M*) reads the memory the writes read: once writes
    stop moving it (theta, eta ~ 0 after ``first`` tokens), the layer's answers equal that read, also
    mid-chunk, where Moneta's reads divide the running accumulator by its chunk-start scale."""
    from titans.layers import NeuralMemory

    torch.manual_seed(0)
    layer = NeuralMemory.from_rule(rule, 32, heads=2, chunk_size=4, conv_kernel=0, forgetting=False).double()
    x = torch.randn(2, first + 2, 32, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.initial_weights:
            p.mul_(3.0)  # far from a normalised memory, so a wrongly scaled read differs
        layer.to_theta.bias.fill_(5.0)  # strong writes for the first tokens
        _, state = layer(x[:, :first])
        layer.to_theta.bias.fill_(-60.0)  # then none: the answers read the memory as it is
        if layer.to_eta is not None:
            layer.to_eta.bias.fill_(-60.0)  # and no momentum carrying the earlier writes on
        y, _ = layer(x[:, first:], state)
        read, _ = layer.retrieve(x[:, first:], layer.read_weights(state, 2))
        assert torch.allclose(y, read, atol=1e-9), (y - read).abs().max()
        y0, _ = layer(x[:, first:])
        read0, _ = layer.retrieve(x[:, first:], layer.read_weights(None, 2))
        assert torch.allclose(y0, read0, atol=1e-9)


def test_gates_over_context_start_as_the_token_gates():
    """gate_kernel's convolution starts at the current token: an untrained layer with it computes
    what the same weights compute without it, and training then moves its taps."""
    plain, wide = _layer(), _layer(gate_kernel=4)
    wide.reset_gate_taps()
    missing, unexpected = wide.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["gate_conv.weight"] and not unexpected
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    y0, _ = plain(x)
    y1, s1 = wide(x)
    assert torch.equal(y0, y1)
    assert s1.gate_conv.shape == (2, 3, 24)
    (y1 * torch.randn_like(y1)).sum().backward()
    assert wide.gate_conv.weight.grad[:, 0, :-1].abs().sum() > 0  # the earlier taps learn too


def test_gates_over_context_read_earlier_tokens():
    layer = _layer(gate_kernel=3)
    with torch.no_grad():
        layer.gate_conv.weight.normal_()
    x = torch.randn(1, 12, 24, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5] += 1.0
    g, g2 = layer.gates(layer.gate_inputs(x, None)[0])[0], layer.gates(layer.gate_inputs(x2, None)[0])[0]
    changed = (g - g2).abs().amax(-1)[0] > 0
    assert changed.tolist() == [t in (5, 6, 7) for t in range(12)]  # the token and the two after it


def test_a_state_without_the_gates_tail_is_refused():
    from titans.errors import StateMismatchError

    x = torch.randn(2, 10, 24, dtype=torch.float64)
    _, plain_state = _layer()(x)
    _, wide_state = _layer(gate_kernel=3)(x)
    with pytest.raises(StateMismatchError, match="gates' convolution.*gate_kernel=3"):
        _layer(gate_kernel=3)(x, plain_state)
    with pytest.raises(StateMismatchError, match="gates' convolution.*gate_kernel=0"):
        _layer()(x, wide_state)
    with pytest.raises(StateMismatchError, match=r"gates' convolution.*\(2, 3, 24\)"):
        _layer(gate_kernel=4)(x, wide_state)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3", 2**11])
def test_gate_kernel_must_be_a_small_integer(bad):
    with pytest.raises(ValueError, match="gate_kernel must be an integer"):
        _layer(gate_kernel=bad)
