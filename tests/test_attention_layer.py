"""The Attention layer: every kind against the masked-softmax reference, streaming with the cache
equal to one call, causality, constant cache size for windows and segments, errors."""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_rms

from titans.layers.attention import Attention
from titans.ops.attention import apply_rotary, attention_reference

KW = {
    "full": dict(kind="full"),
    "full+persistent": dict(kind="full", persistent_tokens=3),
    "swa": dict(kind="swa", window=5),
    "swa+persistent": dict(kind="swa", window=7, persistent_tokens=2),
    "segment": dict(kind="segment", segment=6),
    "segment+persistent": dict(kind="segment", segment=6, persistent_tokens=4),
}


def _layer(name):
    torch.manual_seed(0)
    return Attention(dim=16, heads=2, **KW[name]).double()


def _inputs(T=23, B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 16, generator=g, dtype=torch.float64)
    h = torch.randn(B, T, 16, generator=g, dtype=torch.float64)
    return x, h


def _reference(layer: Attention, x, h):
    """Explicit masked softmax over [persistent || memory tokens || tokens] with a full mask."""
    B, T, _ = x.shape
    pos = torch.arange(T)
    q = apply_rotary(layer.split_heads(layer.to_q(x)), pos)
    k = apply_rotary(layer.split_heads(layer.to_k(x)), pos)
    v = layer.split_heads(layer.to_v(x))
    i, j = pos[:, None], pos[None, :]
    if layer.kind == "full":
        vis = j <= i
    elif layer.kind == "swa":
        vis = (j <= i) & (j > i - layer.window)
    else:
        vis = (j <= i) & (j // layer.segment == i // layer.segment)
    keys, vals, masks = [k], [v], [vis]
    if layer.kind == "segment":
        keys.insert(0, apply_rotary(layer.split_heads(layer.to_k(h)), pos))
        vals.insert(0, layer.split_heads(layer.to_v(h)))
        masks.insert(0, vis)
    if layer.persistent is not None:
        pk, pv = layer.prefix_keys(x.dtype)
        keys.insert(0, pk.expand(B, -1, -1, -1))
        vals.insert(0, pv.expand(B, -1, -1, -1))
        masks.insert(0, torch.ones(T, pk.shape[1], dtype=torch.bool))
    out = attention_reference(q, torch.cat(keys, 1), torch.cat(vals, 1), torch.cat(masks, 1))
    return layer.to_out(out.reshape(B, T, -1))


@pytest.mark.parametrize("name", list(KW))
def test_matches_reference(name):
    layer = _layer(name)
    x, h = _inputs()
    mem = h if layer.kind == "segment" else None
    with torch.no_grad():
        y, _ = layer(x, memory_tokens=mem)
        assert rel_rms(y, _reference(layer, x, h)) < 1e-12


@pytest.mark.parametrize("name", list(KW))
def test_streaming_equals_one_call(name):
    layer = _layer(name)
    x, h = _inputs(T=29)
    seg = layer.kind == "segment"
    with torch.no_grad():
        y_full, _ = layer(x, memory_tokens=h if seg else None)
        ys, cache, a = [], None, 0
        for b in [1, 2, 3, 9, 10, 17, 29]:  # single tokens and pieces across windows/segments
            y, cache = layer(x[:, a:b], cache, memory_tokens=h[:, a:b] if seg else None)
            ys.append(y)
            a = b
    assert rel_rms(torch.cat(ys, 1), y_full) < 1e-12
    assert cache.position == 29


@pytest.mark.parametrize("name", list(KW))
def test_causal(name):
    layer = _layer(name)
    x, h = _inputs()
    seg = layer.kind == "segment"
    with torch.no_grad():
        y = layer(x, memory_tokens=h if seg else None)[0]
        x2, h2 = x.clone(), h.clone()
        x2[:, 11:] += 1.0
        h2[:, 11:] -= 1.0
        y2 = layer(x2, memory_tokens=h2 if seg else None)[0]
    assert torch.equal(y[:, :11], y2[:, :11])
    assert not torch.equal(y[:, 11:], y2[:, 11:])


@pytest.mark.parametrize("name", ["swa", "segment+persistent"])
def test_cache_size_is_constant(name):
    layer = _layer(name)
    seg = layer.kind == "segment"
    sizes = []
    with torch.no_grad():
        cache = None
        for t in range(40):
            x, h = _inputs(T=1)
            _, cache = layer(x, cache, memory_tokens=h if seg else None)
            sizes.append(cache.num_bytes())
    assert max(sizes[10:]) <= max(sizes[:10])


def test_every_parameter_gets_a_gradient():
    layer = _layer("segment+persistent")
    x, h = _inputs()
    y, _ = layer(x, memory_tokens=h)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="local"), "kind"),
        (dict(kind="swa"), "window"),
        (dict(kind="swa", window=0), "window"),
        (dict(kind="segment", segment=0), "segment"),
        (dict(heads=3), "divide"),
        (dict(persistent_tokens=-1), "persistent_tokens"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(dim=16, **{"heads": 2, **kwargs})


def test_bad_forward():
    layer = _layer("segment")
    x, h = _inputs()
    with pytest.raises(ValueError, match="memory_tokens are required"):
        layer(x)
    with pytest.raises(ValueError, match="shape"):
        layer(x[..., :5], memory_tokens=h[..., :5])
    with pytest.raises(ValueError, match="empty time"):
        layer(x[:, :0], memory_tokens=h[:, :0])


@pytest.mark.parametrize("name", ["segment", "segment+persistent"])
@pytest.mark.parametrize("T", [6, 4])  # a whole segment and the start of one
def test_fresh_segment_path_matches_general_path(name, T):
    """A call that starts a segment takes ``_fresh_segment`` (one block, cached mask): same outputs,
    gradients and cache as ``segment_attention`` (the general path, with its padding and cache
    concatenation) on the same projections."""
    from titans.ops.attention import segment_attention

    layer = _layer(name)
    x, h = (t.requires_grad_() for t in _inputs(T=T))
    y, cache = layer(x, memory_tokens=h)
    q, k, v = layer.project(x, 0)
    hk, hv = layer.keys(h, torch.arange(T))
    pk, pv = layer.prefix_keys(x.dtype)
    out = segment_attention(q, k, v, hk, hv, segment=layer.segment, prefix_k=pk, prefix_v=pv)
    ref = layer.to_out(out.reshape(2, T, -1))
    assert rel_rms(y, ref) < 1e-13
    params = [x, h, *layer.parameters()]
    got = torch.autograd.grad(y.square().sum(), params)
    want = torch.autograd.grad(ref.square().sum(), params)
    for g, w in zip(got, want):
        assert rel_rms(g, w) < 1e-12
    keep = T % layer.segment
    assert cache.position == T and cache.k.shape[1] == keep
    for got_t, want_t in ((cache.k, k), (cache.v, v), (cache.mem_k, hk), (cache.mem_v, hv)):
        assert torch.equal(got_t, want_t[:, T - keep :])
        assert got_t._base is None  # a copy: a kept state must not pin the whole projection
