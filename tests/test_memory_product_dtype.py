"""Low-precision chunk products (``chunk_memory(product_dtype=torch.bfloat16)``): every matrix
product inside a chunk runs in bf16 / fp16 while the recurrent state, its gradients and the gates'
decays stay float32. Checked against the float64 token loop (outputs, final state, every
gradient) at the tolerance the 16-bit format allows, and against the properties that must not
degrade with it: decays kept in full precision, no drift over a long stream, the layer and the
model switch."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_inputs, probe_loss, rel_rms, state_tensors

from titans.layers import NeuralMemory
from titans.model import TitansConfig, TitansLM
from titans.ops.memory import chunk_memory, naive_memory

# Relative-RMS bounds against the float64 reference: bf16 keeps 8 mantissa bits, fp16 11.
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _to32(kw: dict) -> dict:
    return {k: (None if v is None else v.float() if torch.is_tensor(v) else [w.float() for w in v]) for k, v in kw.items()}


def _all_probe(y, state) -> torch.Tensor:
    return probe_loss(y) + sum(probe_loss(t) for t in state.tensors())


@pytest.mark.parametrize("product_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("momentum,forgetting,residual,clip", [
    (True, True, False, None), (True, True, True, 1.0), (False, True, False, None), (True, False, True, None),
    (False, False, False, 1.0),
])  # fmt: skip
def test_low_precision_products_match_the_float64_loop(product_dtype, depth, momentum, forgetting, residual, clip):
    """Outputs, final state and the gradients of both (q, k, v, every gate, the initial weights),
    with the state entered mid-chunk by a first call (gradient weights != running weights)."""
    kw64, leaves64 = make_inputs(B=2, T=70, H=2, D=16, depth=depth, momentum=momentum, forgetting=forgetting,
                                 requires_grad=True, seed=depth)  # fmt: skip
    opts = dict(chunk_size=16, residual=residual, max_grad_norm=clip)
    y_ref, s_ref = naive_memory(**kw64, **opts)
    g_ref = torch.autograd.grad(_all_probe(y_ref, s_ref), leaves64)

    kw = _to32({k: (v.detach() if torch.is_tensor(v) else ([w.detach() for w in v] if v is not None else None))
                for k, v in kw64.items()})  # fmt: skip
    leaves = [t for t in (kw["q"], kw["k"], kw["v"], kw["theta"], kw["eta"], kw["alpha"]) if t is not None] + kw["weights"]
    for t in leaves:
        t.requires_grad_(True)
    weights = kw.pop("weights")
    head = {k: (None if v is None else v[:, :5]) for k, v in kw.items()}
    tail = {k: (None if v is None else v[:, 5:]) for k, v in kw.items()}
    y1, s = chunk_memory(**head, weights=weights, product_dtype=product_dtype, **opts)
    y2, s = chunk_memory(**tail, state=s, product_dtype=product_dtype, **opts)
    y = torch.cat([y1, y2], 1)
    assert y.dtype == torch.float32 and all(t.dtype == torch.float32 for t in state_tensors(s))
    g = torch.autograd.grad(_all_probe(y, s), leaves)

    tol = TOL[product_dtype]
    errors = [rel_rms(y, y_ref)] + [rel_rms(a, b) for a, b in zip(state_tensors(s), state_tensors(s_ref))]
    errors += [rel_rms(a, b) for a, b in zip(g, g_ref)]
    assert max(errors) < tol, f"errors {['%.1e' % e for e in errors]} (bound {tol:.0e})"
    # The products did run in 16 bits: float32 products agree with the loop to ~1e-6.
    assert rel_rms(y, y_ref) > 1e-5


def test_low_precision_products_keep_the_decays_in_float32():
    """With nothing written (theta = 0) the weights only decay: (1 - 1e-6)^4096 = 0.9959. A
    decay rounded to bf16 is exactly 1 and would keep W0 unchanged."""
    kw, _ = make_inputs(B=1, T=4096, H=1, D=8, depth=2, dtype=torch.float32, seed=3)
    kw["theta"] = torch.zeros_like(kw["theta"])
    kw["alpha"] = torch.full_like(kw["alpha"], 1e-6)
    _, s = chunk_memory(**kw, chunk_size=64, product_dtype=torch.bfloat16)
    _, s32 = chunk_memory(**kw, chunk_size=64)
    for w, w32, w0 in zip(s.weights, s32.weights, kw["weights"]):
        assert rel_rms(w, w32) < 1e-6  # the same float32 decays
        assert abs(rel_rms(w, w0) - (1 - (1 - 1e-6) ** 4096)) < 2e-4  # and they did decay


def test_low_precision_stream_does_not_drift():
    """Over 128 chunks the state's error against float32 products stays at the 16-bit level and
    grows no faster than a random walk of per-chunk roundings (the state accumulates in float32;
    only each chunk's update is rounded): 8x the chunks, under 4x the error."""
    kw, _ = make_inputs(B=1, T=2048, H=2, D=16, depth=2, dtype=torch.float32, seed=5)
    kw["theta"] = kw["theta"] * 0.2
    kw["alpha"] = kw["alpha"] * 0.01
    errs = []
    for T in (256, 2048):
        part = {k: (v[:, :T] if torch.is_tensor(v) and k != "weights" else v) for k, v in kw.items()}
        y32, s32 = chunk_memory(**part, chunk_size=16)
        y16, s16 = chunk_memory(**part, chunk_size=16, product_dtype=torch.bfloat16)
        errs.append(max(rel_rms(a, b) for a, b in zip(state_tensors(s16), state_tensors(s32))))
    assert errs[1] < 2e-2 and errs[1] < 4 * errs[0] + 1e-3, f"state error at 256 / 2048 tokens: {errs}"


def test_product_dtype_errors_name_the_problem():
    kw, _ = make_inputs(T=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="product_dtype"):
        chunk_memory(**kw, product_dtype=torch.int8)
    kw64, _ = make_inputs(T=8)
    with pytest.raises(ValueError, match="float64"):
        chunk_memory(**kw64, product_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="product_dtype"):
        NeuralMemory(32, heads=2, product_dtype="int8")
    with pytest.raises(ValueError, match="memory_product_dtype"):
        TitansConfig.preset("tiny", memory_product_dtype="half-ish")


def test_layer_and_model_switch():
    """NeuralMemory(product_dtype="bf16") gives the float32 layer's outputs to bf16 precision and
    gradients to every parameter; a model with memory_product_dtype trains (finite loss, every
    memory parameter reached), also under bf16 autocast."""
    torch.manual_seed(0)
    ref = NeuralMemory(64, heads=2, depth=2, chunk_size=16)
    low = NeuralMemory(64, heads=2, depth=2, chunk_size=16, product_dtype="bf16")
    low.load_state_dict(ref.state_dict())
    x = torch.randn(2, 100, 64)
    y_ref, s_ref = ref(x)
    y, s = low(x)
    assert y.dtype == torch.float32 and 1e-5 < rel_rms(y, y_ref) < 3e-2
    y.square().sum().backward()
    missing = [n for n, p in low.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"

    cfg = TitansConfig.preset("tiny", variant="mag", memory_product_dtype="bfloat16")
    model = TitansLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 96))
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss, _ = model(ids, labels=ids)
        loss.backward()
        assert torch.isfinite(loss)
        memory_grads = [p.grad for n, p in model.named_parameters() if ".memory." in n]
        assert memory_grads and all(g is not None and torch.isfinite(g).all() for g in memory_grads)
