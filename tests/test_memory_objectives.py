"""Attentional biases other than the paper's l2 (ops/memory/objectives.py): each objective's error
signal against autograd of its loss, and the chunk path and the one-token step against the token
loop (values, final state and every gradient, the threshold delta's included), in float64."""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    assert_close,
    check_analytic_backward_equals_autograd,
    check_chunk_equals_naive,
    check_layer_streams_in_pieces,
    make_inputs,
    state_tensors,
    step_tokens,
)

from titans.ops.memory import chunk_memory, naive_memory
from titans.ops.memory.objectives import Objective

OBJECTIVES = [Objective("lp", p=3.0), Objective("lp", p=4.0), Objective("lp", p=2.5), Objective("huber")]


def _with_objective(kw, leaves, objective, seed=0, requires_grad=True):
    """Add the objective (and, for huber, a threshold per token and head around the errors' size,
    so that tokens fall on both sides of it) to ``make_inputs``' kwargs and leaves."""
    kw = dict(kw, objective=objective)
    if objective.name == "lp" and objective.p > 2.5:  # g grows like |e|^(p-1): a smaller rate stays bounded
        theta = (kw["theta"].detach() * 0.1).requires_grad_(requires_grad)
        leaves = [theta if t is kw["theta"] else t for t in leaves]
        kw["theta"] = theta
    if objective.needs_delta:
        g = torch.Generator().manual_seed(seed)
        delta = 0.5 + 2.5 * torch.rand(kw["theta"].shape, generator=g, dtype=kw["theta"].dtype)
        delta.requires_grad_(requires_grad)
        kw["delta"] = delta
        leaves = [*leaves, delta]
    return kw, leaves


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}{o.p if o.name == 'lp' else ''}")
def test_error_signal_is_the_gradient_of_the_loss(objective):
    g = torch.Generator().manual_seed(0)
    e = torch.randn(64, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    delta = (0.5 + 2 * torch.rand(64, dtype=torch.float64, generator=g)).requires_grad_(True)
    d = delta if objective.needs_delta else None
    (g_auto,) = torch.autograd.grad(objective.loss(e, d).sum(), e, create_graph=True)
    signal = objective.grad(e, d)
    assert_close(signal, g_auto, 1e-12, "g(e) against autograd of the loss")
    # the vector-Jacobian product of g against autograd of g itself
    gg = torch.randn(64, 5, dtype=torch.float64, generator=g)
    leaves = [e, delta] if objective.needs_delta else [e]
    want = torch.autograd.grad((signal * gg).sum(), leaves)
    got = objective.grad_backward(e.detach(), None if d is None else delta.detach(), gg)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-12, "grad_backward against autograd of g")
    if objective.needs_delta:  # both branches were exercised
        inside = e.detach().square().sum(-1) <= delta.detach().square()
        assert 0 < int(inside.sum()) < 64


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}{o.p if o.name == 'lp' else ''}")
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_chunk_equals_naive_float64(objective, depth, chunk_size):
    for momentum, forgetting, residual in [(True, True, False), (False, True, True), (True, False, False)]:
        kw, leaves = make_inputs(T=37, depth=depth, momentum=momentum, forgetting=forgetting, requires_grad=True,
                                 seed=depth * 10 + chunk_size)  # fmt: skip
        kw, leaves = _with_objective(kw, leaves, objective, seed=chunk_size)
        what = f"{objective} depth={depth} b={chunk_size} mom={momentum} forget={forgetting} res={residual}"
        check_chunk_equals_naive(kw, leaves, dict(chunk_size=chunk_size, residual=residual), what)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}{o.p if o.name == 'lp' else ''}")
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_analytic_backward_equals_autograd(objective, activation):
    for momentum, forgetting, residual in [(True, True, False), (False, True, True)]:
        kw, leaves = make_inputs(T=29, depth=2, momentum=momentum, forgetting=forgetting, requires_grad=True, seed=3)
        kw, leaves = _with_objective(kw, leaves, objective, seed=4)
        opts = dict(chunk_size=8, activation=activation, residual=residual, objective=kw.pop("objective"))
        check_analytic_backward_equals_autograd(kw, leaves, opts, f"{objective} act={activation} mom={momentum}")


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}{o.p if o.name == 'lp' else ''}")
def test_one_token_steps_equal_the_token_loop(objective):
    kw, _ = make_inputs(T=11, depth=2, seed=5)
    kw, _ = _with_objective(kw, [], objective, seed=6, requires_grad=False)
    y_ref, s_ref = naive_memory(**kw, chunk_size=4)
    y, state = step_tokens({n: x for n, x in kw.items() if n != "objective"}, chunk_size=4, objective=objective)
    assert_close(y, y_ref, 1e-12, "one-token steps")
    for a, b in zip(state_tensors(state), state_tensors(s_ref)):
        assert_close(a, b, 1e-12, "final state")


