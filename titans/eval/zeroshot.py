"""Zero-shot multiple choice and LAMBADA (the paper's Table 1), scored by log-likelihood.

An example (``titans.tasks.multiple_choice.MCExample``) turns into one ``(context,
continuation)`` request per choice (``MCExample.requests()``: the continuation is " " + choice).
Each is scored as the summed log-probability of the continuation's tokens after the context (as
the lm-evaluation-harness does): the context's trailing whitespace moves to the continuation, the
pair is tokenised together and the context's tokens are cut off the front. ``acc`` picks the
choice with the highest log-likelihood, ``acc_n`` divides it by the choice's length in
characters first (the harness's ``acc_norm``). The choices of one example are scored in one
batch (right-padded, so padding never affects the scored positions of a causal model), read in
pieces with the state like every other evaluation.

WinoGrande uses partial scoring: its choices are the two filled-in sentence starts (contexts) and
the shared rest of the sentence is the continuation scored after each.

LAMBADA: ``acc`` = every target token is the model's argmax, ``ppl`` = exp of minus the mean
(over examples) summed log-likelihood of the target (the harness's definition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .report import EvalResult, EvalSettingError, fmt, format_table, generated
from .streaming import token_nll

__all__ = [
    "TABLE1", "ChoiceScore", "encode_pair", "run_zeroshot", "score_choices", "score_example", "score_requests",
    "zeroshot_table",
]  # fmt: skip

# Table 1's columns after the perplexities: task -> (column label, metric the paper reports)
TABLE1 = {
    "lambada": ("LMB. acc", "acc"),
    "piqa": ("PIQA acc", "acc"),
    "hellaswag": ("Hella. acc_n", "acc_n"),
    "winogrande": ("Wino. acc", "acc"),
    "arc_easy": ("ARC-e acc", "acc"),
    "arc_challenge": ("ARC-c acc_n", "acc_n"),
    "siqa": ("SIQA acc", "acc"),
    "boolq": ("BoolQ acc", "acc"),
}
# tasks the loaders offer beyond Table 1: extra columns after BoolQ
EXTRA = {"openbookqa": ("OBQA acc_n", "acc_n")}


@dataclass
class ChoiceScore:
    loglik: float  # summed log-probability of the continuation's tokens
    tokens: int  # continuation tokens
    chars: int  # continuation characters (acc_n's normaliser)
    greedy: bool  # every continuation token is the argmax


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as the harness splits them. An empty context becomes
    the eos id (so the first continuation token has something to be predicted from); a
    continuation that tokenizes to zero tokens cannot be scored and raises ``ValueError``."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    cont = whole[len(ctx) :]
    if not cont:
        raise EvalSettingError(
            f"continuation {continuation!r} tokenizes to zero tokens; it has no likelihood to compare"
        )
    return (ctx or [tokenizer.eos_id]), cont


def score_requests(
    model, tokenizer, requests: Sequence[tuple[str, str]], chunk_tokens: int = 4096
) -> list[ChoiceScore]:
    """Score each ``(context, continuation)`` request: the summed log-probability of the
    continuation's tokens after the context. All requests go through the model in one batch."""
    if not requests:
        raise EvalSettingError("an example needs at least one choice")
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    seqs = [ctx + cont for ctx, cont in pairs]
    width = max(len(s) for s in seqs)
    batch = torch.full((len(seqs), width), tokenizer.eos_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = torch.tensor(s)
    nll, greedy, _ = token_nll(model, batch, chunk_tokens)
    out = []
    for i, ((ctx, cont), (_, text)) in enumerate(zip(pairs, requests)):
        span = slice(len(ctx) - 1, len(ctx) - 1 + len(cont))  # nll[:, t] scores token t + 1
        out.append(ChoiceScore(loglik=-float(nll[i, span].sum()), tokens=len(cont), chars=len(text),
                               greedy=bool(greedy[i, span].all())))  # fmt: skip
    return out


def score_choices(
    model, tokenizer, context: str, choices: Sequence[str], chunk_tokens: int = 4096
) -> list[ChoiceScore]:
    """Score each choice as the continuation of ``context`` (the text is used as given: put the
    separating space in front of the choice or at the end of the context)."""
    return score_requests(model, tokenizer, [(context, c) for c in choices], chunk_tokens)


def score_example(model, tokenizer, example, chunk_tokens: int = 4096) -> dict[str, Any]:
    """acc and acc_n (0/1) of one ``MCExample`` (scored through its ``requests()``), with the
    choices' log-likelihoods. acc_n divides by the choice's length in characters (the harness
    normalises by the choice text, without the separating space)."""
    n = len(example.choices)
    if not 0 <= example.label < n:
        raise EvalSettingError(f"example {getattr(example, 'id', '?')}: label {example.label} outside its {n} choices")
    empty = [i for i, c in enumerate(example.choices) if not c.strip()]
    if empty:  # it would be scored as the separator alone, a comparison that means nothing
        raise EvalSettingError(f"example {getattr(example, 'id', '?')}: choice {empty[0]} is empty")
    scores = score_requests(model, tokenizer, example.requests(), chunk_tokens)
    ll = np.array([s.loglik for s in scores])
    texts = example.choices if getattr(example, "continuation", None) is None else [example.continuation] * n
    ll_n = ll / np.array([max(len(t), 1) for t in texts])
    return dict(id=getattr(example, "id", None), label=int(example.label), loglik=ll.tolist(),
                acc=float(int(ll.argmax()) == example.label), acc_n=float(int(ll_n.argmax()) == example.label))


def _lambada(model, tokenizer, items, chunk_tokens, bar) -> tuple[dict, list]:
    records = []
    for i, (context, target) in enumerate(items):
        (s,) = score_requests(model, tokenizer, [(context, target)], chunk_tokens)
        records.append(dict(task="lambada", index=i, loglik=s.loglik, acc=float(s.greedy)))
        bar.update(1)
    if not records:
        raise EvalSettingError("LAMBADA: no examples to score")
    lls = np.array([r["loglik"] for r in records])
    row = dict(task="lambada", metric="acc", n=len(records), acc=100.0 * float(np.mean([r["acc"] for r in records])),
               ppl=float(math.exp(min(-lls.mean(), 700))))  # fmt: skip
    row["value"] = row["acc"]
    return row, records


def run_zeroshot(
    model,
    tokenizer,
    tasks: Sequence[str] = tuple(TABLE1),
    *,
    limit: int | None = None,
    data: dict[str, list] | None = None,
    wiki_documents=None,
    chunk_tokens: int = 4096,
    model_name: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Table 1 for one model. ``tasks``: names of ``TABLE1``/``EXTRA`` (``lambada`` included).
    ``data`` maps a task to its examples (``MCExample`` list; ``(context, target)`` pairs for
    lambada); tasks not in it are loaded with ``titans.tasks.multiple_choice`` (first ``limit``
    examples). ``wiki_documents`` (token id sequences) gives the Wiki ppl column; without them
    that column is not measured ('-')."""
    known = {**TABLE1, **EXTRA}
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise EvalSettingError(f"unknown zero-shot task(s) {unknown}; choose from {sorted(known)}")
    if limit is not None and limit < 1:
        raise EvalSettingError(f"limit must be >= 1, got {limit}")
    data = dict(data or {})
    for task in tasks:
        if task not in data:
            from ..tasks import multiple_choice as mc

            if task == "lambada":
                data[task] = generated("loading lambada", mc.load_lambada, limit=limit)
            else:
                data[task] = generated(f"loading {task}", mc.load_mc_task, task, limit=limit)
        elif limit is not None:
            data[task] = data[task][:limit]
    name = model_name or model.cfg.variant
    rows, records = [], []
    bar = tqdm(total=sum(len(data[t]) for t in tasks), desc="zeroshot", unit="example", disable=not progress)
    for task in tasks:
        bar.set_postfix_str(task)
        if task == "lambada":
            row, recs = _lambada(model, tokenizer, data[task], chunk_tokens, bar)
        else:
            recs = []
            for ex in data[task]:
                recs.append(dict(task=task, **score_example(model, tokenizer, ex, chunk_tokens)))
                bar.update(1)
            if not recs:
                raise EvalSettingError(f"{task}: no examples to score")
            metric = known[task][1]
            row = dict(task=task, metric=metric, n=len(recs), acc=100.0 * float(np.mean([r["acc"] for r in recs])),
                       acc_n=100.0 * float(np.mean([r["acc_n"] for r in recs])))  # fmt: skip
            row["value"] = row[metric]
        rows.append(dict(model=name, **row))
        records += recs
    bar.close()
    if wiki_documents is not None:
        from .perplexity import run_perplexity

        wiki = run_perplexity(model, wiki_documents, tokenizer=tokenizer, chunk_tokens=chunk_tokens, progress=progress)
        rows.insert(0, dict(model=name, task="wiki", metric="ppl", n=wiki.rows[0]["tokens"], ppl=wiki.rows[0]["ppl"],
                            value=wiki.rows[0]["ppl"]))  # fmt: skip
    accs = [r["value"] for r in rows if r["task"] in TABLE1]
    rows.append(dict(model=name, task="avg", metric="acc", n=len(accs), value=float(np.mean(accs)) if accs else None))
    return EvalResult(task="zeroshot", rows=rows, records=records, table=zeroshot_table(rows),
                      meta=dict(tasks=list(tasks), limit=limit, chunk_tokens=chunk_tokens))  # fmt: skip


def zeroshot_table(rows: list[dict]) -> str:
    """Table 1's layout, one line per model: Wiki ppl, LMB ppl, LMB acc, PIQA ... BoolQ,
    (extras), Avg; '-' = not run."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["task"]): r for r in rows}
    tasks = {r["task"] for r in rows}
    extras = [t for t in EXTRA if t in tasks]
    columns = ["Model", "Wiki. ppl", "LMB. ppl"] + [TABLE1[t][0] for t in TABLE1] + [EXTRA[t][0] for t in extras]
    body = []
    for m in models:
        cells = [m, fmt(by.get((m, "wiki"), {}).get("ppl"), 2), fmt(by.get((m, "lambada"), {}).get("ppl"), 2)]
        cells += [fmt(by.get((m, t), {}).get("value")) for t in list(TABLE1) + extras]
        body.append(cells + [fmt(by.get((m, "avg"), {}).get("value"))])
    n = sum(1 for t in TABLE1 if t in tasks)
    title = "Zero-shot (Table 1 layout): ppl lower is better, accuracies in %; Avg over the accuracy columns run"
    if n < len(TABLE1):
        title += f" ({n} of {len(TABLE1)})"
    return format_table(columns + ["Avg."], body, title=title)
