"""The language model, every variant including the baselines: causality, streaming == parallel,
state save/load, O(1) state, gradients, training steps, bad configs."""

from __future__ import annotations

import random
from dataclasses import replace

import json

import pytest
import torch
from _helpers import rel_rms

from titans.inference.state_io import load_state, save_state, state_num_bytes
from titans.model import VARIANTS, ModelState, TitansConfig, TitansLM
from titans.ops.memory.rules import rule_settings


# MAC with the memory writing the residual stream (mac_memory_input="residual") and MAG with its
# inner gradients clipped (memory_max_grad_norm, acting on most tokens at this size) run every
# model-level property test too.
CASES = (*VARIANTS, "mac-residual", "mac-gate-attention", "mac-input", "mag-clip", "mac-omega", "mal-omega", "lmm-poly",
         "mac-memora", "lmm-memora", "lmm-atlas", "mac-muon")


def _cfg(variant, **kw):
    if variant == "mac-residual":
        variant, kw = "mac", {"mac_memory_input": "residual", **kw}
    if variant == "mac-gate-attention":
        variant, kw = "mac", {"mac_memory_input": "residual", "mac_gate_input": "attention", **kw}
    if variant == "mac-input":
        variant, kw = "mac", {"mac_memory_input": "input", "mac_gate_input": "attention", **kw}
    if variant == "mag-clip":
        variant, kw = "mag", {"memory_max_grad_norm": 0.05, **kw}
    if variant in ("mac-memora", "lmm-memora"):  # Memora's KL retention; theta large enough to move its softmax
        variant, kw = variant[:3], {"memory_retention_kl": 1.0, "memory_momentum": False, "memory_theta_init": 0.5, **kw}
    if variant == "lmm-poly":  # ATLAS's degree-2 feature map
        variant, kw = "lmm", {"memory_feature_degree": 2, **kw}
    if variant == "lmm-atlas":  # the ATLAS rule (window 8, degree-2 keys, Muon); theta large enough to move M
        fixed = {f"memory_{k}": v for k, v in rule_settings("atlas").items()}
        variant, kw = "lmm", {**fixed, "memory_theta_init": 0.05, **kw}
    if variant == "mac-muon":  # Muon alone (no window, no feature map)
        variant, kw = "mac", {"memory_muon_steps": 3, "memory_theta_init": 0.05, **kw}
    if variant in ("mac-omega", "mal-omega"):  # the Omega rule over 3 tokens (with huber on the MAL)
        variant, kw = variant[:3], {"memory_window": 3, **kw}
        if variant == "mal":
            kw = {"memory_objective": "huber", **kw}
    base = dict(variant=variant, vocab_size=61, dim=32, depth=2, heads=2, window=8, segment=8,
                memory_chunk=4, persistent_tokens=2, memory_expansion=2.0)  # fmt: skip
    base.update(kw)
    return TitansConfig(**base)