def test_lp_with_p_2_is_the_papers_l2_and_a_wide_huber_is_half_of_it():
    """Two exact identities that pin the objectives to the paper's rule: ||e||_2^2 = sum |e|^2,
    and inside its threshold the huber loss is ||e||^2 / 2 (so twice the learning rate gives l2)."""
    kw, _ = make_inputs(T=23, depth=2, seed=7)
    y_l2, s_l2 = chunk_memory(**kw, chunk_size=8)
    y_lp, _ = chunk_memory(**kw, chunk_size=8, objective=Objective("lp", p=2.0))
    assert_close(y_lp, y_l2, 1e-12, "lp p=2 against l2")
    wide = torch.full_like(kw["theta"], 1e6)
    y_h, _ = chunk_memory(**dict(kw, theta=2 * kw["theta"]), chunk_size=8, objective="huber", delta=wide)
    assert_close(y_h, y_l2, 1e-12, "huber with a wide threshold and twice the rate against l2")


def test_objectives_change_what_is_written():
    kw, _ = make_inputs(T=23, depth=2, seed=8)
    y_l2, _ = chunk_memory(**kw, chunk_size=8)
    y_l3, _ = chunk_memory(**kw, chunk_size=8, objective="lp")
    assert (y_l3 - y_l2).abs().max() > 1e-3


def test_bad_objective_arguments_are_named():
    kw, _ = make_inputs(T=5, depth=1, seed=9)
    with pytest.raises(ValueError, match="huber objective needs delta"):
        chunk_memory(**kw, objective="huber")
    with pytest.raises(ValueError, match="l2 objective takes none"):
        chunk_memory(**kw, delta=torch.ones_like(kw["theta"]))
    with pytest.raises(ValueError, match="delta .* must be > 0"):
        naive_memory(**kw, objective="huber", delta=torch.zeros_like(kw["theta"]))
    with pytest.raises(ValueError, match="delta must have 3 dimensions"):
        chunk_memory(**kw, objective="huber", delta=torch.ones(2, 5, dtype=kw["theta"].dtype))
    with pytest.raises(ValueError, match="p >= 2"):
        Objective("lp", p=1.0)
    with pytest.raises(ValueError, match="objective must be one of"):
        chunk_memory(**kw, objective="l1")
    with pytest.raises(TypeError, match="objective must be an Objective"):
        chunk_memory(**kw, objective=3)


# ---- the layer and the model ------------------------------------------------------------------


