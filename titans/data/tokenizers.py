"""Tokenizers behind one interface.

Every tokenizer has ``name``, ``vocab_size``, ``eos_id``, ``encode(text) -> list[int]``,
``decode(ids) -> str`` and ``to_spec() -> dict``: a JSON-serialisable description from which
``load_tokenizer(spec)`` rebuilds an identical tokenizer (checkpoints and shard manifests store it).

Three kinds:

- ``ByteTokenizer``: UTF-8 bytes and one end-of-document id; needs no files.
- ``SentencePieceTokenizer(path)``: a SentencePiece model file, e.g. the Llama-2-style 32K model
  that the PyPI package ``mistral-common`` ships (``find_mistral_tokenizer_model()``). The spec
  stores the path and the file's SHA-256; a different file at that path is refused.
- ``BPETokenizer``: a byte-level BPE trained on your corpus with ``train_bpe`` (Hugging Face
  ``tokenizers``); the spec holds the whole tokenizer JSON, so it needs no file.
- ``WordTokenizer(words)``: whole words of a fixed list as single tokens, UTF-8 bytes for
  everything else; ``"words"`` alone is the NIAH vocabulary (``titans.data.words.niah_words``:
  the needle keys and values, the noise haystack and the prompt templates), so a needle's key and
  value are one token each. The spec holds the word list.

``encode_batch(tokenizer, texts)`` encodes many documents at once with the tokenizer's own batch
path when it has one (SentencePiece and ``tokenizers`` are much faster that way).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..io.files import sha256_file

__all__ = [
    "MISTRAL_REQUIREMENT",
    "BPETokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "encode_batch",
    "find_mistral_tokenizer_model",
    "load_tokenizer",
    "parse_tokenizer_arg",
    "train_bpe",
]

# The release whose tokenizer.model.v1 is used when mistral_common is not installed.
MISTRAL_REQUIREMENT = "mistral-common==1.13.1"
MISTRAL_MODEL_FILE = "tokenizer.model.v1"
BPE_EOS_TOKEN = "<|endoftext|>"
KNOWN = ("bytes", "sentencepiece", "bpe", "words")


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 and one end-of-document id 256 (vocab 257). Needs no files."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # ids outside 0..255 (end-of-document) are not text; invalid UTF-8 becomes U+FFFD
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_spec(self) -> dict[str, Any]:
        return {"name": "bytes"}

    def __repr__(self) -> str:
        return "ByteTokenizer()"



# How text splits into pieces: a word or a number with its leading space, one other character
# with its leading space, or one whitespace character. Every character is in exactly one piece,
# so the pieces of a text concatenate back to it.
_WORD_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\s")


class WordTokenizer:
    """Whole pieces from a fixed list as single tokens; UTF-8 bytes for every other piece.

    Ids 0..255 are bytes, 256 is end-of-document, ``257 + i`` is ``words[i]``. Text splits into
    pieces (a word or number with its leading space, one other character with its leading space,
    one whitespace character); a piece in the list is one token, any other piece is its bytes, so
    ``decode(encode(text)) == text`` for every text. Each entry must be one such piece (like
    ``" apple"`` or ``"The"``). Meant for tasks whose vocabulary is known: with the NIAH list a
    needle's key and value are one token each, which is what the memory's one-token-back key
    (``memory_associative_init``) stores and finds again.
    """

    name = "words"
    eos_id = 256

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if not words:
            raise ValueError("WordTokenizer needs at least one word")
        bad = [w for w in words if not isinstance(w, str) or _WORD_PIECE.fullmatch(w) is None or len(w.encode()) < 2]
        if bad:
            raise ValueError(f"word list entries must be single multi-byte pieces like ' apple' or 'The'; got {bad[:5]!r}")
        self._ids = {w: 257 + i for i, w in enumerate(words)}
        if len(self._ids) != len(words):
            raise ValueError("word list has duplicate entries")
        self.words = words
        self._pieces = [w.encode("utf-8") for w in words]
        self.vocab_size = 257 + len(words)
        blob = json.dumps(words, ensure_ascii=False).encode("utf-8")
        self._spec = {"name": "words", "words": words, "sha256": hashlib.sha256(blob).hexdigest()}

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in _WORD_PIECE.findall(text):
            i = self._ids.get(piece)
            if i is None:
                out.extend(piece.encode("utf-8"))
            else:
                out.append(i)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        # end-of-document and ids outside the vocabulary are not text; invalid UTF-8 becomes U+FFFD
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
            elif 257 <= i < self.vocab_size:
                buf += self._pieces[i - 257]
        return buf.decode("utf-8", errors="replace")

    def to_spec(self) -> dict[str, Any]:
        return self._spec

    def __repr__(self) -> str:
        return f"WordTokenizer({len(self.words)} words)"


def _load_words(spec: dict[str, Any]) -> WordTokenizer:
    if "words" not in spec:  # the built-in NIAH vocabulary (needs the wonderwords word lists)
        from .words import niah_words

        return WordTokenizer(niah_words())
    words = spec["words"]
    if not isinstance(words, list):
        raise ValueError("a 'words' tokenizer spec must hold its word list under 'words'")
    blob = json.dumps(words, ensure_ascii=False).encode("utf-8")
    if "sha256" in spec and hashlib.sha256(blob).hexdigest() != spec["sha256"]:
        raise ValueError("words tokenizer spec is corrupt: its word list does not match the recorded sha256")
    return WordTokenizer(words)


class SentencePieceTokenizer:
    """A SentencePiece model file (``.model``). ``eos_id`` is the model's own end-of-sequence id.

    ``sha256``: if given, the file must have this checksum (``load_tokenizer`` passes the one the
    spec recorded, so a checkpoint never silently runs with another vocabulary).
    """

    name = "sentencepiece"

    def __init__(self, path: str | os.PathLike, sha256: str | None = None):
        import sentencepiece as spm

        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        digest = sha256_file(path)
        if sha256 is not None and digest != sha256:
            raise ValueError(
                f"SentencePiece model {path} has sha256 {digest}, but the spec expects {sha256}: "
                "this is a different tokenizer than the one the data or checkpoint was made with"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{path} is not a readable SentencePiece model: {err}") from err
        self.path, self.sha256 = path, digest
        self.vocab_size = int(self._sp.vocab_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path} defines no end-of-sequence token")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        # control pieces (eos, bos) decode to nothing; byte-fallback pieces decode to their bytes
        return self._sp.decode([int(i) for i in ids])

    def to_spec(self) -> dict[str, Any]:
        return {"name": "sentencepiece", "path": str(self.path), "sha256": self.sha256}

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r})"


def find_mistral_tokenizer_model() -> Path:
    """Path of ``mistral_common/data/tokenizer.model.v1`` (SentencePiece, 32K, Llama-2 style).

    An installed ``mistral_common`` is used if importable; otherwise the pinned release is fetched
    once from the package registry into the cache (``titans.data.packages``). Never a hub download.
    """
    try:
        import importlib.util

        spec = importlib.util.find_spec("mistral_common")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = Path(root) / "data" / MISTRAL_MODEL_FILE
            if candidate.is_file():
                return candidate
    from .packages import find_in_package

    found = [p for p in find_in_package(MISTRAL_REQUIREMENT, MISTRAL_MODEL_FILE) if p.parent.name == "data"]
    if not found:
        raise FileNotFoundError(f"{MISTRAL_REQUIREMENT} has no mistral_common/data/{MISTRAL_MODEL_FILE}")
    return found[0]


class BPETokenizer:
    """A byte-level BPE (Hugging Face ``tokenizers``) with one end-of-document special token.

    Any text round-trips exactly (byte level: no unknown tokens). The end-of-document token is
    never produced from text: a literal ``<|endoftext|>`` in a document is encoded as ordinary
    bytes, so documents cannot inject document boundaries.
    """

    name = "bpe"

    def __init__(self, tokenizer, eos_token: str = BPE_EOS_TOKEN):
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"BPE tokenizer has no end-of-document token {eos_token!r}")
        tokenizer.encode_special_tokens = True  # see class docstring
        self._tok, self.eos_token = tokenizer, eos_token
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_id = int(eos)

    @classmethod
    def from_json(cls, text: str, eos_token: str = BPE_EOS_TOKEN) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"BPE spec holds no valid tokenizer JSON: {err}") from err
        return cls(tok, eos_token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self._tok.to_str()

    def to_spec(self) -> dict[str, Any]:
        text = self.to_json()
        return {
            "name": "bpe",
            "vocab_size": self.vocab_size,
            "eos_token": self.eos_token,
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "json": text,
        }

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def train_bpe(
    texts: Iterable[str] | None = None,
    vocab_size: int = 8192,
    *,
    files: Sequence[str | os.PathLike] | None = None,
    min_frequency: int = 2,
    eos_token: str = BPE_EOS_TOKEN,
    show_progress: bool = False,
) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` (an iterable of documents) or plain-text ``files``.

    ``vocab_size`` counts the 256 byte symbols and the end-of-document token, so it must be at
    least 258. Training is deterministic for the same input in the same order.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if (texts is None) == (files is None):
        raise ValueError("train_bpe needs exactly one of texts= or files=")
    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"BPE vocab_size must be an integer >= 258 (256 bytes + eos + merges), got {vocab_size!r}")
    tok = HFTokenizer(models.BPE())
    # add_prefix_space=False: encode(text) must decode to exactly text
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    if files is not None:
        paths = [Path(f) for f in files]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"BPE training file not found: {p}")
        tok.train([str(p) for p in paths], trainer)
    else:
        if isinstance(texts, str):
            raise TypeError("train_bpe(texts=...) takes an iterable of documents, not one string")
        tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok, eos_token)


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """``[tokenizer.encode(t) for t in texts]``, through the tokenizer's batch path if it has one."""
    fast = getattr(tokenizer, "encode_batch", None)
    return fast(texts) if fast is not None else [tokenizer.encode(t) for t in texts]