def _model(variant, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    model = TitansLM(_cfg(variant, **kw)).to(dtype)
    with torch.no_grad():
        for block in model.blocks:  # gates that read earlier tokens, so that a lost tail would show
            memory = getattr(block, "memory", None)
            if memory is not None and memory.gate_kernel:
                memory.gate_conv.weight.normal_(std=0.5)
                memory.to_theta.weight.normal_(std=0.5)
    return model


def _ids(B=2, T=37, seed=1, vocab=61):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", CASES)
def test_causal(variant):
    model = _model(variant)
    ids = _ids()
    with torch.no_grad():
        logits = model(ids)[0]
        for t in (0, 7, 8, 20):
            ids2 = ids.clone()
            ids2[:, t + 1 :] = (ids2[:, t + 1 :] + 5) % 61
            logits2 = model(ids2)[0]
            assert torch.equal(logits[:, : t + 1], logits2[:, : t + 1]), f"{variant}: position <= {t} saw the future"


@pytest.mark.parametrize("variant", CASES)
def test_streaming_equals_parallel(variant):
    """One parallel call == prefill + one token at a time == random multi-token pieces."""
    model = _model(variant)
    ids = _ids(T=40)
    rng = random.Random(variant)
    with torch.no_grad():
        full = model(ids)[0]
        # prefill 13 tokens, then decode one at a time
        out, state = [model(ids[:, :13])[0]], None
        state = model(ids[:, :13])[2]
        for t in range(13, 40):
            logits, _, state = model(ids[:, t : t + 1], state=state)
            out.append(logits)
        assert rel_rms(torch.cat(out, 1), full) < 1e-10
        cuts = sorted(rng.sample(range(1, 40), 6)) + [40]
        out, state, a = [], None, 0
        for b in cuts:
            logits, _, state = model(ids[:, a:b], state=state)
            out.append(logits)
            a = b
        assert rel_rms(torch.cat(out, 1), full) < 1e-10
        assert state.position == 40


@pytest.mark.parametrize("variant", ["mac", "mag", "transformer"])
def test_streaming_float32(variant):
    model = _model(variant, dtype=torch.float32)
    ids = _ids(T=30)
    with torch.no_grad():
        full = model(ids)[0]
        state, out = None, []
        for t in range(30):
            logits, _, state = model(ids[:, t : t + 1], state=state)
            out.append(logits)
    assert rel_rms(torch.cat(out, 1), full) < 1e-4


@pytest.mark.parametrize("variant", CASES)
def test_state_save_load_continue(variant, tmp_path):
    model = _model(variant)
    ids = _ids(T=30)
    with torch.no_grad():
        full = model(ids)[0]
        _, _, state = model(ids[:, :19])
        save_state(state, tmp_path / "doc", metadata={"note": "read 19 tokens"})
        fresh = _model(variant)  # a new model object with the same weights
        fresh.load_state_dict(model.state_dict())
        loaded, meta = load_state(tmp_path / "doc")
        assert meta == {"note": "read 19 tokens"}
        assert isinstance(loaded, ModelState) and loaded.position == 19
        cont = fresh(ids[:, 19:], state=loaded)[0]
    assert torch.equal(cont, full[:, 19:]) or rel_rms(cont, full[:, 19:]) < 1e-12


def test_corrupt_state_files_are_refused(tmp_path):
    model = _model("mac")
    with torch.no_grad():
        state = model(_ids(T=5))[2]
    save_state(state, tmp_path / "s")
    (tmp_path / "s" / "state.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt state file"):
        load_state(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no state file"):
        load_state(tmp_path / "missing")
    save_state(state, tmp_path / "t")
    (tmp_path / "t" / "state.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a titans state"):
        load_state(tmp_path / "t")


@pytest.mark.parametrize("variant", [v for v in CASES if v != "transformer"])
def test_state_size_is_constant(variant):
    """O(1) inference memory: the state after 10,000 tokens is as big as after 100."""
    # Segment, window and chunk divide 100, so both positions are at the same phase of each.
    model = _model(variant, dtype=torch.float32, segment=50, window=50, memory_chunk=25)
    sizes = {}
    with torch.no_grad():
        state = None
        for step in range(100):
            _, _, state = model(_ids(B=1, T=100, seed=step), state=state)
            if state.position in (100, 10_000):
                sizes[state.position] = state_num_bytes(state)
    assert sizes[100] == sizes[10_000] > 0


def test_transformer_cache_grows():
    model = _model("transformer", dtype=torch.float32)
    with torch.no_grad():
        s1 = model(_ids(B=1, T=10))[2]
        s2 = model(_ids(B=1, T=10), state=s1)[2]
    assert state_num_bytes(s2) == 2 * state_num_bytes(s1)


@pytest.mark.parametrize("variant", CASES)
def test_gradients_and_training_steps(variant):
    model = _model(variant, dtype=torch.float32)
    ids = _ids(T=24)
    _, loss, _ = model(ids, labels=ids)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"{variant}: no gradient for {missing}"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(4):
        opt.zero_grad()
        ids = _ids(T=24, seed=step + 10)
        _, loss, _ = model(ids, labels=ids)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), r"window must be an integer in \[1, "),
        (dict(segment=0), r"segment must be an integer in \[1, "),
        (dict(ffn_mult=float("nan")), "ffn_mult must be a finite number"),
        (dict(depth=10**20), r"depth must be an integer in \[1, 4096\]"),
        (dict(heads=3), "must divide dim"),
        (dict(variant="rnn"), "variant must be one of"),
        (dict(memory_heads=5), "memory_heads"),
        (dict(depth=0), "depth"),
        (dict(mac_memory_input="output"), "mac_memory_input"),
        (dict(mac_gate_input="residual"), "mac_gate_input"),
        (dict(memory_max_grad_norm=0.0), "memory_max_grad_norm"),
        (dict(memory_max_grad_norm=float("nan")), "memory_max_grad_norm"),
        (dict(memory_retention_kl=0.0, memory_momentum=False), "memory_retention_kl must be None or a number in"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _cfg(kwargs.pop("variant", "mac"), **kwargs)


def test_bad_inputs():
    model = _model("mac")
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[1, 2, 99]]))
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="empty time"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_logits_to_keep():
    """logits_to_keep=k returns the full forward's last k positions and the same state; it
    refuses labels (the loss needs every position) and negative counts."""
    model = _model("mag")
    ids = _ids(T=21)
    with torch.no_grad():
        full, _, s_full = model(ids)
        after = model(ids[:, :4], state=s_full)[0]
        for k in (1, 5, 21):
            part, _, s = model(ids, logits_to_keep=k)
            assert part.shape == (2, k, 61)
            assert rel_rms(part, full[:, -k:]) < 1e-12  # a smaller product may round differently
            assert torch.equal(model(ids[:, :4], state=s)[0], after)  # the same state
    with pytest.raises(ValueError, match="labels=None"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match=">= 0"):
        model(ids, logits_to_keep=-1)


