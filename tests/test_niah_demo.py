"""The needle demonstration's machinery: checkpoints found or a clear error, a table and a heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from titans.data.tokenizers import ByteTokenizer
from titans.demos import niah
from titans.errors import UserError
from titans.model import TitansConfig, TitansLM
from titans.train.checkpoint import save_for_inference
from titans.train.config import load_run_config


def _fake_checkpoints(root):
    for name, variant in ((niah.DEMO_MODELS["titans-mag"], "mag"), (niah.DEMO_MODELS["swa"], "swa")):
        cfg = TitansConfig(variant=variant, vocab_size=257, dim=32, depth=1, heads=2, segment=64, window=64,
                           memory_chunk=16)  # fmt: skip
        save_for_inference(TitansLM(cfg), ByteTokenizer(), root / name, note={"command": "test"})


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(UserError, match="titans demo niah --retrain"):
        niah.shipped_checkpoint("titans-mag", root=tmp_path)


def test_demo_streams_every_length_and_writes_table_and_heatmap(tmp_path):
    _fake_checkpoints(tmp_path / "ck")
    result = niah.run_demo(["titans-mag", "swa"], [512, 1024], 2, tmp_path / "out", chunk_tokens=256,
                                variants=["kv-pk"], progress=False, root=tmp_path / "ck")  # fmt: skip
    assert [(r["model"], r["length"]) for r in result["rows"]] == [
        ("titans-mag", 512), ("titans-mag", 1024), ("swa", 512), ("swa", 1024)]
    assert all(0 <= r["accuracy"] <= 100 and r["tokens_per_s"] > 0 for r in result["rows"])
    assert "titans-mag" in result["table"] and "1K" in result["table"]
    assert (tmp_path / "out" / "niah_heatmap.png").stat().st_size > 1000


def test_demo_runs_multi_key_variants_and_stops_a_growing_state_at_its_length(tmp_path, monkeypatch):
    """The multi-key variants stream end to end with a word-tokenizer checkpoint; a model with a
    MAX_LENGTH is not run beyond it and its cells say so."""
    from titans.data.tokenizers import load_tokenizer

    try:
        words = load_tokenizer("words")
    except Exception as err:  # PackageUnavailable: the word lists come from a registry package
        pytest.skip(f"NIAH word lists unavailable: {err}")
    cfg = TitansConfig(variant="mag", vocab_size=words.vocab_size, dim=32, depth=1, heads=2, memory_chunk=4,
                       window=16, memory_associative_init=True)  # fmt: skip
    save_for_inference(TitansLM(cfg), words, tmp_path / "ck" / niah.DEMO_MODELS["titans-mag"], note={"command": "test"})
    monkeypatch.setitem(niah.MAX_LENGTH, "titans-mag", 300)
    result = niah.run_demo(["titans-mag"], [300, 400], 2, tmp_path / "out", variants=["mk-n", "mk-pk"],
                                chunk_tokens=128, progress=False, root=tmp_path / "ck")  # fmt: skip
    assert [(r["variant"], r["length"]) for r in result["rows"]] == [("mk-n", 300), ("mk-pk", 300)]
    assert all(0 <= r["accuracy"] <= 100 and r["distractor"] is not None for r in result["rows"])
    assert "MK-NIAH-N" in result["table"] and "-: not run (titans-mag above 300" in result["table"]


def test_retrain_runs_curriculum_stages_in_order(tmp_path, monkeypatch):
    """A recipe with ``train.init_from: recipe:NAME`` trains NAME first and starts from its run."""
    import titans.train.checkpoint as ckpt_mod
    import titans.train.trainer as trainer_mod

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "a.yaml").write_text("model:\n  variant: lmm\ntrain:\n  seed: 3\n")
    (recipes / "b.yaml").write_text("model:\n  variant: lmm\ntrain:\n  seed: 3\n  init_from: recipe:a\n")
    (recipes / "loop.yaml").write_text("model:\n  variant: lmm\ntrain:\n  init_from: recipe:loop\n")
    trained, exported = [], []

    def fake_train(run, resume=None):
        trained.append((run.train.out_dir, run.train.init_from, resume))
        return {"step": 1, "val_loss": 1.0, "checkpoint": run.train.out_dir, "stopped": "max_steps"}

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    monkeypatch.setattr(ckpt_mod, "export_for_inference",
                        lambda src, dst, note, model_settings: exported.append((src, dst, note, model_settings)))
    monkeypatch.setitem(niah.DEMO_MODELS, "staged", "b")
    monkeypatch.setitem(niah.INFERENCE_SETTINGS, "staged", {"memory_max_grad_norm": 3.0})
    niah.retrain(["staged"], tmp_path / "work", root=tmp_path / "ck", recipes=recipes)
    work = tmp_path / "work"
    assert trained == [(str(work / "a"), None, "auto"), (str(work / "b"), str(work / "a"), "auto")]
    assert exported[0][1] == tmp_path / "ck" / "b" and exported[0][2]["stages"] == ["a", "b"]
    assert exported[0][3] == {"memory_max_grad_norm": 3.0}  # the shipped test-time settings
    monkeypatch.setitem(niah.DEMO_MODELS, "looping", "loop")
    with pytest.raises(UserError, match="loop"):
        niah.retrain(["looping"], tmp_path / "work", root=tmp_path / "ck", recipes=recipes)


def test_trainer_refuses_a_recipe_stage_name(tmp_path):
    from titans.io.config_files import ConfigError
    from titans.train.trainer import train

    run = load_run_config(None, [f"train.out_dir={tmp_path}", "train.init_from=recipe:niah-lmm", "data.kind=niah",
                                 "data.tokenizer=bytes", "model.vocab_size=257"])  # fmt: skip
    with pytest.raises(ConfigError, match="recipe stage"):
        train(run)


def test_shipped_checkpoints_find_a_needle_by_its_key():
    """The package's checkpoints load and, among four needles with different keys in 1,024 tokens
    of Shakespeare (needles the demo does not use: seed 1), the Titans MAG answers the asked one
    most of the time and never with another needle's value; the sliding window only when the
    asked needle is inside its 64-token window."""
    from titans.eval.niah import run_niah
    from titans.train.checkpoint import load_pretrained

    scores, distractors = {}, {}
    for name in niah.DEMO_MODELS:
        model, tokenizer, info = load_pretrained(niah.shipped_checkpoint(name))
        assert info["step"] > 0, f"{name}: the shipped checkpoint is untrained"
        result = run_niah(model, tokenizer, [1024], ["mk-n"], samples=11, depths=11, seed=1, batch_size=11,
                          progress=False, model_name=name, needles=4)  # fmt: skip
        scores[name] = {round(r["depth"], 1): r["score"] for r in result.records}
        distractors[name] = sum(r["distractor"] for r in result.records)
    assert sum(scores["titans-mag"].values()) >= 5 and distractors["titans-mag"] <= 1, (scores, distractors)  # 7, 0
    assert sum(scores["swa"].values()) <= 2, scores


def test_shipped_checkpoints_carry_their_checkpoint_settings():
    """What INFERENCE_SETTINGS says a shipped checkpoint runs with is what it loads with, and its
    provenance records the trained value beside it (so --retrain and the shipped files agree)."""
    from titans.train.checkpoint import load_pretrained

    for name, settings in niah.INFERENCE_SETTINGS.items():
        path = niah.shipped_checkpoint(name)
        model, _, _ = load_pretrained(path)
        record = json.loads((path / "run.json").read_text())["provenance"]["inference_settings"]
        for key, value in settings.items():
            assert getattr(model.cfg, key) == value and record[key]["inference"] == value


@pytest.mark.parametrize("recipe", sorted(p.name for p in niah.RECIPES.glob("*.yaml")))
def test_every_packaged_recipe_is_a_valid_run_config(recipe):
    run = load_run_config(str(niah.RECIPES / recipe))
    TitansLM(run.model)  # the model section builds
    assert run.data.kind in ("niah", "recall") and run.train.seq_len > run.train.detached_prefix >= 0


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in EXPERIMENTS.glob("*.yaml")))
def test_every_experiment_recipe_is_a_valid_run_config_that_starts_from_a_run(recipe):
    run = load_run_config(str(EXPERIMENTS / recipe))
    TitansLM(run.model)
    assert run.train.init_from is None or run.train.init_from.startswith("runs/")
