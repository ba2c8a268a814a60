"""The ``words`` tokenizer's built-in vocabulary (``niah_words``) and the texts it is built from.

The vocabulary holds the words of the NIAH prompt templates and of RULER's noise haystack, the
pair keys (nouns) and word values (adjectives) from the ``wonderwords`` word lists, and the 3-digit
numbers. The tasks (``titans.tasks.niah``, ``recall`` and ``text_sources``) build their prompts from
these same strings and lists, so a needle's key and value are one token each. Checkpoints record
the vocabulary's SHA-256 and their token ids depend on it, so ``niah_words`` must keep returning
the same list; ``tests/test_tokenizers.py`` pins its hash.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .packages import PackageUnavailable, find_in_package

__all__ = [
    "NEEDLE",
    "NOISE_SENTENCES",
    "PAIR_NEEDLE",
    "PAIR_QUESTION",
    "RULER_ANSWER_PREFIX",
    "RULER_TEMPLATE",
    "WORDS_PACKAGE",
    "niah_words",
    "pair_lists",
    "word_lists",
]

WORDS_PACKAGE = "wonderwords==3.0.1"

# RULER's noise haystack (scripts/data/synthetic/niah.py): this block, repeated, one per line.
NOISE_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
PAIR_NEEDLE = "Remember the pair: {key} {value}."
PAIR_QUESTION = "Recall the pair:"

# RULER's niah template (constants.py: template + answer_prefix), written for several needles.
RULER_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
RULER_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"


@lru_cache(maxsize=2)
def word_lists(cache: str | None = None) -> tuple[list[str], list[str]]:
    """(adjectives, nouns) of wonderwords, deduplicated and sorted (as RULER builds its keys)."""
    try:
        adjs = find_in_package(WORDS_PACKAGE, "adjectivelist.txt", cache=cache)[0]
        nouns = find_in_package(WORDS_PACKAGE, "nounlist.txt", cache=cache)[0]
    except PackageUnavailable as err:
        raise PackageUnavailable(f"NIAH keys need the word lists of {WORDS_PACKAGE}: {err}") from err

    def read(path):
        return sorted({w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()})

    return read(adjs), read(nouns)


@lru_cache(maxsize=1)
def pair_lists() -> tuple[list[str], list[str]]:
    """(keys, word values) of the pair variants: the one-word lowercase nouns and adjectives."""
    adjs, nouns = word_lists()
    nouns = [w for w in nouns if w.isascii() and w.isalpha() and w.islower()]
    noun_set = set(nouns)
    # an adjective that is also a noun could be drawn as a key: values stay apart from keys
    adjs = [w for w in adjs if w.isascii() and w.isalpha() and w.islower() and w not in noun_set]
    return nouns, adjs


# Words of every prompt template and of the noise haystack, with and without a leading space.
_TEMPLATE_TEXT = " ".join([
    NOISE_SENTENCES, PAIR_NEEDLE, PAIR_QUESTION, NEEDLE, RULER_TEMPLATE, RULER_ANSWER_PREFIX,
    "What is the special magic number word for A an",
])  # fmt: skip


@lru_cache(maxsize=1)
def niah_words() -> tuple[str, ...]:
    """The ``words`` tokenizer's NIAH vocabulary: template and noise words, then ``" " + key`` for
    every pair-variant key (a noun), ``" " + value`` for every word value (an adjective) and the
    3-digit numbers ``" 100" .. " 999"``. Deterministic (sorted word lists of ``wonderwords``)."""
    template = sorted(set(re.findall(r"[A-Za-z]+", _TEMPLATE_TEXT)))
    words = [p for w in template for p in (w, " " + w) if len(p) > 1]  # one letter alone is its byte
    keys, values = pair_lists()
    words += [" " + w for w in keys + values] + [f" {n}" for n in range(100, 1000)]
    return tuple(dict.fromkeys(words))  # a noise word may also be a key: keep its first place
