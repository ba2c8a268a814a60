"""Tokenizers: exact round trips, specs that rebuild identical tokenizers, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from titans.data import tokenizers as tokenizers_mod
from titans.data.packages import cache_root
from titans.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    encode_batch,
    find_mistral_tokenizer_model,
    load_tokenizer,
    parse_tokenizer_arg,
    train_bpe,
)

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Naïve café — ünïcödé, 日本語のテキスト, emoji 😀 and a tab\there.",
    "  leading spaces, trailing spaces   \n\nand blank lines\r\n",
    "",
    "x",
]

CORPUS = [
    (
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles."
    ),
    "The Titans architecture adds a neural long-term memory that learns at test time.",
    "Memory is the process by which information is encoded, stored and retrieved.",
] * 20


def _round_trips(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_id]) == text  # end-of-document decodes to nothing


def _rebuilds(tok: Tokenizer) -> Tokenizer:
    spec = json.loads(json.dumps(tok.to_spec()))  # JSON-serialisable
    again = load_tokenizer(spec)
    assert (again.name, again.vocab_size, again.eos_id) == (tok.name, tok.vocab_size, tok.eos_id)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    return again


def test_bytes_round_trip_and_spec():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    _round_trips(tok)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert load_tokenizer("bytes").to_spec() == {"name": "bytes"}
    _rebuilds(tok)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece model trained here (byte fallback, so every text round-trips)."""
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(prefix), vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


