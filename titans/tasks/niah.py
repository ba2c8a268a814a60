"""Single needle in a haystack (S-NIAH) in RULER's format.

One needle ``"One of the special magic {type_needle_v} for {key} is: {value}."`` (key an
adjective-noun pair from the ``wonderwords`` word lists) is hidden in a haystack; the prompt asks
for the value and ends with RULER's answer prefix. Variants (the Titans paper's Table 2):

- ``pk`` (S-NIAH-PK, pass-key): the noise haystack (RULER's five sentences, repeated one block a
  line) and a 7-digit number;
- ``n`` (S-NIAH-N): book text and a 7-digit number;
- ``w`` (S-NIAH-W): book text and an adjective-noun word as the value;
- ``uuid``: book text and a UUID.

The ``kv-`` variants (``kv-pk``, ``kv-n``, ``kv-w``: same haystacks, needles and values) drop the
instruction: the prompt is the context, a new line, the question ``"What is the special magic
{number|word} for {key}?"`` and the answer prefix ``" The special magic {number|word} for {key}
is:"``, which ends as the needle does before its value (the pass-key prompt of Mohtashami & Jaggi,
2023, is built the same way). These short prompts are what the demonstration's tiny byte-level
models are trained on (``dense_niah_ids``: several needles and questions in one training row),
where RULER's 150-byte instruction would fill much of a 1K-token row.

The ``pair-`` variants (``pair-pk``, ``pair-n``, ``pair-w``: noise / book haystacks, 3-digit
number / adjective values) are built for the word vocabulary (``titans.data.words.niah_words``,
the ``words`` tokenizer), where the key (one noun) and the value are one token each and the key
comes right before its value: the needle ``"Remember the pair: {key} {value}."``, the question
line ``"Recall the pair:"`` and the answer prefix ``" {key}"``. A memory whose write key is the
previous token (``memory_associative_init``) stores exactly ``key -> value`` at the needle and
reads it back at the question: the shape of task on which the tiny models learn to retrieve.

The prompt measures at most ``length`` tokens of the given tokenizer and at least ``length``
minus about one haystack sentence (the haystack is cut at sentence boundaries; for book text the
best-fitting of several windows is taken, so usually within a few tokens). A prediction scores 1
when the value is in it, case-insensitively (RULER's ``string_match_all`` for one needle).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from ..data.words import (
    NEEDLE,
    PAIR_NEEDLE,
    PAIR_QUESTION,
    RULER_ANSWER_PREFIX,
    RULER_TEMPLATE,
    pair_lists,
    word_lists,
)
from .text_sources import TokenizedHaystack, _spec_key, continuation_ids, encode_pieces, haystack, prediction_text

__all__ = [
    "PAIR_VARIANTS",
    "SHORT_VARIANTS",
    "VARIANTS",
    "NiahSample",
    "continuation_ids",
    "generate_niah",
    "niah_token_ids",
    "random_key",
    "dense_niah_ids",
    "prompt_parts",
    "ruler_prompt_parts",
    "score_niah",
]

# variant -> (haystack, RULER's type_needle_v)
VARIANTS = {
    "pk": ("noise", "numbers"),
    "n": ("book", "numbers"),
    "w": ("book", "words"),
    "uuid": ("book", "uuids"),
    "kv-pk": ("noise", "numbers"),
    "kv-n": ("book", "numbers"),
    "kv-w": ("book", "words"),
    "pair-pk": ("noise", "numbers"),
    "pair-n": ("book", "numbers"),
    "pair-w": ("book", "words"),
}
# variants whose prompt is ``context \n question`` (no instruction, no answer prefix)
SHORT_VARIANTS = ("kv-pk", "kv-n", "kv-w")
# variants with one-word keys and values, the key right before its value (see the module docstring)
PAIR_VARIANTS = ("pair-pk", "pair-n", "pair-w")

# How many haystack windows to try for the one that fills the budget best (book haystacks).
_WINDOW_TRIES = 64


def _singular(text: str) -> str:
    # RULER rewrites its template like this when one value is asked for (niah.py)
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


def ruler_prompt_parts(type_needle_v: str, key: str) -> tuple[str, str, str]:
    """``(instruction, question, answer_prefix)`` of RULER's single-needle prompt for a needle
    type ("numbers", "words" or "uuids"); the prompt is ``instruction\\ncontext\\nquestion`` +
    ``answer_prefix``."""
    single = type_needle_v[:-1]  # "numbers" -> "number", as RULER does
    head, rest = _singular(RULER_TEMPLATE).split("\n{context}\n")
    prefix = _singular(RULER_ANSWER_PREFIX)
    return (
        head.format(type_needle_v=single),
        rest.format(type_needle_v=single, query=key),
        prefix.format(type_needle_v=single, query=key),
    )


def prompt_parts(variant: str, key: str) -> tuple[str, str, str]:
    """``(instruction, question, answer_prefix)`` of ``variant``'s prompt: RULER's, or for the
    short ``kv-`` variants no instruction, ``"What is the special magic number for {key}?"`` and
    ``" The special magic number for {key} is:"``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown NIAH variant {variant!r}; known: {sorted(VARIANTS)}")
    type_needle_v = VARIANTS[variant][1]
    if variant in PAIR_VARIANTS:
        return "", PAIR_QUESTION, f" {key}"
    if variant in SHORT_VARIANTS:
        single = type_needle_v[:-1]
        return "", f"What is the special magic {single} for {key}?", f" The special magic {single} for {key} is:"
    return ruler_prompt_parts(type_needle_v, key)


