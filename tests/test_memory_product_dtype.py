"""Low-precision chunk products (``chunk_memory(product_dtype=torch.bfloat16)``): the matrix
products inside a chunk run in bf16 while the recurrent state, its gradients, the gates' decays
and the key side's error ``M(k) - v`` stay float32. Checked against the float64 token loop
(outputs, final state, every gradient) at the tolerance bf16 allows, and against the properties
that must not degrade with it: decays and momentum carried in full precision, a well-fitted
memory's small updates, the error over a long stream (forward and backward), the layer and the
model switch."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_inputs, probe_loss, rel_rms, state_tensors

from titans.layers import NeuralMemory
from titans.model import TitansConfig, TitansLM
from titans.ops.memory import chunk_memory, naive_memory

# Relative-RMS bound against the float64 reference: bf16 keeps 8 mantissa bits (2^-9 = 2e-3 per
# rounding; outputs and gradients pass through a few dozen roundings).
TOL = 3e-2


def _to32(kw: dict) -> dict:
    return {k: (None if v is None else v.float() if torch.is_tensor(v) else [w.float() for w in v]) for k, v in kw.items()}


def _all_probe(y, state) -> torch.Tensor:
    return probe_loss(y) + sum(probe_loss(t) for t in state.tensors())


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("momentum,forgetting,residual,clip,slow_momentum", [
    (True, True, False, None, False), (True, True, True, 1.0, False), (False, True, False, None, False),
    (True, False, True, None, False), (False, False, False, 1.0, False), (True, True, False, None, True),
])  # fmt: skip
def test_low_precision_products_match_the_float64_loop(depth, momentum, forgetting, residual, clip, slow_momentum):
    """Outputs, final state and the gradients of both (q, k, v, every gate, the initial weights),
    with the state entered mid-chunk by a first call (gradient weights != running weights, and a
    momentum carried in). ``slow_momentum``: eta in [0.95, 1), so that the momentum (S_end =
    e_n S0 - ..., e_n ~ 0.6 over 16 tokens) carries across chunks instead of vanishing."""
    kw64, leaves64 = make_inputs(B=2, T=70, H=2, D=16, depth=depth, momentum=momentum, forgetting=forgetting,
                                 requires_grad=False, seed=depth)  # fmt: skip
    if slow_momentum:
        kw64["eta"] = 0.95 + 0.05 * torch.rand(kw64["eta"].shape, generator=torch.Generator().manual_seed(9),
                                               dtype=torch.float64)  # fmt: skip
        kw64["theta"] = kw64["theta"] * 0.1
        leaves64 = [kw64[n] for n in ("q", "k", "v", "theta", "eta", "alpha")] + kw64["weights"]
    for t in leaves64:
        if t is not None:
            t.requires_grad_(True)
    leaves64 = [t for t in leaves64 if t is not None]
    product_dtype = torch.bfloat16
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

    tol = TOL
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


def test_low_precision_products_keep_a_well_fitted_memorys_small_updates():
    """A memory that already maps k to v up to 1e-3: its update is the small error's. Computed from
    bf16-rounded weights that error would be bf16's rounding of M(k) (~2^-9 |v|), and the update
    70% wrong; the key side runs in float32, so it is as accurate as any bf16 product."""
    g = torch.Generator().manual_seed(4)
    B, T, H, D = 1, 64, 2, 16
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    W = torch.randn(H, D, D, generator=g)
    v = torch.einsum("hij,bthj->bthi", W, k) + 1e-3 * torch.randn(B, T, H, D, generator=g)
    kw = dict(q=k, k=k, v=v, theta=torch.full((B, T, H), 0.05), weights=[W])
    _, s32 = chunk_memory(**kw, chunk_size=64)
    _, s16 = chunk_memory(**kw, chunk_size=64, product_dtype=torch.bfloat16)
    assert rel_rms(s16.weights[0] - W, s32.weights[0] - W) < 1e-2


def test_low_precision_gradients_over_a_long_stream():
    """The gradient of the initial weights through 2,048 tokens (128 chunks, slow forgetting, so
    every chunk's gradient of the state reaches the start): accumulated in float32, its error
    against float32 products stays at bf16's level (it was 2.6e-2 with the state's gradient summed
    in bf16)."""
    kw, _ = make_inputs(B=1, T=2048, H=2, D=16, depth=2, dtype=torch.float32, seed=5)
    kw["theta"] = kw["theta"] * 0.2
    kw["alpha"] = kw["alpha"] * 0.01
    grads = []
    for product_dtype in (None, torch.bfloat16):
        weights = [w.clone().requires_grad_(True) for w in kw["weights"]]
        y, s = chunk_memory(**{**kw, "weights": weights}, chunk_size=16, product_dtype=product_dtype)
        grads.append(torch.autograd.grad(probe_loss(y[:, -64:]) + sum(probe_loss(w) for w in s.weights), weights))
    errors = [rel_rms(a, b) for a, b in zip(grads[1], grads[0])]
    assert max(errors) < 1e-2, errors


def test_product_dtype_errors_name_the_problem():
    kw, _ = make_inputs(T=8, dtype=torch.float32)
    for bad in (torch.int8, torch.float16):
        with pytest.raises(ValueError, match="product_dtype"):
            chunk_memory(**kw, product_dtype=bad)
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

    cfg = TitansConfig.preset("tiny", variant="mag", memory_product_dtype="bf16")
    assert cfg.memory_product_dtype == "bfloat16"  # one spelling, so runs resume each other
    model = TitansLM(cfg)
    layers = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    assert layers and all(m.product_dtype == torch.bfloat16 for m in layers)
    ids = torch.randint(0, cfg.vocab_size, (2, 96))
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss, _ = model(ids, labels=ids)
        loss.backward()
        assert torch.isfinite(loss)
        memory_grads = [p.grad for n, p in model.named_parameters() if ".memory." in n]
        assert memory_grads and all(g is not None and torch.isfinite(g).all() for g in memory_grads)


@pytest.mark.parametrize("fast", [False, True, None])
def test_bf16_products_on_a_cpu_without_bf16_kernels_warn_once(monkeypatch, fast):
    """Where torch has no fast bf16 matrix kernel for the CPU (its fallback ran the layer's step
    6-8x slower than float32 on an AMD EPYC), the layer says so once, at the user's line, when it
    runs chunk products; with the kernels, or where torch cannot tell, it says nothing. A one-token
    step (float32 matrix-vector products) and float32 products never warn."""
    import warnings

    from titans.errors import PerformanceWarning
    from titans.runtime import cpu

    monkeypatch.setattr(cpu, "cpu_bf16_matmul_is_fast", lambda: fast)
    monkeypatch.setattr(cpu, "_warned_bf16", set())
    layer = NeuralMemory(32, heads=2, chunk_size=4, product_dtype="bf16")
    x = torch.randn(1, 8, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x[:, :1])  # one token: no bf16 products
        NeuralMemory(32, heads=2, chunk_size=4)(x)  # float32 products
        assert [w for w in caught if issubclass(w.category, PerformanceWarning)] == []
        layer(x), layer(x)
    slow = [w for w in caught if issubclass(w.category, PerformanceWarning)]
    if fast is False:
        assert len(slow) == 1, slow
        assert "product_dtype=bfloat16" in str(slow[0].message) and "product_dtype=None" in str(slow[0].message)
        assert slow[0].filename == __file__  # the caller's line, not the library's
    else:
        assert slow == []


def test_bf16_kernel_probe_reads_this_torch():
    """The probe must give an answer with this torch (oneDNN built in): if torch renames the
    private check it reads, this fails instead of the warning going silent."""
    from titans.runtime.cpu import cpu_bf16_matmul_is_fast

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert cpu_bf16_matmul_is_fast() in (True, False)
    with torch.backends.mkldnn.flags(enabled=False):  # torch's fallback then serves every CPU
        assert cpu_bf16_matmul_is_fast() is False