def test_sentencepiece_round_trip_and_spec(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 300 and tok.eos_id == tok._sp.eos_id() == 2
    _round_trips(tok)
    spec = tok.to_spec()
    assert spec["path"] == str(sp_model.resolve()) and len(spec["sha256"]) == 64
    _rebuilds(tok)
    assert encode_batch(tok, TEXTS) == [tok.encode(t) for t in TEXTS]


def test_sentencepiece_refuses_other_file_and_missing_file(sp_model, tmp_path, monkeypatch):
    spec = SentencePieceTokenizer(sp_model).to_spec()
    # a moved checkpoint falls back to the mistral-common model only if it is byte-identical
    monkeypatch.setattr(tokenizers_mod, "find_mistral_tokenizer_model", lambda: sp_model)
    moved = load_tokenizer({**spec, "path": str(tmp_path / "moved" / "tiny.model")})
    assert moved.path == sp_model.resolve() and moved.encode(TEXTS[0]) == SentencePieceTokenizer(sp_model).encode(TEXTS[0])
    other = tmp_path / "other.model"
    shutil.copy(sp_model, other)
    with open(other, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="different tokenizer"):
        load_tokenizer({**spec, "path": str(other), "sha256": spec["sha256"]})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer({**spec, "path": str(tmp_path / "gone.model"), "sha256": "0" * 64})
    with pytest.raises(FileNotFoundError, match="not found"):
        SentencePieceTokenizer(tmp_path / "gone.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        SentencePieceTokenizer(junk)


def _mistral_available() -> bool:
    import importlib.util

    cached = cache_root() / "packages" / "mistral-common-1.13.1" / "SOURCE.json"
    return importlib.util.find_spec("mistral_common") is not None or cached.is_file()


@pytest.mark.skipif(not _mistral_available(), reason="mistral-common not installed or cached (needs a registry)")
def test_mistral_sentencepiece_32k():
    path = find_mistral_tokenizer_model()
    assert path.name == "tokenizer.model.v1" and path.parent.name == "data"
    tok = load_tokenizer("sentencepiece")
    assert (tok.vocab_size, tok.eos_id) == (32000, 2)
    _round_trips(tok)
    assert tok.encode("Hello world") == [22557, 1526]  # Llama-2 vocabulary, no BOS added
    _rebuilds(tok)


def test_bpe_train_round_trip_and_spec():
    tok = train_bpe(CORPUS, vocab_size=300)
    assert isinstance(tok, BPETokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == 300
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    _round_trips(tok)  # byte level: unseen scripts and emoji still round-trip
    assert len(tok.encode(CORPUS[0])) < 0.7 * len(CORPUS[0].encode())  # merges were learnt
    spec = tok.to_spec()
    assert isinstance(spec["json"], str)  # self-contained: no file needed
    again = _rebuilds(tok)
    assert again.to_spec() == spec
    assert encode_batch(tok, TEXTS) == [tok.encode(t) for t in TEXTS]


def test_bpe_text_cannot_inject_end_of_document():
    tok = train_bpe(CORPUS, vocab_size=280)
    ids = tok.encode("before <|endoftext|> after")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "before <|endoftext|> after"


def test_bpe_training_is_deterministic_and_from_files(tmp_path):
    a = train_bpe(CORPUS, vocab_size=290)
    b = train_bpe(iter(CORPUS), vocab_size=290)
    assert a.to_spec()["sha256"] == b.to_spec()["sha256"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS))
    c = train_bpe(files=[path], vocab_size=290)
    assert c.decode(c.encode(TEXTS[1])) == TEXTS[1]
    with pytest.raises(FileNotFoundError):
        train_bpe(files=[tmp_path / "missing.txt"], vocab_size=290)


def test_bpe_bad_arguments_and_corrupt_spec():
    with pytest.raises(ValueError, match="258"):
        train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="exactly one"):
        train_bpe(vocab_size=300)
    with pytest.raises(TypeError, match="iterable of documents"):
        train_bpe("one string", vocab_size=300)
    spec = train_bpe(CORPUS, vocab_size=280).to_spec()
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer({**spec, "json": spec["json"].replace('"<|endoftext|>"', '"<|eot|>"', 1)})
    with pytest.raises(ValueError, match="no valid tokenizer JSON"):
        load_tokenizer({"name": "bpe", "json": "{not json"})
    with pytest.raises(ValueError, match="trained"):
        load_tokenizer("bpe")


def test_words_round_trip_and_spec():
    tok = WordTokenizer([" quick", " fox", "Hello", " 😀"])
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 261
    _round_trips(tok)
    assert tok.encode("Hello, quick fox!") == [259, ord(","), 257, 258, ord("!")]
    assert tok.encode("quick foxes") == list(b"quick foxes")  # not a whole listed piece: bytes
    assert tok.encode(" quick") == [257] and tok.decode([257, 256, 9999]) == " quick"  # eos / unknown ids: no text
    again = _rebuilds(tok)
    assert again.words == tok.words
    spec = dict(tok.to_spec(), words=[" quick", " fox"])
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(spec)
    for bad in ([], [" quick", " quick"], ["two words"], ["a"], [" fox!"], [3]):
        with pytest.raises(ValueError, match="word"):
            WordTokenizer(bad)


def test_words_niah_vocabulary():
    try:
        tok = load_tokenizer("words")
    except Exception as err:  # PackageUnavailable: the word lists come from a registry package
        pytest.skip(f"NIAH word lists unavailable: {err}")
    _round_trips(tok)
    assert len(tok.encode(" grasshopper 657")) == 2 and len(tok.encode("The grass is green.")) == 5
    assert load_tokenizer(json.loads(json.dumps(tok.to_spec()))).words == tok.words


# SHA-256 of the built-in words vocabulary as the tokenizer's spec records it; the shipped
# checkpoints' token ids are positions in this list, so it may never change.
NIAH_WORDS_SHA256 = "ca3195193eb9242e7079ba5cda7bf7aa194b0da86e77e18ce71565d02ead971a"


def test_words_niah_vocabulary_is_unchanged():
    import hashlib
    from pathlib import Path

    from titans.data.words import niah_words

    try:
        words = list(niah_words())
    except Exception as err:  # PackageUnavailable: the word lists come from a registry package
        pytest.skip(f"NIAH word lists unavailable: {err}")
    blob = json.dumps(words, ensure_ascii=False).encode("utf-8")
    assert len(words) == 8492 and hashlib.sha256(blob).hexdigest() == NIAH_WORDS_SHA256
    assert load_tokenizer("words").to_spec()["sha256"] == NIAH_WORDS_SHA256
    shipped = Path(tokenizers_mod.__file__).parents[1] / "checkpoints"
    for run in sorted(shipped.glob("*/run.json")):
        spec = json.loads(run.read_text())["tokenizer"]
        if spec["name"] == "words":
            assert spec["sha256"] == NIAH_WORDS_SHA256, run


def test_unknown_tokenizer_names():
    with pytest.raises(ValueError, match=r"unknown tokenizer 'gpt2'.*'bytes'"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer({"path": "x"})
    with pytest.raises(TypeError):
        load_tokenizer(42)


def test_parse_tokenizer_arg():
    assert parse_tokenizer_arg("bytes") == {"name": "bytes"}
    assert parse_tokenizer_arg("words") == {"name": "words"}
    assert parse_tokenizer_arg("sentencepiece") == {"name": "sentencepiece"}
    assert parse_tokenizer_arg("sentencepiece:/m/x.model") == {"name": "sentencepiece", "path": "/m/x.model"}
    assert parse_tokenizer_arg("bpe:8192") == {"name": "bpe", "vocab_size": 8192}
    for bad in ("bpe", "bpe:lots", "bytes:1", "wordpiece", "words:x"):
        with pytest.raises(ValueError, match="tokenizer"):
            parse_tokenizer_arg(bad)