@pytest.mark.parametrize("objective, retention_q", [("lp", None), ("huber", None), ("lp", 4.0)])
def test_layer_streams_in_pieces_like_one_call_and_trains_its_threshold(objective, retention_q):
    from titans.layers.neural_memory import NeuralMemory

    torch.manual_seed(0)
    layer = NeuralMemory(32, heads=2, chunk_size=4, objective=objective, momentum=objective != "huber",
                         retention_q=retention_q).double()  # fmt: skip
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    y, _, _, _ = check_layer_streams_in_pieces(layer, x)
    assert (layer.to_delta is not None) == (objective == "huber")
    y.square().sum().backward()
    if objective == "huber":  # the threshold is learned through the writes
        assert layer.to_delta.weight.grad.abs().sum() > 0
    l2 = NeuralMemory(32, heads=2, chunk_size=4, momentum=objective != "huber").double()
    l2.load_state_dict({k: v for k, v in layer.state_dict().items() if "to_delta" not in k})
    with torch.no_grad():  # the same weights, the paper's loss: other writes, other answers
        assert (l2(x)[0] - y.detach()).abs().max() > 1e-4
    assert "objective=" + objective in repr(layer)


def test_config_names_a_bad_objective_and_states_do_not_cross_objectives():
    from titans.errors import StateMismatchError
    from titans.model import TitansConfig, TitansLM

    with pytest.raises(ValueError, match="memory_objective must be one of"):
        TitansConfig(memory_objective="l1")
    with pytest.raises(ValueError, match="p >= 2"):
        TitansConfig(memory_objective="lp", memory_objective_p=1.5)
    with pytest.raises(ValueError, match="memory_retention_q must be None or a number >= 2"):
        TitansConfig(memory_retention_q=1)
    with pytest.raises(ValueError, match="memory_objective_p must be a number"):
        TitansConfig(memory_objective="lp", memory_objective_p="3")
    assert TitansConfig(memory_objective_p=3).memory_objective_p == 3.0
    small = dict(variant="lmm", dim=32, depth=1, heads=2, memory_chunk=4)
    ids = torch.randint(0, 50, (1, 9))
    _, _, state = TitansLM(TitansConfig(**small)).eval()(ids)
    with pytest.raises(StateMismatchError, match="memory_objective: state l2, model huber"):
        TitansLM(TitansConfig(**small, memory_objective="huber")).eval()(ids, state=state)


# ---- Moneta's l_q retention -------------------------------------------------------------------


@pytest.mark.parametrize("q", [3.0, 4.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 16])
def test_lq_retention_chunk_equals_naive_float64(q, chunk_size):
    """Moneta (lp objective, l_q retention, no momentum) and the retention under Titans' own
    momentum and l2 loss: chunk path = token loop, values, state and every gradient."""
    for objective, momentum in [(Objective("lp", p=3.0), False), (Objective("l2"), True)]:
        kw, leaves = make_inputs(T=37, depth=2, momentum=momentum, forgetting=True, requires_grad=True,
                                 seed=int(q) * 10 + chunk_size)  # fmt: skip
        kw, leaves = _with_objective(kw, leaves, objective)
        what = f"retention_q={q} {objective} b={chunk_size} mom={momentum}"
        check_chunk_equals_naive(kw, leaves, dict(chunk_size=chunk_size, retention_q=q), what)