def test_set_memory_compile_reaches_every_memory_layer():
    from titans.layers.neural_memory import NeuralMemory

    for variant in VARIANTS:
        model = _model(variant, dtype=torch.float32)
        memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
        assert bool(memories) == (variant not in ("transformer", "swa"))
        assert model.set_memory_compile() is model
        assert all(m.use_compile for m in memories)
        model.set_memory_compile(False)
        assert not any(m.use_compile for m in memories)


def test_presets_and_config_round_trip():
    for name in ("tiny", "170M", "340M", "400M", "760M"):
        cfg = TitansConfig.preset(name)
        assert TitansConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown preset"):
        TitansConfig.preset("7B")
    with pytest.raises(ValueError, match="unknown config keys"):
        TitansConfig.from_dict({"dimm": 3})
    assert TitansLM(TitansConfig.preset("tiny")).num_parameters() > 0


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_untrained_model_stays_finite_on_long_input(variant):
    """Default gate initialisation is stable at a realistic width and chunk (it diverged with
    theta_init = 1e-2 in MAC, whose memory writes similar attention outputs)."""
    torch.manual_seed(0)
    cfg = TitansConfig(variant=variant, vocab_size=256, dim=256, depth=1, heads=4, window=128, segment=128,
                       memory_chunk=64, persistent_tokens=4)  # fmt: skip
    model = TitansLM(cfg).eval()
    state = None
    with torch.no_grad():
        for step in range(4):
            logits, _, state = model(_ids(B=1, T=512, seed=step, vocab=256), state=state)
            assert torch.isfinite(logits).all()
    weights = [w for layer in state.layers for w in layer.memory.memory.weights]
    assert max(w.abs().max().item() for w in weights) < 10


def test_bounded_memory_learning_rate_reaches_every_memory_layer():
    import torch

    from titans.model import TitansConfig, TitansLM

    cfg = TitansConfig(variant="mac", dim=32, depth=2, heads=2, segment=16, window=16, memory_chunk=8,
                       memory_theta_activation="sigmoid", memory_max_lr=0.01)  # fmt: skip
    model = TitansLM(cfg)
    x = torch.randn(1, 5, 32) * 100  # large inputs saturate the gate: theta stays <= max_lr
    for block in model.blocks:
        theta, _, _ = block.memory.gates(x)
        assert block.memory.theta_activation == "sigmoid" and float(theta.max().detach()) <= 0.01


