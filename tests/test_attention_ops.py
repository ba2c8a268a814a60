"""Fast attention paths against the explicit masked-softmax reference, with and without caches."""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_rms

from titans.ops.attention import (
    apply_rotary,
    attention_reference,
    causal_attention,
    segment_attention,
    sliding_window_attention,
)


def _qkv(B=2, T=37, H=2, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=dtype) for _ in range(3)]


def _swa_mask(T, Tk, window, n_prefix):
    past = Tk - T
    p = torch.arange(past, Tk)[:, None]
    c = torch.arange(Tk)[None, :]
    mask = (c <= p) & (c > p - window)
    return torch.cat([torch.ones(T, n_prefix, dtype=torch.bool), mask], -1)


@pytest.mark.parametrize("T, past", [(37, 0), (1, 20), (16, 5), (40, 40)])
def test_causal_attention(T, past):
    q, _, _ = _qkv(T=T)
    _, k, v = _qkv(T=T + past, seed=1)
    mask = torch.arange(T + past)[None, :] <= torch.arange(past, past + T)[:, None]
    ref = attention_reference(q, k, v, mask)
    assert rel_rms(causal_attention(q, k, v, query_block=7), ref) < 1e-12


@pytest.mark.parametrize("window", [1, 4, 16, 100])
@pytest.mark.parametrize("T, past", [(37, 0), (1, 9), (20, 3), (5, 30)])
@pytest.mark.parametrize("n_prefix", [0, 3])
def test_sliding_window_attention(window, T, past, n_prefix):
    q, _, _ = _qkv(T=T)
    _, k, v = _qkv(T=T + past, seed=1)
    pk, pv = (_qkv(B=1, T=n_prefix, seed=2)[:2]) if n_prefix else (None, None)
    out = sliding_window_attention(q, k, v, window=window, prefix_k=pk, prefix_v=pv)
    kk = torch.cat([pk.expand(2, -1, -1, -1), k], 1) if n_prefix else k
    vv = torch.cat([pv.expand(2, -1, -1, -1), v], 1) if n_prefix else v
    ref = attention_reference(q, kk, vv, _swa_mask(T, T + past, window, n_prefix))
    assert out.shape == q.shape
    assert rel_rms(out, ref) < 1e-12


def _segment_mask(T, segment, n_prefix, offset):
    """Reference mask over [prefix, memory tokens (all positions), tokens (all positions)]."""
    total = offset + T
    pos = torch.arange(offset, total)[:, None]
    key = torch.arange(total)[None, :]
    same = (key // segment) == (pos // segment)
    vis = same & (key <= pos)
    return torch.cat([torch.ones(T, n_prefix, dtype=torch.bool), vis, vis], -1)


@pytest.mark.parametrize("segment", [1, 4, 16])
@pytest.mark.parametrize("T, offset", [(37, 0), (1, 3), (9, 2)])
@pytest.mark.parametrize("n_prefix", [0, 2])
def test_segment_attention(segment, T, offset, n_prefix):
    offset = offset % segment
    q, _, _ = _qkv(T=T)
    _, k, v = _qkv(T=T + offset, seed=1)
    hk, hv, _ = _qkv(T=T + offset, seed=3)
    pk, pv = (_qkv(B=1, T=n_prefix, seed=2)[:2]) if n_prefix else (None, None)
    out = segment_attention(q, k, v, hk, hv, segment=segment, offset=offset, prefix_k=pk, prefix_v=pv)
    parts_k = ([pk.expand(2, -1, -1, -1)] if n_prefix else []) + [hk, k]
    parts_v = ([pv.expand(2, -1, -1, -1)] if n_prefix else []) + [hv, v]
    ref = attention_reference(q, torch.cat(parts_k, 1), torch.cat(parts_v, 1), _segment_mask(T, segment, n_prefix, offset))
    assert rel_rms(out, ref) < 1e-12


def test_segment_attention_streaming_equals_one_call():
    q, k, v = _qkv(T=30)
    hk, hv, _ = _qkv(T=30, seed=5)
    full = segment_attention(q, k, v, hk, hv, segment=8)
    outs, start = [], 0
    for stop in (3, 8, 9, 21, 30):  # pieces crossing segment boundaries
        seg_start = (start // 8) * 8
        off = start - seg_start
        outs.append(segment_attention(q[:, start:stop], k[:, seg_start:stop], v[:, seg_start:stop],
                                      hk[:, seg_start:stop], hv[:, seg_start:stop], segment=8, offset=off))  # fmt: skip
        start = stop
    assert rel_rms(torch.cat(outs, 1), full) < 1e-12


def test_rotary_is_relative_and_exact_far_out():
    q, k, _ = _qkv(B=1, T=1, H=1, D=16)
    for base_pos in (0, 1000, 2_000_000):
        a = apply_rotary(q, torch.tensor([base_pos + 7]))
        b = apply_rotary(k, torch.tensor([base_pos + 3]))
        score = (a * b).sum()
        if base_pos == 0:
            ref = score
        assert abs(score - ref) < 1e-9  # depends only on the distance 4
    with pytest.raises(ValueError, match="even head dim"):
        apply_rotary(torch.zeros(1, 2, 1, 3), torch.arange(2))


def test_bad_arguments():
    q, k, v = _qkv(T=5)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="more queries"):
        causal_attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="offset"):
        segment_attention(q, k, v, k, v, segment=4, offset=5)
