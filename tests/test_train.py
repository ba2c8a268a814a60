"""The trainer: schedule, parameter groups, exact resume, checkpoint integrity, config errors."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest
import torch

from titans.io.config_files import ConfigError
from titans.model import TitansConfig, TitansLM
from titans.train import checkpoint as ckpt
from titans.train import trainer as trainer_mod
from titans.train.config import RunConfig, load_run_config
from titans.train.optim import lr_factor, param_groups

from _train_helpers import fake_build_sources, tiny_run


@pytest.fixture(autouse=True)
def _fake_data(monkeypatch):
    monkeypatch.setattr(trainer_mod, "build_sources", fake_build_sources)


def _losses(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, lines)]


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 110, 0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # decays monotonically after warmup
    assert f[110] == pytest.approx(0.1) and f[60] == pytest.approx(0.55)


def test_no_weight_decay_on_norms_biases_and_gates():
    model = TitansLM(TitansConfig(variant="mac", dim=32, depth=1, heads=2, segment=16, window=16, memory_chunk=8))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.memory.to_theta.weight" in no and "blocks.0.memory.to_alpha.bias" in no
    assert "norm.weight" in no and "blocks.0.gate.norm_y.weight" in no
    assert "blocks.0.attn.to_q.weight" in yes and "blocks.0.memory.initial_weights.0" in yes
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no) + len(yes) == len(list(model.parameters()))


@pytest.mark.parametrize("variant", ["mac", "swa"])
def test_resumed_run_reproduces_uninterrupted_losses_bit_for_bit(tmp_path, variant):
    full = trainer_mod.train(tiny_run(tmp_path / "full", variant))
    run = tiny_run(tmp_path / "cut", variant)
    part = trainer_mod.train(run, stop_at_step=3)
    assert part["step"] == 3 and part["stopped"] == "stopped"
    with pytest.raises(ConfigError, match="resume auto"):
        trainer_mod.train(run)  # a fresh run must not overwrite an existing one
    resumed = trainer_mod.train(run, resume="auto")
    assert resumed["step"] == 6
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")  # exact floats, eval included
    assert full["loss"] < _losses(tmp_path / "full")[0][1]  # and it learned something


def test_interruption_writes_a_checkpoint_and_keeps_the_drawn_batch(tmp_path, monkeypatch):
    run = tiny_run(tmp_path / "a", checkpoint_every=0)
    calls = {"n": 0}
    real = trainer_mod._loss_sum

    def interrupt_on_step_3(*args):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # first micro batch of step 3 (2 micro batches per step)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(trainer_mod, "_loss_sum", interrupt_on_step_3)
    with pytest.raises(KeyboardInterrupt, match="step 2"):
        trainer_mod.train(run)
    monkeypatch.setattr(trainer_mod, "_loss_sum", real)
    trainer_mod.train(run, resume="auto")
    trainer_mod.train(tiny_run(tmp_path / "b", checkpoint_every=0))
    assert [r[:2] for r in _losses(tmp_path / "a")] == [r[:2] for r in _losses(tmp_path / "b")]


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,message", [("truncate", "truncated"), ("flip", "corrupted")])
def test_damaged_checkpoint_is_refused_and_the_previous_one_still_loads(tmp_path, how, message):
    run = tiny_run(tmp_path, max_steps=4, checkpoint_every=2, keep_checkpoints=2)
    trainer_mod.train(run)
    older, newest = ckpt.list_checkpoints(tmp_path)
    assert (older.name, newest.name) == ("step-0000002", "step-0000004")
    _corrupt(newest / "model.safetensors", how)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_pretrained(newest)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        trainer_mod.train(run, resume=str(newest))  # named explicitly: refused
    # --resume auto goes back to the newest intact one and sets the damaged one aside
    assert trainer_mod.train(run, resume="auto")["step"] == 4
    assert (ckpt.checkpoint_root(tmp_path) / ".damaged-step-0000004").is_dir()
    model, tokenizer, info = ckpt.load_pretrained(older)
    assert info["step"] == 2 and tokenizer.vocab_size == 257 and not model.training
    (newest / "MANIFEST.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.verify_checkpoint(newest)


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    trainer_mod.train(tiny_run(tmp_path, max_steps=2))
    other = tiny_run(tmp_path, max_steps=4)
    other.model.dim = 64
    other.train.lr = 1e-3
    with pytest.raises(ckpt.CheckpointError, match=r"model.dim: checkpoint 32, this run 64") as err:
        trainer_mod.train(other, resume="auto")
    assert "train.lr" in str(err.value)


def test_resume_accepts_a_checkpoint_written_before_a_setting_existed(tmp_path):
    """A config key the checkpoint lacks (a setting added to the package later) is its default."""
    run = tiny_run(tmp_path, max_steps=2)
    trainer_mod.train(run)
    latest = ckpt.latest_checkpoint(tmp_path)
    meta_path = latest / "run.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["model"]["memory_product_dtype"]
    meta_path.write_text(json.dumps(meta))
    manifest = json.loads((latest / "MANIFEST.json").read_text())
    manifest["run.json"] = {"bytes": meta_path.stat().st_size, "sha256": ckpt.sha256_file(meta_path)}
    (latest / "MANIFEST.json").write_text(json.dumps(manifest))
    trainer_mod.train(tiny_run(tmp_path, max_steps=3), resume="auto")
    assert ckpt.latest_checkpoint(tmp_path).name.endswith("3")
    changed = tiny_run(tmp_path, max_steps=4)
    changed.model.memory_product_dtype = "bfloat16"
    with pytest.raises(ckpt.CheckpointError, match="memory_product_dtype: checkpoint 'float32'"):
        trainer_mod.train(changed, resume="auto")


def test_loaded_checkpoint_gives_the_trained_models_outputs(tmp_path):
    run = tiny_run(tmp_path, max_steps=2)
    trainer_mod.train(run)
    model, _, _ = ckpt.load_pretrained(tmp_path)  # a run directory means its latest checkpoint
    again, _, _ = ckpt.load_pretrained(ckpt.latest_checkpoint(tmp_path))
    ids = torch.randint(0, 64, (1, 40))
    assert torch.equal(model(ids)[0], again(ids)[0])
    assert model.head.weight is model.embed.weight  # tied embeddings survive the round trip


def test_init_from_starts_a_fresh_run_at_the_checkpoints_weights(tmp_path, capsys):
    first = tmp_path / "stage1"
    trainer_mod.train(tiny_run(first, max_steps=2))
    trained, _, _ = ckpt.load_pretrained(first)
    second = tiny_run(tmp_path / "stage2", max_steps=1, lr=1e-12, warmup_steps=0, init_from=str(first))
    second.model.segment = 8  # a setting that does not change the weights may differ (and is reported)
    trainer_mod.train(second)
    assert "model settings changed: segment: 16 -> 8" in capsys.readouterr().out
    after, _, info = ckpt.load_pretrained(tmp_path / "stage2")
    assert info["step"] == 1  # a new run: its own step count, optimiser and schedule
    for (name, a), b in zip(trained.state_dict().items(), after.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), f"{name} did not start from the checkpoint"
    scratch = tiny_run(tmp_path / "scratch", max_steps=1, lr=1e-12, warmup_steps=0)
    trainer_mod.train(scratch)
    fresh, _, _ = ckpt.load_pretrained(tmp_path / "scratch")
    assert not torch.allclose(fresh.embed.weight, after.embed.weight)
    # resuming the second stage takes its own checkpoint, not init_from (here another run's) again
    resumed = tiny_run(tmp_path / "stage2", max_steps=2, lr=1e-12, warmup_steps=0, init_from=str(tmp_path / "scratch"))
    resumed.model.segment = 8
    assert trainer_mod.train(resumed, resume="auto")["step"] == 2
    again, _, _ = ckpt.load_pretrained(tmp_path / "stage2")
    assert torch.allclose(again.embed.weight, after.embed.weight, atol=1e-6)
    assert not torch.allclose(again.embed.weight, fresh.embed.weight)
    # an exported checkpoint (weights and run record only, tied head stored once) is a start too
    exported = ckpt.export_for_inference(first, tmp_path / "exported")
    from_export = tiny_run(tmp_path / "stage2b", max_steps=1, lr=1e-12, warmup_steps=0, init_from=str(exported))
    trainer_mod.train(from_export)
    b2, _, _ = ckpt.load_pretrained(tmp_path / "stage2b")
    assert torch.allclose(b2.embed.weight, trained.embed.weight, atol=1e-6)


def test_stop_at_step_ends_partway_through_the_schedule(tmp_path):
    """train.stop_at_step: the weights of the first N steps of a longer run, bit for bit."""
    trainer_mod.train(tiny_run(tmp_path / "full", max_steps=6, checkpoint_every=2))  # keeps steps 4 and 6
    part = tiny_run(tmp_path / "part", max_steps=6, checkpoint_every=0, stop_at_step=4)
    summary = trainer_mod.train(part)
    assert summary["step"] == 4 and summary["stopped"] == "stopped"
    a, _, _ = ckpt.load_pretrained(ckpt.checkpoint_root(tmp_path / "full") / "step-0000004")
    b, _, _ = ckpt.load_pretrained(tmp_path / "part")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert trainer_mod.train(part, resume="auto")["step"] == 4  # resuming a finished stage trains nothing
    earlier = tiny_run(tmp_path / "part", max_steps=6, checkpoint_every=0, stop_at_step=3)
    with pytest.raises(ckpt.CheckpointError, match="past stop_at_step 3"):
        trainer_mod.train(earlier, resume="auto")  # a later checkpoint is not handed over as step 3
    with pytest.raises(ConfigError, match="stop_at_step"):
        tiny_run(tmp_path / "bad", max_steps=6, stop_at_step=7).train.validate()


def test_init_new_keeps_a_new_module_at_its_initial_values(tmp_path, capsys):
    """train.init_new: a model with a module the checkpoint lacks (the gates' convolution) starts
    from the checkpoint's weights and the new module's initial values, named in the log; a
    pattern that matches nothing the checkpoint lacks, or init_new without init_from, is refused."""
    first = tmp_path / "stage1"
    trainer_mod.train(tiny_run(first, max_steps=2))
    trained, _, _ = ckpt.load_pretrained(first)
    second = tiny_run(tmp_path / "stage2", max_steps=1, lr=1e-12, warmup_steps=0, init_from=str(first),
                      init_new=r"memory\.gate_conv\.")  # fmt: skip
    second.model.memory_gate_kernel = 3
    with pytest.raises(ckpt.CheckpointError, match="missing.*gate_conv"):  # not without init_new
        trainer_mod.train(_with_gates(tiny_run(tmp_path / "refused", init_from=str(first))))
    trainer_mod.train(second)
    out = capsys.readouterr().out
    assert "at their initial values (train.init_new): blocks.0.memory.gate_conv.weight" in out
    after, _, _ = ckpt.load_pretrained(tmp_path / "stage2")
    ids = torch.randint(0, 257, (1, 40))
    assert torch.allclose(trained(ids)[0], after(ids)[0], atol=1e-5)  # the new taps start as the token alone
    typo = tiny_run(tmp_path / "typo", init_from=str(first), init_new="gate_konv")
    typo.model.memory_gate_kernel = 3
    with pytest.raises(ConfigError, match="matches no parameter"):
        trainer_mod.train(typo)
    with pytest.raises(ConfigError, match="set train.init_from too"):
        tiny_run(tmp_path / "alone", init_new="gate_conv").train.validate()


def _with_gates(run, kernel=3):
    run.model.memory_gate_kernel = kernel
    return run


def test_init_from_refuses_other_weights_or_tokenizer(tmp_path, monkeypatch):
    first = tmp_path / "stage1"
    trainer_mod.train(tiny_run(first, max_steps=2))
    wider = tiny_run(tmp_path / "wider", init_from=str(first))
    wider.model.dim = 64
    with pytest.raises(ckpt.CheckpointError, match="init_from"):
        trainer_mod.train(wider)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoints|not found"):
        trainer_mod.train(tiny_run(tmp_path / "x", init_from=str(tmp_path / "missing")))
    class OtherTokenizer:  # same size as bytes, another spec
        vocab_size = 257

        def to_spec(self):
            return {"name": "other"}

    def other_tokenizer(run, rank=0, world_size=1):
        _, source, evals = fake_build_sources(run, rank, world_size)
        return OtherTokenizer(), source, evals

    monkeypatch.setattr(trainer_mod, "build_sources", other_tokenizer)
    with pytest.raises(ckpt.CheckpointError, match="another tokenizer"):
        trainer_mod.train(tiny_run(tmp_path / "y", init_from=str(first)))


def test_config_errors_name_the_key_and_suggest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_run_config(None, ["--train.lrr=3e-4"])
    with pytest.raises(ConfigError, match="did you mean 'memory_depth'"):
        load_run_config(None, ["model.memory_deepth=2"])
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        RunConfig.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match="train.seq_len must be int"):
        load_run_config(None, ["train.seq_len=long"])
    with pytest.raises(ConfigError, match=r"memory_theta_init \(0.001\) must lie in \(0, memory_max_lr=0.001\)"):
        load_run_config(None, ["model.memory_theta_activation=sigmoid", "model.memory_max_lr=1e-3"])
    with pytest.raises(ConfigError, match="multiple of train.seq_len"):
        load_run_config(None, ["train.seq_len=100", "train.batch_tokens=150"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  preset: tiny\n  variant: mag\ntrain:\n  lr: 1e-3\n")
    run = load_run_config(str(cfg_file), ["train.max_steps=7"])
    assert run.model.variant == "mag" and run.model.dim == 128 and run.train.lr == 1e-3 and run.train.max_steps == 7
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('[train]\nlr = 2e-3\n[model]\ndim = 64\n')
    assert load_run_config(str(toml_file)).train.lr == 2e-3
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(str(tmp_path / "missing.yaml"))


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    real = trainer_mod._loss_sum

    def nan_loss(*args):
        loss, n = real(*args)
        return loss * float("nan"), n

    monkeypatch.setattr(trainer_mod, "_loss_sum", nan_loss)
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        trainer_mod.train(tiny_run(tmp_path, max_steps=3))


def test_bf16_autocast_trains_on_cpu(tmp_path, monkeypatch):
    """It trains; where torch has no fast bf16 kernel for the CPU (pretended here) the run warns
    that it is slow and names the setting to use instead."""
    from titans.errors import PerformanceWarning
    from titans.runtime import cpu

    monkeypatch.setattr(cpu, "cpu_bf16_matmul_is_fast", lambda: False)
    monkeypatch.setattr(cpu, "_warned_bf16", set())
    with pytest.warns(PerformanceWarning, match="train.precision=bf16.*train.precision=fp32"):
        summary = trainer_mod.train(tiny_run(tmp_path, precision="bf16", max_steps=3, checkpoint_every=0))
    assert math.isfinite(summary["loss"]) and summary["step"] == 3


def test_non_finite_gradient_stops_before_the_weights_are_touched(tmp_path, monkeypatch):
    real = trainer_mod._loss_sum
    seen = {}

    def inf_gradient(model, *args):
        if "hook" not in seen:  # the loss stays finite; one parameter's gradient becomes inf
            seen["hook"] = model.norm.weight.register_hook(lambda g: g * float("inf"))
            seen["before"] = model.norm.weight.detach().clone()
        seen["model"] = model
        return real(model, *args)

    monkeypatch.setattr(trainer_mod, "_loss_sum", inf_gradient)
    with pytest.raises(FloatingPointError, match="gradient norm is (nan|inf) at step 1"):
        trainer_mod.train(tiny_run(tmp_path, max_steps=3))
    assert torch.equal(seen["model"].norm.weight, seen["before"])  # no step was taken


def test_export_applies_and_records_test_time_model_settings(tmp_path):
    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    trained_clip = json.loads((ckpt.latest_checkpoint(tmp_path / "run") / "run.json").read_text())["config"]["model"][
        "memory_max_grad_norm"]  # fmt: skip
    out = ckpt.export_for_inference(tmp_path / "run", tmp_path / "export", model_settings={"memory_max_grad_norm": 7.0})
    model, _, _ = ckpt.load_pretrained(out)
    assert model.cfg.memory_max_grad_norm == 7.0
    assert all(m.memory.max_grad_norm == 7.0 for m in model.blocks if hasattr(m, "memory"))
    record = json.loads((out / "run.json").read_text())["provenance"]["inference_settings"]
    assert record == {"memory_max_grad_norm": {"trained": trained_clip, "inference": 7.0}}
    with pytest.raises(ckpt.CheckpointError, match="unknown config keys.*memory_clip"):
        ckpt.export_for_inference(tmp_path / "run", tmp_path / "bad", model_settings={"memory_clip": 7.0})
    with pytest.raises(ckpt.CheckpointError, match="memory_max_grad_norm"):
        ckpt.export_for_inference(tmp_path / "run", tmp_path / "bad", model_settings={"memory_max_grad_norm": -1.0})
    assert not (tmp_path / "bad").exists()


def test_exported_checkpoint_loads_for_inference_but_cannot_resume(tmp_path):
    trainer_mod.train(tiny_run(tmp_path / "run", max_steps=2))
    out = ckpt.export_for_inference(tmp_path / "run", tmp_path / "export", note={"command": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json", "model.safetensors", "run.json"]
    model, _, info = ckpt.load_pretrained(out)
    trained, _, _ = ckpt.load_pretrained(tmp_path / "run")
    assert info["step"] == 2 and all(torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters()))
    from safetensors.torch import load_file

    stored = load_file(out / "model.safetensors")
    assert "head.weight" not in stored and "embed.weight" in stored  # the tied head is stored once
    assert model.head.weight is model.embed.weight
    ids = torch.randint(0, 64, (1, 20))
    assert torch.equal(model(ids)[0], trained(ids)[0])
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors is missing"):
        ckpt.read_checkpoint(out)


def test_diverging_forward_pass_is_reported_with_advice(tmp_path, monkeypatch):
    from titans.errors import NonFiniteError

    def diverged(*args):
        raise NonFiniteError("x contains non-finite values (NaN or inf)")

    monkeypatch.setattr(trainer_mod, "_loss_sum", diverged)
    with pytest.raises(FloatingPointError, match="step 1 .*memory_theta_activation=sigmoid"):
        trainer_mod.train(tiny_run(tmp_path, max_steps=2))


def test_overrides_never_change_the_callers_config():
    from titans.io.config_files import apply_overrides

    base = {"models": {"titans": {"model": {"dim": 64}}}}
    out = apply_overrides(base, ["models.titans.model.dim=128"])
    assert out["models"]["titans"]["model"]["dim"] == 128 and base["models"]["titans"]["model"]["dim"] == 64


def test_loss_weights_weigh_each_target():
    torch.manual_seed(0)
    model = TitansLM(TitansConfig(variant="swa", vocab_size=17, dim=16, depth=1, heads=2, window=4))
    ids = torch.randint(0, 17, (2, 9))
    labels = ids.clone()
    labels[0, 3] = -100
    weights = torch.rand(2, 9) * 5
    loss, count = trainer_mod._loss_sum(model, ids, labels, torch.autocast("cpu", enabled=False), weights)
    logits, _, _ = model(ids)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    w = weights[:, 1:] * (labels[:, 1:] != -100)
    assert loss.item() == pytest.approx((ce * w).sum().item(), rel=1e-6)
    assert count == pytest.approx(w.sum().item()) == trainer_mod._target_weight(labels, weights)
    plain, n = trainer_mod._loss_sum(model, ids, labels, torch.autocast("cpu", enabled=False))
    assert n == 15 and plain.item() == pytest.approx((ce * (labels[:, 1:] != -100)).sum().item(), rel=1e-6)


def test_uniform_loss_weights_train_as_none(tmp_path, monkeypatch):
    """A batch's loss_weights reach the step: uniform weights give the unweighted run's losses,
    answer-like weights a different one."""

    def weighted(scale):
        def build(run, rank=0, world_size=1):
            tok, source, eval_batches = fake_build_sources(run, rank, world_size)

            class Weighted:
                def next_batch(self, n):
                    ids = source.next_batch(n)
                    w = torch.full(ids.shape, 3.0)
                    if scale:
                        w[:, ::4] = 30.0
                    return {"input_ids": ids, "labels": ids, "loss_weights": w}

                state_dict, load_state_dict = source.state_dict, source.load_state_dict

            return tok, Weighted(), eval_batches

        return build

    trainer_mod.train(tiny_run(tmp_path / "plain", "mag"))
    monkeypatch.setattr(trainer_mod, "build_sources", weighted(False))
    trainer_mod.train(tiny_run(tmp_path / "uniform", "mag"))
    monkeypatch.setattr(trainer_mod, "build_sources", weighted(True))
    trainer_mod.train(tiny_run(tmp_path / "answers", "mag"))
    plain, uniform, answers = (_losses(tmp_path / n) for n in ("plain", "uniform", "answers"))
    assert [r[1] for r in uniform] == pytest.approx([r[1] for r in plain], rel=1e-5)
    assert [r[1] for r in answers][1:] != pytest.approx([r[1] for r in plain][1:], rel=1e-3)


def test_detached_prefix_scores_the_rest_from_the_state_the_prefix_left():
    """train.detached_prefix: the loss is the full row's loss on the targets after the prefix
    (the prefix's memory carried in), and no gradient reaches the prefix's tokens."""
    from contextlib import nullcontext

    torch.manual_seed(0)
    cfg = TitansConfig(variant="mac", vocab_size=32, dim=32, depth=1, heads=2, segment=16, window=16,
                       memory_chunk=8, tie_embeddings=False)  # fmt: skip
    model = TitansLM(cfg)
    prefix = 24  # mid-segment and mid-chunk: the state carries a pending segment
    ids = torch.cat([torch.randint(0, 10, (2, prefix)), torch.randint(10, 20, (2, 40))], dim=1)  # (B, T)
    loss, n = trainer_mod._loss_sum(model, ids, ids, nullcontext(), None, prefix)
    logits, _, _ = model(ids)
    full = torch.nn.functional.cross_entropy(
        logits[:, prefix:-1].reshape(-1, 32), ids[:, prefix + 1 :].reshape(-1), reduction="sum"
    )
    assert n == 2 * (ids.shape[1] - prefix - 1) == trainer_mod._target_weight(ids, None, prefix)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    alone, _, _ = model(ids[:, prefix:])  # without the prefix's state the loss differs: it was carried
    assert not torch.allclose(alone[:, :-1], logits[:, prefix:-1], atol=1e-4)
    loss.backward()
    grad = model.embed.weight.grad
    assert grad[:10].abs().max() == 0  # prefix-only tokens: the gradient stops at the prefix
    assert grad[10:20].abs().sum(-1).min() > 0
    weights = torch.rand(ids.shape)
    assert trainer_mod._target_weight(ids, weights, prefix) == pytest.approx(float(weights[:, prefix + 1 :].sum()))


def test_detached_prefix_trains_and_is_checked(tmp_path):
    summary = trainer_mod.train(tiny_run(tmp_path / "p", detached_prefix=16, max_steps=2, checkpoint_every=0))
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["val_loss"])
    with pytest.raises(ConfigError, match="detached_prefix must be in"):
        tiny_run(tmp_path / "q", detached_prefix=31).train.validate()


def test_train_only_moves_the_matching_parameters_alone(tmp_path):
    run = tiny_run(tmp_path / "g", train_only=r"memory\.to_(theta|alpha)\.", max_steps=2, checkpoint_every=0)
    summary = trainer_mod.train(run)
    torch.manual_seed(run.train.seed)  # the trainer's initial weights
    before = TitansLM(run.model).state_dict()
    after = ckpt.load_pretrained(summary["checkpoint"])[0].state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".to_theta." in k or ".to_alpha." in k for k in moved), moved
    with pytest.raises(ConfigError, match="matches no parameter"):
        trainer_mod.train(tiny_run(tmp_path / "h", train_only="no_such_weight", max_steps=1))
    with pytest.raises(ConfigError, match="not a regular expression"):
        tiny_run(tmp_path / "i", train_only="(").train.validate()


def _sigmoid_theta(run):  # gates half open (rate 0.5), where the sigmoid moves most
    settings = {"memory_theta_activation": "sigmoid", "memory_max_lr": 0.1, "memory_theta_init": 0.05}
    run.model = TitansConfig.from_dict({**run.model.to_dict(), **settings})
    return run


class _GateRates:
    """theta / max_lr of every ``NeuralMemory.gates`` call made with gradients on, recorded from
    the gates' own output (not from the to_theta hook the trainer uses)."""

    def __init__(self, monkeypatch):
        from titans.layers.neural_memory import NeuralMemory

        self.rates, original = [], NeuralMemory.gates

        def gates(module, x):
            theta, eta, alpha = original(module, x)
            if torch.is_grad_enabled():
                self.rates.append((theta / module.max_lr).flatten())
            return theta, eta, alpha

        monkeypatch.setattr(NeuralMemory, "gates", gates)

    def mean(self, form="rate"):
        rate = torch.cat(self.rates)
        self.rates.clear()
        return (rate if form == "rate" else rate.log()).mean()


def test_write_rate_is_the_mean_gate_over_the_scored_tokens(monkeypatch):
    run = _sigmoid_theta(tiny_run("unused"))  # MAC, 16-token segments: two segments per row
    torch.manual_seed(0)
    model = TitansLM(run.model)
    ids = torch.randint(0, 257, (2, 40))
    reference = _GateRates(monkeypatch)
    record = trainer_mod._WriteRate(model)
    prefix = 8  # streamed without gradient: not priced
    trainer_mod._loss_sum(model, ids, ids, nullcontext(), None, prefix)
    n_calls = len(reference.rates)
    (priced, rate), expected = record.take(), reference.mean()
    assert n_calls >= 2 * run.model.depth  # several segments per memory
    assert rate.requires_grad and float(rate.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert priced is rate
    assert record.take() is None  # take() starts afresh
    # the log form prices the mean log rate, and still reports the mean rate
    logged = trainer_mod._WriteRate(model, "log_rate")
    trainer_mod._loss_sum(model, ids, ids, nullcontext(), None, prefix)
    rates = torch.cat(reference.rates)
    reference.rates.clear()
    (priced, rate), _ = logged.take(), record.take()
    assert float(priced.detach()) == pytest.approx(float(rates.detach().log().mean()), rel=1e-5)
    assert float(rate.detach()) == pytest.approx(float(rates.detach().mean()), rel=1e-6)
    with pytest.raises(ConfigError, match="write_penalty_form must be"):
        trainer_mod._WriteRate(model, "square")


@pytest.mark.parametrize("form", ["rate", "log_rate"])
def test_write_penalty_gradient_is_the_penalty_times_the_mean_rates_gradient(tmp_path, monkeypatch, form):
    """One plain-SGD step (lr 1) with and without the penalty: the difference of the gates'
    weights is -penalty x the gradient of the mean rate (or mean log rate) over the whole batch,
    however the batch is split into micro batches."""
    from _train_helpers import CountingSource

    monkeypatch.setattr(trainer_mod, "build_optimizer", lambda model, cfg: torch.optim.SGD(model.parameters(), lr=1.0))
    penalty = 2.0

    def step(name, write_penalty, micro_batch):
        run = _sigmoid_theta(tiny_run(tmp_path / name, train_only=r"memory\.to_theta\.", write_penalty=write_penalty,
                                      write_penalty_form=form, micro_batch=micro_batch, max_steps=1, warmup_steps=1,
                                      grad_clip=0.0, checkpoint_every=0))  # fmt: skip
        summary = trainer_mod.train(run)
        return run, ckpt.load_pretrained(summary["checkpoint"])[0].state_dict()

    run, plain = step("plain", 0.0, 2)
    _, priced = step("priced", penalty, 2)
    _, priced_whole = step("priced-whole", penalty, 4)
    torch.manual_seed(run.train.seed)  # the trainer's initial weights, and the step's 4 rows
    model = TitansLM(run.model)
    rows = CountingSource(run.train.seq_len, run.train.seed).next_batch(4)
    reference = _GateRates(monkeypatch)
    model(rows)
    reference.mean(form).backward()
    gates = [k for k in plain if ".to_theta." in k]
    assert gates
    for key in gates:
        grad = dict(model.named_parameters())[key].grad
        torch.testing.assert_close((plain[key] - priced[key]) / penalty, grad, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(priced_whole[key], priced[key], rtol=1e-4, atol=1e-6)


def test_write_penalty_lowers_the_write_rate_and_is_checked(tmp_path, monkeypatch):
    def run(name, penalty):
        r = tiny_run(tmp_path / name, train_only=r"memory\.to_theta\.", write_penalty=penalty, max_steps=6,
                     checkpoint_every=0, lr=0.2)  # fmt: skip
        return trainer_mod.train(_sigmoid_theta(r))

    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    plain, penalised = run("plain", 0.0), run("penalised", 10.0)
    reference = _GateRates(monkeypatch)
    rate = {}
    for s in (plain, penalised):
        ckpt.load_pretrained(s["checkpoint"])[0](ids)  # gradients on: _GateRates records
        rate[s["checkpoint"]] = float(reference.mean().detach())
    assert rate[penalised["checkpoint"]] < rate[plain["checkpoint"]] - 0.1, rate
    logged = [json.loads(line) for line in (tmp_path / "penalised" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["write_rate"] < 1 for r in logged if "loss" in r)
    assert "write_rate" not in (tmp_path / "plain" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="memory_theta_activation=sigmoid"):
        trainer_mod.train(tiny_run(tmp_path / "softplus", write_penalty=1.0, max_steps=1))
    with pytest.raises(ConfigError, match="needs a model with a neural memory"):
        trainer_mod.train(tiny_run(tmp_path / "swa", variant="swa", write_penalty=1.0, max_steps=1))
    with pytest.raises(ConfigError, match="memory_theta_activation=sigmoid"):  # caught when the config is read
        RunConfig.from_dict({"model": {"variant": "mag"}, "train": {"write_penalty": 1.0}})
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="write_penalty must be"):
            tiny_run(tmp_path / "bad", write_penalty=bad).train.validate()
    with pytest.raises(ConfigError, match="write_penalty_form must be"):
        tiny_run(tmp_path / "bad", write_penalty=1.0, write_penalty_form="log").train.validate()
