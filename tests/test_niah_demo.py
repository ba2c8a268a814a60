"""The needle demonstration's machinery: checkpoints found or a clear error, a table and a heatmap."""

from __future__ import annotations

import pytest

from titans import niah_demo
from titans.data.tokenizers import ByteTokenizer
from titans.errors import UserError
from titans.model import TitansConfig, TitansLM
from titans.train.checkpoint import save_for_inference


def _fake_checkpoints(root):
    for name, variant in (("niah-mac", "mac"), ("niah-swa", "swa")):
        cfg = TitansConfig(variant=variant, vocab_size=257, dim=32, depth=1, heads=2, segment=64, window=64,
                           memory_chunk=16)  # fmt: skip
        save_for_inference(TitansLM(cfg), ByteTokenizer(), root / name, note={"command": "test"})


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(UserError, match="titans demo niah --retrain"):
        niah_demo.shipped_checkpoint("titans-mac", root=tmp_path)


def test_demo_streams_every_length_and_writes_table_and_heatmap(tmp_path):
    _fake_checkpoints(tmp_path / "ck")
    result = niah_demo.run_demo(["titans-mac", "swa"], [512, 1024], 2, tmp_path / "out", chunk_tokens=256,
                                progress=False, root=tmp_path / "ck")  # fmt: skip
    assert [(r["model"], r["length"]) for r in result["rows"]] == [
        ("titans-mac", 512), ("titans-mac", 1024), ("swa", 512), ("swa", 1024)]
    assert all(0 <= r["accuracy"] <= 100 and r["tokens_per_s"] > 0 for r in result["rows"])
    assert "titans-mac" in result["table"] and "1K" in result["table"]
    assert (tmp_path / "out" / "niah_heatmap.png").stat().st_size > 1000


def test_demo_runs_the_pair_variant_with_the_word_tokenizer(tmp_path):
    """The one-token-needle variant streams end to end with a word-tokenizer checkpoint."""
    from titans.data.tokenizers import load_tokenizer

    try:
        words = load_tokenizer("words")
    except Exception as err:  # PackageUnavailable: the word lists come from a registry package
        pytest.skip(f"NIAH word lists unavailable: {err}")
    cfg = TitansConfig(variant="lmm", vocab_size=words.vocab_size, dim=32, depth=1, heads=2, memory_chunk=4,
                       memory_associative_init=True)  # fmt: skip
    save_for_inference(TitansLM(cfg), words, tmp_path / "ck" / "niah-mac", note={"command": "test"})
    result = niah_demo.run_demo(["titans-mac"], [300], 2, tmp_path / "out", variant="pair-pk", chunk_tokens=128,
                                progress=False, root=tmp_path / "ck")  # fmt: skip
    (row,) = result["rows"]
    assert row["length"] == 300 and 0 <= row["accuracy"] <= 100 and "pair-pk" in result["table"]


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
        return {"step": 1, "val_loss": 1.0, "checkpoint": run.train.out_dir}

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    monkeypatch.setattr(ckpt_mod, "export_for_inference", lambda src, dst, note: exported.append((src, dst, note)))
    monkeypatch.setitem(niah_demo.DEMO_MODELS, "staged", "b")
    niah_demo.retrain(["staged"], tmp_path / "work", root=tmp_path / "ck", recipes=recipes)
    work = tmp_path / "work"
    assert trained == [(str(work / "a"), None, "auto"), (str(work / "b"), str(work / "a"), "auto")]
    assert exported[0][1] == tmp_path / "ck" / "b" and exported[0][2]["stages"] == ["a", "b"]
    monkeypatch.setitem(niah_demo.DEMO_MODELS, "looping", "loop")
    with pytest.raises(UserError, match="loop"):
        niah_demo.retrain(["looping"], tmp_path / "work", root=tmp_path / "ck", recipes=recipes)


def test_trainer_refuses_a_recipe_stage_name(tmp_path):
    from titans.config_files import ConfigError
    from titans.train.config import load_run_config
    from titans.train.trainer import train

    run = load_run_config(None, [f"train.out_dir={tmp_path}", "train.init_from=recipe:niah-lmm", "data.kind=niah",
                                 "data.tokenizer=bytes", "model.vocab_size=257"])  # fmt: skip
    with pytest.raises(ConfigError, match="recipe stage"):
        train(run)