def load_tokenizer(spec: dict[str, Any] | str) -> Tokenizer:
    """Rebuild a tokenizer from ``to_spec()`` output (or a bare name).

    Bare names: ``"bytes"``; ``"sentencepiece"`` (the mistral-common 32K model); ``"words"`` (the
    NIAH word vocabulary); a BPE must be trained first (``train_bpe``) and is rebuilt from its spec.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise TypeError(f"tokenizer spec must be a dict or a name, got {type(spec).__name__}")
    name = spec.get("name")
    if name == "bytes":
        return ByteTokenizer()
    if name == "sentencepiece":
        return _load_sentencepiece(spec)
    if name == "bpe":
        if "json" not in spec:
            raise ValueError("a 'bpe' tokenizer is trained on a corpus (train_bpe, or "
                             "`titans data prepare --tokenizer bpe:VOCAB`); its spec must hold the tokenizer 'json'")
        text = spec["json"]
        if "sha256" in spec and hashlib.sha256(text.encode("utf-8")).hexdigest() != spec["sha256"]:
            raise ValueError("BPE spec is corrupt: its tokenizer JSON does not match the recorded sha256")
        return BPETokenizer.from_json(text, spec.get("eos_token", BPE_EOS_TOKEN))
    if name == "words":
        return _load_words(spec)
    raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(repr(k) for k in KNOWN)}")


def _load_sentencepiece(spec: dict[str, Any]) -> SentencePieceTokenizer:
    path, sha = spec.get("path"), spec.get("sha256")
    if path is None:
        return SentencePieceTokenizer(find_mistral_tokenizer_model(), sha)
    if not Path(path).is_file() and sha is not None:
        # A checkpoint moved to another machine: the mistral-common model is acceptable only if it
        # is byte-identical to the recorded one.
        try:
            candidate = find_mistral_tokenizer_model()
        except (OSError, RuntimeError):  # not available offline (PackageUnavailable): report below
            candidate = None
        if candidate is not None and sha256_file(candidate) == sha:
            return SentencePieceTokenizer(candidate, sha)
        raise FileNotFoundError(
            f"SentencePiece model {path} (sha256 {sha}) not found; copy that file there or rebuild "
            "the spec with the model you have"
        )
    return SentencePieceTokenizer(path, sha)


def parse_tokenizer_arg(text: str) -> dict[str, Any]:
    """The command line's ``--tokenizer`` value as a request (the BPE is trained later).

    ``bytes`` -> {"name": "bytes"}; ``words`` -> the NIAH word vocabulary; ``sentencepiece`` -> the mistral model;
    ``sentencepiece:PATH`` -> that model; ``bpe:VOCAB`` -> {"name": "bpe", "vocab_size": VOCAB}.
    """
    name, _, arg = text.partition(":")
    if name in ("bytes", "words") and not arg:
        return {"name": name}
    if name == "sentencepiece":
        return {"name": "sentencepiece", "path": arg} if arg else {"name": "sentencepiece"}
    if name == "bpe":
        if not arg.isdigit():
            raise ValueError(f"--tokenizer bpe needs a vocabulary size, like bpe:8192 (got {text!r})")
        return {"name": "bpe", "vocab_size": int(arg)}
    raise ValueError(f"unknown tokenizer {text!r}; use bytes, words, sentencepiece, sentencepiece:PATH or bpe:VOCAB")
