"""BABILong-style tasks: bAbI stories (qa1-qa5) hidden in book text of a chosen length.

A small bAbI world is simulated: actors walk between six rooms and pick up, drop and (qa5) give
three objects; every event is a sentence ("Mary travelled to the office.", "John got the milk
there.", ...). A story of such facts ends in a question whose answer follows from them:

- qa1 single supporting fact: "Where is Mary?" (her last move);
- qa2 two supporting facts: "Where is the milk?" (who has it or where it was dropped, and where that
  person went);
- qa3 three supporting facts: "Where was the milk before the office?";
- qa4 two-argument relations: "The garden is west of the kitchen. ... What is the kitchen east of?";
- qa5 three-argument relations: "Fred gave the apple to Bill. ... Who gave the apple to Bill?".

As in BABILong (Kuratov et al., 2024), the story's sentences are placed, in order, at random
sentence boundaries of a contiguous stretch of book text sized so the whole prompt takes at most
``length`` tokens; the prompt is laid out as BABILong's (instruction, answer format,
``<context>...</context>``, question) and an answer scores when its first sentence names the
right label and no other label of the task (BABILong's ``compare_answers``). The instructions are
written for this project; BABILong's few-shot examples are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .text_sources import encode_pieces, haystack, prediction_text

_WINDOW_TRIES = 64  # book windows tried for the one that fills the length best

__all__ = [
    "TASKS",
    "TASK_LABELS",
    "BabiSample",
    "babi_story",
    "generate_babilong",
    "score_babilong",
]

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
ACTORS = ("Mary", "John", "Daniel", "Sandra")
QA5_ACTORS = ("Bill", "Fred", "Jeff", "Mary")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
GRAB = ("got", "grabbed", "picked up", "took")
DROP = ("dropped", "discarded", "put down", "left")
GIVE = ("gave", "handed", "passed")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}

# The labels an answer is checked against (BABILong's TASK_LABELS for qa1-qa5).
TASK_LABELS = {
    "qa1": LOCATIONS,
    "qa2": LOCATIONS,
    "qa3": LOCATIONS,
    "qa4": LOCATIONS,
    "qa5": QA5_ACTORS + OBJECTS,
}

# Story sizes (number of fact sentences), drawn uniformly from [lo, hi].
NUM_FACTS = {"qa1": (4, 10), "qa2": (8, 20), "qa3": (12, 30), "qa4": (2, 2), "qa5": (8, 20)}

_SHARED = (
    "I will give you a context with facts about {what} hidden in some unrelated text, and a question. "
    "Answer the question using only these facts."
)
_CARRY = (
    " An item that a person carries goes wherever the person goes;"
    " an item that a person drops stays where it was dropped."
)
INSTRUCTIONS = {
    "qa1": _SHARED.format(what="where different people are")
    + " If a person was in several places, the latest one is where the person is.",
    "qa2": _SHARED.format(what="where different people are and what they carry") + _CARRY,
    "qa3": _SHARED.format(what="where different people are and what they carry") + _CARRY,
    "qa4": _SHARED.format(what="how places lie relative to each other"),
    "qa5": _SHARED.format(what="people, the objects they carry and what they give to each other"),
}
ANSWER_FORMATS = {
    "qa1": "Answer in this form: The most recent location of 'person' is 'location'.",
    "qa2": "Answer in this form: The 'item' is in 'location'.",
    "qa3": "Answer in this form: Before the 'location 1' the 'item' was in the 'location 2'.",
    "qa4": "Answer with one word: the location.",
    "qa5": "Answer with one word.",
}
ANSWER_PREFIX = "Answer:"


@dataclass
class BabiSample:
    """One BABILong prompt: ``facts`` (the whole story, in order) are hidden in ``context``."""

    context: str
    question: str
    answers: list[str]
    task: str
    facts: list[str]
    length: int  # target prompt length in tokens (the prompt never exceeds it)
    supporting: list[int] = field(default_factory=list)  # indices into facts

    @property
    def prompt(self) -> str:
        return (
            f"{INSTRUCTIONS[self.task]}\n\n{ANSWER_FORMATS[self.task]}\n\n<context>\n{self.context}\n</context>\n\n"
            f"Question: {self.question}\n{ANSWER_PREFIX}"
        )


# ---------------------------------------------------------------------------------------------
# The bAbI world


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


class _World:
    """Actors, their rooms and the objects; ``step`` adds one random legal event as a fact."""

    def __init__(self, rng: np.random.Generator, actors, *, objects: bool, give: bool):
        self.rng, self.actors, self.objects, self.give = rng, actors, objects, give
        self.loc: dict[str, str | None] = dict.fromkeys(actors)
        self.last_move: dict[str, int] = {}
        self.holder: dict[str, str | None] = dict.fromkeys(OBJECTS)
        self.dropped_at: dict[str, tuple[str, int, int]] = {}  # obj -> (room, drop fact, move fact)
        self.grabbed: dict[str, int] = {}  # obj -> fact of the current holder's grab/receipt
        # rooms each object was in, with the facts that put it there
        self.trail: dict[str, list[tuple[str, list[int]]]] = {o: [] for o in OBJECTS}
        self.gives: list[tuple[str, str, str, int]] = []  # (giver, obj, receiver, fact)
        self.facts: list[str] = []

    def _add(self, text: str) -> int:
        self.facts.append(text)
        return len(self.facts) - 1

    def _visit(self, obj: str, room: str, facts: list[int]) -> None:
        if not self.trail[obj] or self.trail[obj][-1][0] != room:
            self.trail[obj].append((room, facts))

    def where(self, obj: str) -> str | None:
        h = self.holder[obj]
        return self.loc[h] if h is not None else self.dropped_at.get(obj, (None,))[0]

    def step(self) -> None:
        # weights: mostly moves, as in bAbI; an impossible action (nothing to drop) is redrawn
        actions, weights = [self._move], [3.0]
        if self.objects:
            actions += [self._grab, self._drop]
            weights += [1.0, 0.6]
        if self.give:
            actions.append(self._give)
            weights.append(1.5)
        p = np.asarray(weights) / sum(weights)
        while not actions[int(self.rng.choice(len(actions), p=p))]():
            pass

    def _move(self) -> bool:
        a = _pick(self.rng, self.actors)
        room = _pick(self.rng, [r for r in LOCATIONS if r != self.loc[a]])
        i = self._add(f"{a} {_pick(self.rng, MOVE)} the {room}.")
        self.loc[a], self.last_move[a] = room, i
        for o, h in self.holder.items():
            if h == a:
                self._visit(o, room, [i])
        return True

    def _grab(self) -> bool:
        options = [
            (a, o) for a in self.actors for o in OBJECTS
            if self.loc[a] is not None and self.holder[o] is None and self.where(o) in (None, self.loc[a])
        ]  # fmt: skip
        if not options:
            return False
        a, o = _pick(self.rng, options)
        i = self._add(f"{a} {_pick(self.rng, GRAB)} the {o} there.")
        self.holder[o], self.grabbed[o] = a, i
        self.dropped_at.pop(o, None)
        self._visit(o, self.loc[a], [self.last_move[a], i])
        return True

    def _drop(self) -> bool:
        options = [(a, o) for o, a in self.holder.items() if a is not None]
        if not options:
            return False
        a, o = _pick(self.rng, options)
        i = self._add(f"{a} {_pick(self.rng, DROP)} the {o}.")
        self.holder[o] = None
        self.dropped_at[o] = (self.loc[a], i, self.last_move[a])
        return True

    def _give(self) -> bool:
        options = [
            (a, o, b) for o, a in self.holder.items() if a is not None
            for b in self.actors if b != a and self.loc[b] == self.loc[a]
        ]  # fmt: skip
        if not options:
            return False
        a, o, b = _pick(self.rng, options)
        i = self._add(f"{a} {_pick(self.rng, GIVE)} the {o} to {b}.")
        self.holder[o], self.grabbed[o] = b, i
        self.gives.append((a, o, b, i))
        return True


def _question(task: str, w: _World) -> tuple[str, str, list[int]] | None:
    """(question, answer, supporting facts) about the story so far, or None if none can be asked."""
    rng = w.rng
    if task == "qa1":
        moved = [a for a in w.actors if a in w.last_move]
        if not moved:
            return None
        a = _pick(rng, moved)
        return f"Where is {a}?", w.loc[a], [w.last_move[a]]
    if task == "qa2":
        known = [o for o in OBJECTS if w.where(o) is not None]
        if not known:
            return None
        o = _pick(rng, known)
        h = w.holder[o]
        if h is not None:
            support = [w.grabbed[o], w.last_move[h]]
        else:
            support = list(w.dropped_at[o][1:])
        return f"Where is the {o}?", w.where(o), sorted(set(support))
    if task == "qa3":
        # the object's latest room must be new to it, so "before the <room>" is unambiguous
        ok = [o for o in OBJECTS if len(w.trail[o]) >= 2 and w.trail[o][-1][0] not in [r for r, _ in w.trail[o][:-1]]]
        if not ok:
            return None
        o = _pick(rng, ok)
        (before, i), (now, j) = w.trail[o][-2:]
        return f"Where was the {o} before the {now}?", before, sorted(set(i + j))
    if task == "qa5":
        if not w.gives:
            return None
        a, o, b, i = w.gives[-1]
        form = int(rng.integers(5))
        question, answer = [
            (f"Who gave the {o} to {b}?", a),
            (f"Who did {a} give the {o} to?", b),
            (f"What did {a} give to {b}?", o),
            (f"Who received the {o}?", b),
            (f"Who gave the {o}?", a),
        ][form]
        return question, answer, [i]
    raise ValueError(f"unknown task {task!r}")


def _qa4_story(rng: np.random.Generator) -> tuple[list[str], str, str, list[int]]:
    """Two relations around a shared room, and a question only one room answers."""
    while True:
        x, b, y = (LOCATIONS[i] for i in rng.choice(len(LOCATIONS), 3, replace=False))
        d1, d2 = (str(d) for d in rng.choice(list(OPPOSITE), 2, replace=False))
        # (p, d, q): "The p is d of the q."; the second fact shares b, in either role
        rels = [(x, d1, b), (y, d2, b) if rng.random() < 0.5 else (b, d2, y)]
        p, d, q = rels[int(rng.integers(2))]
        if rng.random() < 0.5:  # ask about the inverse relation
            p, d, q = q, OPPOSITE[d], p
        if rng.random() < 0.5:
            question, answer = f"What is {d} of the {q}?", p
            matches = _qa4_answers(rels, (None, d, q))
        else:
            question, answer = f"What is the {p} {d} of?", q
            matches = _qa4_answers(rels, (p, d, None))
        if matches == {answer}:
            facts = [f"The {p_} is {d_} of the {q_}." for p_, d_, q_ in rels]
            support = [i for i, r in enumerate(rels) if {r[0], r[2]} == {p, q}]
            return facts, question, answer, support


def _qa4_answers(rels, query: tuple[str | None, str, str | None]) -> set[str]:
    """Rooms that fill the open slot (None) of ``query`` given the relations and their inverses."""
    slot = query.index(None)
    both = list(rels) + [(q, OPPOSITE[d], p) for p, d, q in rels]
    return {r[slot] for r in both if all(x is None or x == y for x, y in zip(query, r))}


def babi_story(
    task: str, rng: np.random.Generator, num_facts: int | None = None
) -> tuple[list[str], str, str, list[int]]:
    """``(facts, question, answer, supporting)`` of one bAbI story of ``task`` (qa1-qa5) with at
    least ``num_facts`` sentences (default: drawn from ``NUM_FACTS[task]``); more are added, up to
    the top of that range, only when the question needs them (e.g. nobody has given anything yet
    in qa5), else the story is drawn again."""
    if task not in TASKS:
        raise ValueError(f"unknown bAbI task {task!r}; known: {list(TASKS)}")
    if task == "qa4":
        return _qa4_story(rng)
    lo, hi = NUM_FACTS[task]
    n = int(rng.integers(lo, hi + 1)) if num_facts is None else num_facts
    if n < 1:
        raise ValueError(f"num_facts must be >= 1, got {n}")
    limit = max(n, hi)
    while True:  # a story that reaches ``limit`` facts without an answerable question is redrawn
        w = _World(rng, QA5_ACTORS if task == "qa5" else ACTORS, objects=task != "qa1", give=task == "qa5")
        while len(w.facts) < limit:
            w.step()
            if len(w.facts) >= n and (q := _question(task, w)) is not None:
                return list(w.facts), *q


# ---------------------------------------------------------------------------------------------
# Hiding the story in book text, and scoring


def generate_babilong(
    tokenizer,
    task: str = "qa1",
    length: int = 1024,
    num_samples: int = 10,
    seed: int = 0,
    *,
    book: str = "shakespeare",
    num_facts: int | None = None,
) -> list[BabiSample]:
    """``num_samples`` BABILong prompts of at most ``length`` tokens of ``tokenizer``: a bAbI story
    of ``task`` hidden at random sentence boundaries of book text. Deterministic for
    ``(seed, task, length)``."""
    if task not in TASKS:
        raise ValueError(f"unknown bAbI task {task!r}; known: {list(TASKS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    hay = haystack(book, tokenizer)
    rng = np.random.default_rng([seed, TASKS.index(task), length])
    head = f"{INSTRUCTIONS[task]}\n\n{ANSWER_FORMATS[task]}\n\n<context>\n"
    head_len = len(tokenizer.encode(head))
    first_sep = len(encode_pieces(tokenizer, [" "])[0])  # the context's first separator is dropped
    samples = []
    for _ in range(num_samples):
        facts, question, answer, support = babi_story(task, rng, num_facts)
        tail = f"\n</context>\n\nQuestion: {question}\n{ANSWER_PREFIX}"
        fixed = head_len + sum(map(len, encode_pieces(tokenizer, [tail] + [" " + f for f in facts])))
        if fixed > length:
            raise ValueError(
                f"length {length} is too short for a BABILong {task} prompt: instruction, question and "
                f"the {len(facts)} facts alone take {fixed} tokens of {tokenizer.name!r}"
            )
        starts = rng.integers(0, hay.n, _WINDOW_TRIES)
        where = np.sort(rng.random(len(facts)))  # fact positions as fractions of the book text's tokens

        def inserts(start: int, count: int, where=where, facts=facts) -> list[tuple[int, str]]:
            return [(hay.boundary(start, count, u), f) for u, f in zip(where, facts)]

        context = hay.fit_context(length - fixed + first_sep, starts, inserts, " ", head, tail, length)
        samples.append(BabiSample(context, question, [answer], task, facts, length, support))
    return samples


def _first_sentence(output: str) -> str:
    # BABILong's preprocess_output: lower case, first sentence, nothing from an echoed prompt
    output = output.lower().split(".")[0]
    for stop in ("<context>", "<example>", "question"):
        output = output.split(stop)[0]
    return output


def score_babilong(prediction, sample: BabiSample) -> float:
    """1.0 when the first sentence of ``prediction`` names the answer and no other label of the
    task (labels named in the question do not count), case-insensitively; else 0.0. ``None``,
    empty and whitespace-only predictions score 0.0; bytes are decoded as UTF-8 with replacement."""
    prediction = prediction_text(prediction)
    if prediction is None:
        return 0.0
    if not sample.answers or not sample.answers[0].strip():
        raise ValueError(f"sample has no answer: {sample.answers!r}")
    output = _first_sentence(prediction)
    labels = {label.lower() for label in TASK_LABELS[sample.task]}
    in_question = {label for label in labels if label in sample.question.lower()}
    named = {label for label in labels if label in output} - in_question
    return float(named == {sample.answers[0].lower()})
