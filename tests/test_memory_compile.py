"""The torch.compile'd chunk path gives the eager numbers (slow: compiling takes a while on CPU)."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_inputs, probe_loss, rel_rms

from titans.ops.memory import chunk_memory

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("product_dtype", "memora"), [(None, False), (torch.bfloat16, False), (None, True)])
def test_compiled_chunk_path_matches_eager(product_dtype, memora):
    """float32 products to float32 rounding; bf16 products (the compiled graph fuses and orders its
    roundings differently) to bf16's; Memora's lag tokens between the compiled chunks."""
    kw, leaves = make_inputs(T=40, D=8, depth=2, dtype=torch.float32, requires_grad=True, seed=31, momentum=not memora)
    tol_y, tol_g = (1e-5, 1e-4) if product_dtype is None else (2e-2, 3e-2)
    opts = dict(chunk_size=16, product_dtype=product_dtype)  # 16 + 16 + a partial 8
    if memora:
        opts["retention_kl"] = 1.0
    results = []
    for compiled in (False, True):
        y, s = chunk_memory(**kw, **opts, compile=compiled)
        loss = probe_loss(y) + sum(probe_loss(t) for t in s.tensors())
        results.append((y, s, torch.autograd.grad(loss, leaves)))
    (y0, s0, g0), (y1, s1, g1) = results
    assert rel_rms(y1, y0) < tol_y
    for a, b in zip(s1.tensors(), s0.tensors()):
        assert a.dtype == b.dtype == torch.float32
        assert rel_rms(a, b) < tol_y
    for a, b in zip(g1, g0):
        assert rel_rms(a, b) < tol_g
    with torch.no_grad():
        assert rel_rms(chunk_memory(**kw, **opts, compile=True)[0], y0) < tol_y



def test_model_with_compiled_memory_trains_like_eager():
    """TitansLM.set_memory_compile: a MAC's loss and every parameter gradient match eager mode."""
    from titans.model import TitansConfig, TitansLM

    torch.manual_seed(0)
    cfg = TitansConfig(variant="mac", vocab_size=61, dim=32, depth=2, heads=2, window=8, segment=8,
                       memory_chunk=4, persistent_tokens=2, memory_expansion=2.0)  # fmt: skip
    model = TitansLM(cfg)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        model.set_memory_compile(compiled)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert rel_rms(l1, l0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_rms(a, b) < 1e-4

def test_compiled_inference_groups_chunks_like_eager(monkeypatch):
    """Without gradients, the compiled path runs fresh full chunks in groups (one compiled call
    each): outputs and state equal the eager chunk loop, with a state entering mid-chunk and a
    tail of chunks too short for a group."""
    import titans.ops.memory.chunk as chunk_mod

    monkeypatch.setattr(chunk_mod, "_GROUP", 3)  # a small group keeps the compile short
    groups, length = [], chunk_mod._group_length
    monkeypatch.setattr(chunk_mod, "_group_length", lambda *a: groups.append(length(*a)) or groups[-1])
    kw, _ = make_inputs(T=29, D=8, depth=2, dtype=torch.float32, seed=32)
    head = {k: (v[:, :3] if k in ("q", "k", "v", "theta", "eta", "alpha") else v) for k, v in kw.items()}
    tail = {k: v[:, 3:] for k, v in kw.items() if k in ("q", "k", "v", "theta", "eta", "alpha")}
    with torch.no_grad():
        y0, s0 = chunk_memory(**kw, chunk_size=4)
        ya, sa = chunk_memory(**head, chunk_size=4, compile=True)
        yb, sb = chunk_memory(**tail, state=sa, chunk_size=4, compile=True)  # 1 token, 3 + 3 chunks, 1 token
    assert rel_rms(torch.cat([ya, yb], 1), y0) < 1e-5
    for a, b in zip(sb.tensors(), s0.tensors()):
        assert rel_rms(a, b) < 1e-5
    assert sb.position == s0.position
    assert groups.count(3) == 2  # both groups ran


@pytest.mark.parametrize("extra", [{}, {"memory_retention_kl": 1.0, "memory_momentum": False}, {"memory_muon_steps": 3}],
                         ids=["titans", "memora", "muon"])  # fmt: skip
def test_compiled_mac_segments_stream_like_eager(monkeypatch, extra):
    """TitansLM.set_memory_compile under inference: MAC's whole segments run as one compiled graph
    each (MACBlock._segment_step, shared by both blocks); logits and memory state match eager."""
    import titans.blocks.mac as mac_mod
    from titans.model import TitansConfig, TitansLM

    calls, compiled_step = [], mac_mod._segment_step_compiled
    monkeypatch.setattr(mac_mod, "_segment_step_compiled", lambda *a: calls.append(1) or compiled_step(*a))

    torch.manual_seed(0)
    cfg = TitansConfig(variant="mac", vocab_size=61, dim=32, depth=2, heads=2, window=8, segment=8,
                       memory_chunk=4, persistent_tokens=2, memory_expansion=2.0, **extra)  # fmt: skip
    model = TitansLM(cfg).eval()
    ids = torch.randint(0, 61, (2, 45), generator=torch.Generator().manual_seed(1))
    results = []
    with torch.inference_mode():
        for compiled in (False, True):
            model.set_memory_compile(compiled)
            out, state, a = [], None, 0
            for b in (3, 27, 45):
                logits, _, state = model(ids[:, a:b], state=state)
                out.append(logits)
                a = b
            results.append((torch.cat(out, 1), state))
    (l0, s0), (l1, s1) = results
    assert len(calls) == 2 * 3  # blocks x whole segments with a state: [8, 16), [16, 24), [32, 40)
    assert rel_rms(l1, l0) < 1e-5
    for a, b in zip(s1.layers, s0.layers):
        for x, y in zip(a.memory.memory.tensors(), b.memory.memory.tensors()):
            assert rel_rms(x, y) < 1e-5


@pytest.mark.parametrize(("variant", "extra"), [("mac", {}), ("mag", {}), ("mal", {}), ("lmm", {}),
                                              ("mag", {"memory_window": 3, "memory_feature_degree": 2}),
                                              ("mac", {"memory_retention_kl": 1.0, "memory_momentum": False}),
                                              ("lmm", {"memory_muon_steps": 5, "memory_window": 3,
                                                       "memory_theta_init": 0.05})])  # fmt: skip
def test_compiled_decode_step_matches_eager_without_recompiling(variant, extra):
    """TitansLM.set_memory_compile: the one-token decode step runs as one compiled graph that
    serves every token of a stream (across segment, window and memory-chunk boundaries, from a
    prefill whose tails are slices) with no recompilation, and gives the eager step's logits and
    state."""
    from titans.model import TitansConfig, TitansLM

    torch.manual_seed(0)
    cfg = TitansConfig(variant=variant, vocab_size=61, dim=32, depth=2, heads=2, window=8, segment=8,
                       memory_chunk=4, persistent_tokens=2, memory_expansion=2.0, **extra)  # fmt: skip
    model = TitansLM(cfg).eval()
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    results = []
    with torch.no_grad():
        for compiled in (False, True):
            model.set_memory_compile(compiled)
            state = model(ids[:, :13])[2]
            out = [model(ids[:, 13:14], state=state)]  # the compiled run compiles here
            state = out[0][2]
            with torch._dynamo.config.patch(error_on_recompile=True):
                for t in range(14, 40):
                    out.append(model(ids[:, t : t + 1], state=state))
                    state = out[-1][2]
            results.append((torch.cat([o[0] for o in out], 1), state))
    (l0, s0), (l1, s1) = results
    assert rel_rms(l1, l0) < 1e-5
    for a, b in zip(s1.layers, s0.layers):
        for x, y in zip(a.memory.memory.tensors(), b.memory.memory.tensors()):
            assert rel_rms(x, y) < 1e-5