@dataclass
class NiahSample:
    """One S-NIAH prompt; ``prompt`` is what the model reads, ``answers`` what it must produce."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    depth: float  # requested needle depth, 0 = start of the haystack, 1 = end
    key: str
    value: str
    variant: str
    length: int  # target prompt length in tokens (the prompt never exceeds it)

    @property
    def instruction(self) -> str:
        return prompt_parts(self.variant, self.key)[0]

    @property
    def prompt(self) -> str:
        head = f"{self.instruction}\n" if self.instruction else ""
        return f"{head}{self.context}\n{self.question}{self.answer_prefix}"


def random_key(rng: np.random.Generator) -> str:
    """An adjective-noun pair (uniform over the product of the two lists, as RULER's words)."""
    adjs, nouns = word_lists()
    return f"{adjs[rng.integers(len(adjs))]}-{nouns[rng.integers(len(nouns))]}"


def _random_value(type_needle_v: str, rng: np.random.Generator, key: str) -> str:
    if type_needle_v == "numbers":
        return str(int(rng.integers(10**6, 10**7)))  # 7 digits
    if type_needle_v == "words":
        while (value := random_key(rng)) == key:
            pass
        return value
    if type_needle_v == "uuids":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    raise ValueError(f"unknown needle type {type_needle_v!r}")


class _Builder:
    """What every sample of one variant and tokenizer shares: the haystack and the fixed ids."""

    def __init__(self, tokenizer, variant: str, book: str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown NIAH variant {variant!r}; known: {sorted(VARIANTS)}")
        kind, self.type_needle_v = VARIANTS[variant]
        self.tokenizer, self.variant = tokenizer, variant
        self.hay: TokenizedHaystack = haystack("noise" if kind == "noise" else book, tokenizer)
        self.noise = kind == "noise"
        self.sep = "\n" if kind == "noise" else " "  # RULER: noise needles are lines of their own
        # the context's first separator is dropped: the budget gains its tokens
        self.first_sep = len(encode_pieces(tokenizer, [self.sep])[0])
        instruction = prompt_parts(variant, "KEY")[0]
        self.head = instruction + "\n" if instruction else ""
        self.head_ids = np.asarray(tokenizer.encode(self.head) if self.head else [], dtype=np.int64)

    def draw(self, rng: np.random.Generator) -> tuple[str, str, str, str, str]:
        if self.variant in PAIR_VARIANTS:
            keys, adjs = pair_lists()
            key = keys[rng.integers(len(keys))]
            value = str(int(rng.integers(100, 1000))) if self.type_needle_v == "numbers" else adjs[rng.integers(len(adjs))]
            _, question, prefix = prompt_parts(self.variant, key)
            return key, value, PAIR_NEEDLE.format(key=key, value=value), question, prefix
        key = random_key(rng)
        value = _random_value(self.type_needle_v, rng, key)
        needle = NEEDLE.format(type_needle_v=self.type_needle_v, key=key, value=value)
        _, question, prefix = prompt_parts(self.variant, key)
        return key, value, needle, question, prefix

    def starts(self, rng: np.random.Generator) -> np.ndarray:
        """Window starts to choose from: the noise haystack starts with a whole block; book text
        anywhere (the window that best fills the budget is taken)."""
        return np.zeros(1, dtype=np.int64) if self.noise else rng.integers(0, self.hay.n, _WINDOW_TRIES)

    def insert_at(self, depth: float, start: int, count: int) -> int:
        """Unit index of the needle, at ``depth`` of the haystack's tokens: any sentence boundary
        of book text, a line boundary (a multiple of the five-sentence block, or the end) of the
        noise."""
        return self.hay.boundary(start, count, depth, every=self.hay.n if self.noise else 1)


_BUILDERS: dict[tuple[str, str, str], _Builder] = {}


def _builder(tokenizer, variant: str, book: str) -> _Builder:
    key = (_spec_key(tokenizer), variant, book)  # equal specs tokenize identically
    if key not in _BUILDERS:
        _BUILDERS[key] = _Builder(tokenizer, variant, book)
    return _BUILDERS[key]


def _check_depths(depths, num_samples: int) -> np.ndarray:
    if depths is None:
        return np.array([0.5]) if num_samples == 1 else np.linspace(0.0, 1.0, num_samples)
    depths = np.asarray(depths, dtype=np.float64).reshape(-1)
    if depths.size == 0 or not ((depths >= 0) & (depths <= 1)).all():
        raise ValueError(f"depths must be a non-empty list of fractions in [0, 1], got {depths.tolist()}")
    return depths


def generate_niah(
    tokenizer,
    length: int,
    num_samples: int,
    *,
    variant: str = "pk",
    depths=None,
    seed: int = 0,
    book: str = "shakespeare",
) -> list[NiahSample]:
    """``num_samples`` S-NIAH prompts of at most ``length`` tokens of ``tokenizer``.

    Sample i puts its needle at ``depths[i % len(depths)]`` (a fraction of the haystack), so
    ``num_samples = r * len(depths)`` covers every depth r times; ``depths=None`` spreads the samples
    evenly over [0, 1]. Deterministic for ``(seed, length, variant)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    depths = _check_depths(depths, num_samples)
    b = _builder(tokenizer, variant, book)
    rng = np.random.default_rng([seed, length, list(VARIANTS).index(variant)])
    samples = []
    for i in range(num_samples):
        depth = float(depths[i % len(depths)])
        key, value, needle, question, prefix = b.draw(rng)
        tail = "\n" + question + prefix
        fixed = len(b.head_ids) + sum(map(len, encode_pieces(tokenizer, [tail, b.sep + needle])))
        if fixed > length:
            raise ValueError(
                f"length {length} is too short for a NIAH-{variant} prompt: instruction, needle and "
                f"question alone take {fixed} tokens of {tokenizer.name!r}"
            )

        def inserts(start: int, count: int, depth=depth, needle=needle) -> list[tuple[int, str]]:
            return [(b.insert_at(depth, start, count), needle)]

        context = b.hay.fit_context(length - fixed + b.first_sep, b.starts(rng), inserts, b.sep, b.head, tail, length)
        samples.append(NiahSample(context, question, prefix, [value], depth, key, value, variant, length))
    return samples


def niah_token_ids(
    tokenizer, total: int, rng: np.random.Generator, *, variant: str, depth: float, book: str = "shakespeare"
) -> tuple[np.ndarray, np.ndarray]:
    """A training document of exactly ``total`` tokens: ``(ids, answer_mask)``, both [total].

    ``eos`` padding (the few tokens a sentence-cut haystack leaves over), the prompt, the answer
    ``" {value}."`` and ``eos``; ``answer_mask`` is True on the answer and the final ``eos``. Built
    from pre-tokenised pieces (no encoding of the long text): for the byte tokenizer these are
    exactly the ids of the prompt string.
    """
    b = _builder(tokenizer, variant, book)
    _, value, needle, question, prefix = b.draw(rng)
    answer = np.asarray(continuation_ids(tokenizer, prefix, f" {value}.") + [tokenizer.eos_id], dtype=np.int64)
    tail, needle_ids = encode_pieces(tokenizer, ["\n" + question + prefix, b.sep + needle])
    tail_ids, needle_len = np.asarray(tail, dtype=np.int64), len(needle_ids)
    budget = total - len(answer) - len(b.head_ids) - len(tail_ids) - needle_len
    if budget < 0:
        raise ValueError(f"{total} tokens are too few for a NIAH-{variant} document (needs {total - budget})")
    start, count = b.hay.fit(budget + b.first_sep, b.starts(rng))
    while True:
        _, context_ids = b.hay.assemble(start, count, [(b.insert_at(depth, start, count), needle)], b.sep)
        prompt_len = len(b.head_ids) + len(context_ids) + len(tail_ids)
        if prompt_len + len(answer) <= total or count == 0:
            break
        count -= 1  # only when re-encoding the first sentence made it longer
    pad = total - prompt_len - len(answer)
    if pad < 0:
        raise ValueError(f"{total} tokens are too few for a NIAH-{variant} document")
    ids = np.concatenate([np.full(pad, tokenizer.eos_id, dtype=np.int64), b.head_ids, context_ids, tail_ids, answer])
    mask = np.zeros(total, dtype=bool)
    mask[total - len(answer):] = True
    return ids, mask


def score_niah(prediction, sample: NiahSample) -> float:
    """1.0 when any answer is a case-insensitive substring of ``prediction`` (str or bytes,
    decoded as UTF-8 with replacement), else 0.0; ``None`` and empty predictions score 0.0."""
    prediction = prediction_text(prediction)
    if prediction is None:
        return 0.0
    answers = [a for a in sample.answers if a.strip()]
    if not answers:
        raise ValueError(f"sample has no non-empty answer: {sample.answers!r}")
    text = prediction.lower()
    return float(any(a.lower() in text for a in answers))


def dense_niah_ids(
    tokenizer,
    total: int,
    rng: np.random.Generator,
    *,
    variant: str,
    needles: int,
    min_gap: int = 0,
    ask: str = "any",
    book: str = "shakespeare",
    quiet_prefix: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A training row of exactly ``total`` tokens with several needles, each asked for later:
    ``(ids, answer_mask)``, both [total].

    The haystack window holds ``needles`` needles at random unit boundaries; each is followed,
    at least ``min_gap`` tokens later when the row has room, by a line with its question and the
    answer ``" {value}."`` (the answer is what ``answer_mask`` marks). With ``ask="latest"`` needles
    and questions alternate instead (each question asks for the needle just before it, after a
    random stretch of haystack; ``min_gap`` is not used): a single-needle prompt needs no more, and
    the model need not tell keys apart to learn to keep a needle. The question lines are
    those of ``generate_niah``'s prompts, so a model trained on these rows answers its prompts;
    one row scores ``needles`` answers instead of one. ``eos`` pads the start when sentence cuts
    leave tokens over.

    ``quiet_prefix``: the row's first that many haystack tokens hold no needle and no question.
    With ``train.detached_prefix`` at most that long, the row streams a stretch of bare haystack
    without gradient and its needles are written and asked in the scored rest: the model learns
    to store and read needles in a memory the haystack has already filled.
    """
    if needles < 1:
        raise ValueError(f"needles must be >= 1, got {needles}")
    if quiet_prefix < 0:
        raise ValueError(f"quiet_prefix must be >= 0, got {quiet_prefix}")
    if ask not in ("any", "latest"):
        raise ValueError(f"ask must be 'any' or 'latest', got {ask!r}")
    b = _builder(tokenizer, variant, book)
    drawn = [b.draw(rng) for _ in range(needles)]
    needle_ids = encode_pieces(tokenizer, [b.sep + d[2] for d in drawn])
    question_ids = encode_pieces(tokenizer, ["\n" + d[3] + d[4] for d in drawn])
    answer_ids = [continuation_ids(tokenizer, d[3] + d[4], f" {d[1]}.") for d in drawn]
    fixed = sum(map(len, needle_ids)) + sum(map(len, question_ids)) + sum(map(len, answer_ids))
    if fixed > total:
        raise ValueError(f"{total} tokens are too few for {needles} NIAH-{variant} needles and questions ({fixed})")
    start, count = b.hay.fit(total - fixed, b.starts(rng))
    every = b.hay.n if b.noise else 1
    slots = np.unique(np.append(np.arange(0, count + 1, every), count))
    offsets = b.hay._pos(start + slots) - b.hay._pos(start)  # haystack tokens before each slot
    keep = offsets >= quiet_prefix  # every slot when quiet_prefix is 0
    if not keep.any():
        raise ValueError(f"quiet_prefix {quiet_prefix} leaves no room for needles in a {total}-token row")
    slots, offsets = slots[keep], offsets[keep]
    # needles in the first half of their window, questions after them by >= min_gap haystack tokens
    events = []
    if ask == "latest":  # needle i and question i take the (2i)-th and (2i+1)-th of sorted slots
        picks = np.sort(rng.integers(len(slots), size=2 * needles))
        for i in range(needles):
            events += [(int(slots[picks[2 * i]]), 2 * i, i), (int(slots[picks[2 * i + 1]]), 2 * i + 1, i)]
        needles_at = ()
    else:
        needles_at = range(needles)
    for i in needles_at:
        at = int(rng.integers(len(slots)))
        later = np.flatnonzero(offsets >= offsets[at] + min_gap)
        asked = int(later[rng.integers(len(later))]) if len(later) else len(slots) - 1
        events += [(int(slots[at]), 0, i), (int(slots[max(asked, at)]), 1, i)]
    events.sort()
    pieces, masks, prev = [], [], 0
    for k, order, i in events:
        is_question = order % 2 == 1 if ask == "latest" else order == 1
        if k > prev:
            pieces.append(b.hay.token_ids(start + prev, k - prev).astype(np.int64))
            masks.append(np.zeros(len(pieces[-1]), dtype=bool))
            prev = k
        if is_question:
            pieces += [np.asarray(question_ids[i], dtype=np.int64), np.asarray(answer_ids[i], dtype=np.int64)]
            masks += [np.zeros(len(question_ids[i]), dtype=bool), np.ones(len(answer_ids[i]), dtype=bool)]
        else:
            pieces.append(np.asarray(needle_ids[i], dtype=np.int64))
            masks.append(np.zeros(len(needle_ids[i]), dtype=bool))
    if count > prev:
        pieces.append(b.hay.token_ids(start + prev, count - prev).astype(np.int64))
        masks.append(np.zeros(len(pieces[-1]), dtype=bool))
    ids, mask = np.concatenate(pieces), np.concatenate(masks)
    pad = total - len(ids)
    if pad < 0:  # cannot happen for the byte tokenizer; subword pieces may merge differently
        ids, mask = ids[-total:], mask[-total:]
        pad = 0
    return (
        np.concatenate([np.full(pad, tokenizer.eos_id, dtype=np.int64), ids]),
        np.concatenate([np.zeros(pad, dtype=bool), mask]),
    )
