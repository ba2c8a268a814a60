"""Tokenizers behind one interface.

Every tokenizer has ``name``, ``vocab_size``, ``eos_id``, ``encode(text) -> list[int]``,
``decode(ids) -> str`` and ``to_spec() -> dict``: a JSON-serialisable description from which
``load_tokenizer(spec)`` rebuilds an identical tokenizer (checkpoints and shard manifests store it).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

__all__ = ["Tokenizer", "ByteTokenizer", "load_tokenizer"]


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


def load_tokenizer(spec: dict[str, Any] | str) -> Tokenizer:
    """Rebuild a tokenizer from ``to_spec()`` output (or a bare name such as ``"bytes"``)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    name = spec.get("name")
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; known: 'bytes'")