def test_lq_retention_analytic_backward_steps_and_q2():
    kw, leaves = make_inputs(T=29, depth=2, momentum=False, requires_grad=True, seed=11)
    kw, leaves = _with_objective(kw, leaves, Objective("lp", p=3.0))
    opts = dict(chunk_size=8, retention_q=4.0, objective=kw.pop("objective"))
    check_analytic_backward_equals_autograd(kw, leaves, opts, "moneta")
    with torch.no_grad():
        kw2 = {n: (x.detach() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        kw2["weights"] = [w.detach() for w in kw["weights"]]
        y_ref, s_ref = naive_memory(**kw2, **opts)
        y, s = step_tokens(kw2, **opts)
        assert_close(y, y_ref, 1e-12, "one-token steps with the l_q retention")
        for a, b in zip(state_tensors(s), state_tensors(s_ref)):
            assert_close(a, b, 1e-12, "final accumulator")
        # q = 2: ||A||_2^0 = 1, the plain rule
        y2, _ = chunk_memory(**kw2, chunk_size=8, objective=opts["objective"], retention_q=2.0)
        y0, _ = chunk_memory(**kw2, chunk_size=8, objective=opts["objective"])
        assert_close(y2, y0, 1e-14, "retention_q=2 against none")
        assert (y - y0).abs().max() > 1e-3  # q = 4 reads a rescaled memory
    with pytest.raises(ValueError, match="retention_q must be None or a number >= 2"):
        chunk_memory(**kw2, chunk_size=8, retention_q=1.5, objective=opts["objective"])


def test_named_rules_set_their_settings_and_refuse_contradictions(tmp_path, monkeypatch):
    from titans.io.config_files import ConfigError
    from titans.layers.neural_memory import NeuralMemory
    from titans.model import TitansConfig
    from titans.ops.memory.rules import MEMORY_RULES, rule_settings
    from titans.train.config import load_run_config

    assert set(MEMORY_RULES) == {"titans", "moneta", "yaad", "memora", "omega", "atlas"}
    moneta = TitansConfig.with_memory_rule("moneta", variant="lmm", dim=32)
    assert (moneta.memory_objective, moneta.memory_objective_p, moneta.memory_retention_q, moneta.memory_momentum) == (
        "lp", 3.0, 4.0, False)  # fmt: skip
    assert TitansConfig.with_memory_rule("titans") == TitansConfig()
    mine = dict(variant="mag", dim=64, vocab_size=300)  # on a config: its own fields stay, no rule's
    for first in MEMORY_RULES:
        for then in MEMORY_RULES:
            assert TitansConfig.with_memory_rule(first, **mine).with_memory_rule(then) == (
                TitansConfig.with_memory_rule(then, **mine)), (first, then)  # fmt: skip
    layer = NeuralMemory.from_rule("yaad", 16, heads=2)
    assert layer.objective.name == "huber" and not layer.momentum and layer.to_eta is None
    assert NeuralMemory.from_rule("omega", 16, heads=2).window == rule_settings("omega")["window"]
    with pytest.raises(ValueError, match="sets memory_momentum=False; the settings also ask for memory_momentum=True"):
        TitansConfig.with_memory_rule("moneta", memory_momentum=True)
    with pytest.raises(ValueError, match="sets objective='huber'"):
        NeuralMemory.from_rule("yaad", 16, objective="l2")
    memora = TitansConfig.with_memory_rule("memora", variant="lmm", dim=32)
    assert (memora.memory_objective, memora.memory_retention_kl, memora.memory_momentum) == ("l2", 1.0, False)
    atlas = TitansConfig.with_memory_rule("atlas", variant="lmm", dim=32)
    assert (atlas.memory_window, atlas.memory_feature_degree, atlas.memory_muon_steps, atlas.memory_momentum) == (
        8, 2, 5, True)  # fmt: skip
    with pytest.raises(ValueError, match="memory rule 'atlas' sets muon_steps=5; the settings also ask for muon_steps=3"):
        NeuralMemory.from_rule("atlas", 16, heads=2, muon_steps=3)
    with pytest.raises(ValueError, match="memory rule 'titans' sets memory_muon_steps=None"):
        TitansConfig.with_memory_rule("titans", memory_muon_steps=5)
    import titans.ops.memory.rules as rules

    monkeypatch.setattr(rules, "PENDING", {"later": "a paper's optimiser"})
    with pytest.raises(ValueError, match="'later' needs a paper's optimiser, which is not implemented yet; available: titans"):
        rule_settings("later")
    with pytest.raises(ValueError, match="unknown memory rule 'adam'"):
        rule_settings("adam")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  preset: tiny\n  variant: mag\n  memory_rule: yaad\n")
    run = load_run_config(str(cfg))
    assert run.model.memory_objective == "huber" and run.model.dim == 128 and not run.model.memory_momentum
    with pytest.raises(ConfigError, match="model.memory_rule: memory rule 'yaad' sets memory_objective='huber'"):
        load_run_config(str(cfg), ["model.memory_objective=lp"])