def test_max_grad_norm_reaches_every_memory_layer_and_acts():
    """The config's clip is each memory layer's, and at the test size it changes the output (it
    acts), while a bound above every norm changes nothing."""
    ids = _ids(T=24)
    with torch.no_grad():
        free = _model("mag")(ids)[0]
        loose = _model("mag", memory_max_grad_norm=1e9)(ids)[0]
        model = _model("mag-clip")
        clipped = model(ids)[0]
    assert all(b.memory.max_grad_norm == 0.05 for b in model.blocks)
    assert torch.equal(free, loose)
    assert rel_rms(clipped, free) > 1e-6


def test_mac_block_checks_its_input_once():
    """MAC validates the block input at its entry (the segment loop then skips the memory layer's
    per-call checks): a non-finite input is still refused, by name."""
    from titans.errors import NonFiniteError

    model = _model("mac")
    block = model.blocks[0]
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    y, _ = block(x)
    assert torch.isfinite(y).all()
    x[1, 13, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="x contains non-finite"):  # the entry check's message
        block(x)


def test_swiglu_one_node_backward_matches_autograd(monkeypatch):
    """The SwiGLU's own backward node (saves a and b only, backward in blocks of rows) gives the
    plain autograd composition's outputs and gradients, for uneven blocks too; double backward
    raises instead of being silently wrong."""
    import torch.nn.functional as F

    from titans.blocks import common

    torch.manual_seed(0)
    ffn = common.SwiGLU(6, 10).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    params = [x, *ffn.parameters()]
    ref = ffn.down(F.silu(ffn.gate(x)) * ffn.up(x))
    want = torch.autograd.grad(ref.square().sum(), params)
    for rows in (5, 14, 1000):  # uneven, exact and a single block
        monkeypatch.setattr(common, "_SWIGLU_BACKWARD_ROWS", rows)
        y = ffn(x)
        assert torch.allclose(y, ref, rtol=1e-13, atol=1e-14)
        got = torch.autograd.grad(y.square().sum(), params)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        assert torch.allclose(ffn(x), ref, rtol=1e-13, atol=1e-14)
    (g,) = torch.autograd.grad(ffn(x).square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def _mac_reference(block, x, state=None):
    """MAC through the layers' public forward, segment by segment (the plain form of
    ``MACBlock.forward``, which projects and gates the whole input at once)."""
    from titans.blocks import BlockState

    state = state or BlockState()
    u = block.norm(x)
    mem, cache, seg_w, qconv = state.memory, state.attn, state.segment_weights, state.query_conv
    pos, t, outs = state.position, 0, []
    while t < x.shape[1]:
        n = min(block.segment - pos % block.segment, x.shape[1] - t)
        if pos % block.segment == 0:
            seg_w = mem.memory.weights if mem is not None else block.memory.initial_weights_for(x.shape[0])
        piece = u[:, t : t + n]
        h, qconv = block.memory.retrieve(piece, seg_w, qconv)
        a, cache = block.attn(piece, cache, memory_tokens=h)
        y = a
        if block.write_norm is not None:  # mac_memory_input="residual": y = norm(x + attention)
            y = block.write_norm(x[:, t : t + n] + a)
        if block.memory_input == "input":  # y = norm(x), MAG's write
            y = piece
        m, mem = block.memory(y, mem)
        outs.append(block.gate(a if block.gate_takes_attention else y, m))
        t, pos = t + n, pos + n
    x = x + torch.cat(outs, 1)
    return x + block.ffn(block.ffn_norm(x)), mem


@pytest.mark.parametrize(
    "memory_input, gate_input",
    [("attention", "memory_input"), ("residual", "memory_input"), ("residual", "attention"), ("input", "attention")],
)
def test_mac_block_matches_segment_by_segment_reference(memory_input, gate_input):
    """The MAC block's batched projections and output paths give the per-segment composition of
    the layers' public calls: outputs, gradients of every parameter, and a continued state."""
    model = _model("mac", memory_chunk=3, mac_memory_input=memory_input, mac_gate_input=gate_input)
    assert (model.blocks[0].write_norm is None) == (memory_input != "residual")
    assert model.blocks[0].gate_takes_attention == (gate_input == "attention")
    block = model.blocks[0]
    x = torch.randn(2, 21, 32, dtype=torch.float64, requires_grad=True)
    y, state = block(x[:, :13])  # ends mid-segment and mid-chunk
    y2, _ = block(x[:, 13:], state)
    ref, mem = _mac_reference(block, x[:, :13])
    _, ref_state = block(x[:, :13])
    ref2, _ = _mac_reference(block, x[:, 13:], ref_state)
    assert rel_rms(y, ref) < 1e-12 and rel_rms(y2, ref2) < 1e-12
    for a, b in zip(state.memory.memory.weights, mem.memory.weights):
        assert rel_rms(a, b) < 1e-12
    params = [x, *block.parameters()]
    got = torch.autograd.grad((y.square().sum() + y2.sum()), params, allow_unused=True)
    want = torch.autograd.grad((ref.square().sum() + ref2.sum()), params, allow_unused=True)
    for p, g, w in zip(params, got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert rel_rms(g, w) < 1e-10


def test_rmsnorm_one_node_backward_matches_nn_rmsnorm():
    """The blocks' RMSNorm (one node, its own backward) gives nn.RMSNorm's outputs and gradients
    and shares its state dict; double backward raises instead of being silently wrong."""
    from titans.blocks.common import RMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(6, eps=1e-6).double(), torch.nn.RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        ref.weight.normal_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    y, want_y = ours(x), ref(x)
    assert torch.allclose(y, want_y, rtol=1e-13, atol=1e-14)
    got = torch.autograd.grad(y.pow(3).sum(), [x, ours.weight])
    want = torch.autograd.grad(want_y.pow(3).sum(), [x, ref.weight])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-13)
    with torch.no_grad():  # the inference path (no node)
        assert torch.allclose(ours(x), want_y, rtol=1e-13, atol=1e-14)
    (g,) = torch.autograd.grad(ours(x).square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_associative_init_survives_the_model_init(variant):
    # TitansLM re-initialises Linear layers; the memory's q/k/v projection and conv keep theirs
    cfg = TitansConfig(variant=variant, vocab_size=32, dim=32, depth=2, heads=2, window=8, segment=8,
                       memory_chunk=4, memory_associative_init=True)  # fmt: skip
    model = TitansLM(cfg)
    for block in model.blocks:
        w, inner = block.memory.to_qkv.weight, 32
        assert torch.equal(w[inner : 2 * inner], w[:inner])
        assert (block.memory.conv.weight[inner : 2 * inner, 0, -2] > 0.9).all()


def _stream_mac_in_pieces(model, ids, cuts):
    out, state, a = [], None, 0
    for b in cuts:
        logits, _, state = model(ids[:, a:b], state=state)
        out.append(logits)
        a = b
    return torch.cat(out, 1), state


@pytest.mark.parametrize("variant", ["mac", "mac-gate-attention"])
def test_mac_whole_segment_step_matches_the_loop(variant, monkeypatch):
    """With the memory's compile switch on, inference runs every whole fresh segment through
    ``MACBlock._segment_step`` (compiled; here run eagerly, the compiler is tested in
    test_memory_compile.py): logits and final state equal the eager loop's, for pieces that
    start and end mid-segment."""
    import titans.blocks.mac as mac_mod
    import titans.ops.memory.chunk as chunk_mod

    calls = []

    def eager_step(block, *args):
        calls.append(args[0].q.shape)  # the segment's queries
        return mac_mod.MACBlock._segment_step(block, *args)

    monkeypatch.setattr(mac_mod, "_segment_step_compiled", eager_step)
    monkeypatch.setattr(chunk_mod, "_maybe_compiled", lambda fn, compiled: fn)
    model = _model(variant)
    ids = _ids(T=61)
    cuts = [5, 29, 30, 61]  # segment 8: whole segments inside the 2nd and 4th pieces only
    with torch.no_grad():
        ref, ref_state = _stream_mac_in_pieces(model, ids, cuts)
        assert not calls
        model.set_memory_compile()
        got, got_state = _stream_mac_in_pieces(model, ids, cuts)
    # blocks x whole segments from their start with a state: [8, 16), [16, 24), [32, 40), ...
    assert len(calls) == 2 * 5
    assert rel_rms(got, ref) < 1e-10
    for a, b in zip(got_state.layers, ref_state.layers):
        for x, y in zip(a.memory.memory.tensors(), b.memory.memory.tensors()):
            assert rel_rms(x, y) < 1e-10
        assert a.position == b.position and a.attn.position == b.attn.position
        assert a.attn.k.shape == b.attn.k.shape and rel_rms(a.attn.k, b.attn.k) < 1e-10
    # training never takes it
    model.train()
    calls.clear()
    model(ids, labels=ids)
    assert not calls


@pytest.mark.parametrize(
    "variant, kw",
    [
        ("mac", {}),
        ("mac-residual", {}),
        ("mac-gate-attention", {}),
        ("mac-input", {}),
        ("mac", dict(memory_momentum=False, memory_forgetting=False, memory_conv_kernel=0, persistent_tokens=0)),
        ("mac", dict(memory_depth=1, memory_residual=True, memory_heads=4, memory_activation="gelu")),
        ("mac", dict(memory_depth=3, memory_max_grad_norm=0.05, memory_chunk=3, segment=5)),
        ("mag", {}),
        ("mag-clip", dict(memory_conv_kernel=0, persistent_tokens=0)),
        ("mal", dict(memory_momentum=False, window=1)),
        ("lmm", dict(memory_forgetting=False, memory_depth=1)),
        ("mac", dict(memory_objective="huber", memory_momentum=False)),
        ("mag", dict(memory_objective="lp")),
        ("mal", dict(memory_objective="lp", memory_retention_q=4.0, memory_momentum=False)),
        ("mag", dict(memory_feature_degree=2)),
        ("mal", dict(memory_window=3, memory_chunk=5)),
        ("lmm", dict(memory_window=2, memory_objective="huber", memory_feature_degree=2)),
        ("mac", dict(memory_window=4)),
        ("mac-memora", {}),
        ("mag-clip", dict(memory_retention_kl=2.0, memory_momentum=False, memory_theta_init=0.5, memory_chunk=3)),
        ("lmm-memora", dict(memory_forgetting=False, memory_residual=True, memory_objective="huber")),
        ("mag", dict(memory_gate_kernel=3)),
        ("mac", dict(memory_gate_kernel=2, memory_window=3)),
        ("lmm-memora", dict(memory_gate_kernel=4)),
        ("lmm-atlas", {}),
        ("mac-muon", dict(memory_momentum=False, memory_chunk=3, memory_max_grad_norm=0.05)),
        ("mag", dict(memory_muon_steps=2, memory_window=3, memory_objective="huber", memory_theta_init=0.05)),
    ],
)
def test_decode_step_matches_the_block_forward(variant, kw, monkeypatch):
    """The memory variants' one-token decode step (``TitansLM._decode_step``: fixed-shape caches,
    no Python branch on the state inside) gives the general block forward's logits and state,
    token by token across segment, window and memory-chunk boundaries (from a prefill shorter
    than the window), for every memory switch; and it is what a decode under no_grad runs."""
    model = _model(variant, **kw)
    ids = _ids(T=41)
    steps, graph = [], TitansLM._decode_graph
    monkeypatch.setattr(TitansLM, "_decode_graph", lambda *a: steps.append(1) or graph(*a))
    results = []
    with torch.no_grad():
        for fast in (False, True):
            model.fast_decode = fast
            state = model(ids[:, :6])[2]
            out = []
            for t in range(6, 41):
                logits, _, state = model(ids[:, t : t + 1], state=state)
                out.append(logits)
            results.append((torch.cat(out, 1), state))
    (l0, s0), (l1, s1) = results
    assert len(steps) == 35
    assert rel_rms(l1, l0) < 1e-10
    assert s1.position == s0.position == 41
    for a, b in zip(s1.layers, s0.layers):
        assert a.position == b.position and a.memory.memory.position == b.memory.memory.position
        pairs = list(zip(a.memory.memory.tensors(), b.memory.memory.tensors()))
        if b.segment_weights is not None:  # MAC
            pairs += list(zip(a.segment_weights, b.segment_weights))
            pairs += [(getattr(a.attn, f), getattr(b.attn, f)) for f in ("mem_k", "mem_v")]
        if b.attn is not None:
            pairs += [(a.attn.k, b.attn.k), (a.attn.v, b.attn.v)]
            assert a.attn.position == b.attn.position
        tails = ((a.query_conv, b.query_conv), (a.memory.conv, b.memory.conv), (a.memory.gate_conv, b.memory.gate_conv))
        assert all((x is None) == (y is None) for x, y in tails)
        pairs += [(x, y) for x, y in tails if y is not None]
        for x, y in pairs:
            assert x.shape == y.shape and (x.numel() == 0 or rel_rms(x, y) < 1e-10)


@pytest.mark.parametrize("variant", ["mac", "mag", "lmm"])
def test_decode_step_refuses_a_state_of_another_batch_size(variant):
    model = _model(variant)
    with torch.no_grad():
        state = model(_ids(B=2, T=5))[2]
        with pytest.raises(ValueError, match="batch size"):
            model(_ids(B=3, T=1), state=state)


@pytest.mark.parametrize("variant", ["mac", "mag", "lmm"])
def test_decode_step_leaves_states_that_do_not_fit_to_the_general_path(variant):
    """A state the one-token step cannot take (another memory chunk size or convolution
    setting, non-finite memory weights) gets the general path's error, and a MAC cache in
    another dtype (a prefill under autocast) gets the general path's result."""
    from titans.errors import NonFiniteError

    model = _model(variant)
    ids = _ids(T=9)
    with torch.no_grad():
        other_chunk = _model(variant, memory_chunk=8)(ids[:, :5])[2]  # memory position 5 (MAG: 7) of 8
        no_conv = _model(variant, memory_conv_kernel=0)(ids[:, :6])[2]
        state = model(ids[:, :6])[2]
        for bad, err, match in ((other_chunk, ValueError, "memory_chunk: state 8, model 4"),
                                (no_conv, ValueError, "memory_conv_kernel: state 0, model 4")):
            with pytest.raises(err, match=match):
                model(ids[:, 6:7], state=bad)
        poisoned = model(ids[:, :6])[2]
        poisoned.layers[0].memory.memory.weights[0].fill_(float("nan"))
        with pytest.raises(NonFiniteError):
            model(ids[:, 6:7], state=poisoned)
        if variant == "mac":
            f32 = lambda c: replace(c, **{f: getattr(c, f).float() for f in ("k", "v", "mem_k", "mem_v")})  # noqa: E731
            half = ModelState([replace(s, attn=f32(s.attn)) for s in state.layers], state.position)
            results = []
            for fast in (False, True):
                model.fast_decode = fast
                results.append(model(ids[:, 6:7], state=half)[0])
            assert torch.equal(results[0], results[1])


def test_lmm_reads_persistent_tokens_first_and_old_checkpoints_load_without_them(tmp_path):
    from safetensors.torch import load_file

    from titans.data.tokenizers import ByteTokenizer
    from titans.io.files import sha256_file
    from titans.train.checkpoint import load_pretrained, save_for_inference

    model, ids = _model("lmm"), _ids()
    assert model.blocks[0].persistent.tokens.shape == (2, 32)
    with torch.no_grad():
        before = model(ids)[0]
        model.blocks[0].persistent.tokens.add_(0.5)  # P reaches even the first token's output
        assert not torch.allclose(model(ids)[0][:, 0], before[:, 0])
    plain = _model("lmm", persistent_tokens=0)
    assert all(b.persistent is None for b in plain.blocks) and "persistent" not in str(plain.state_dict().keys())
    # a checkpoint written before the LMM read P: its config says 4 tokens, its weights hold none
    path = save_for_inference(plain.float(), ByteTokenizer(), tmp_path / "old", note={"command": "test"})
    run = json.loads((path / "run.json").read_text())
    run["config"]["model"]["persistent_tokens"] = 4
    (path / "run.json").write_text(json.dumps(run))
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["run.json"] = {"bytes": (path / "run.json").stat().st_size, "sha256": sha256_file(path / "run.json")}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    loaded, _, info = load_pretrained(path)
    assert loaded.cfg.persistent_tokens == 0 and info["config"]["model"]["persistent_tokens"] == 0
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], plain(ids)[0])
    # a current LMM checkpoint keeps its persistent tokens
    path = save_for_inference(model.float(), ByteTokenizer(), tmp_path / "new", note={"command": "test"})
    assert load_pretrained(path)[0].cfg.persistent_tokens == 2
    assert any(".persistent." in k for k in load_file(path / "model.safetensors"))
