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
