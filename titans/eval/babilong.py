"""BABILong (the paper's Figure 6): bAbI qa1-qa5 facts hidden in book text of a given length,
answered after the streamed prompt; accuracy per task and length, and the accuracy-vs-length plot.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .niah import _check_common, answer_sample
from .report import EvalResult, EvalSettingError, fmt, format_table, generated, length_label, new_figure, save_figure

__all__ = ["BABILONG_TASKS", "babilong_table", "plot_babilong", "run_babilong"]

BABILONG_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")


def run_babilong(
    model,
    tokenizer,
    tasks: Sequence[str] = BABILONG_TASKS,
    lengths: Sequence[int] = (1024, 2048, 4096),
    *,
    samples: int = 20,
    seed: int = 0,
    chunk_tokens: int = 4096,
    max_new_tokens: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
    generate: Callable | None = None,
    score: Callable | None = None,
) -> EvalResult:
    """Accuracy (%) per bAbI task and context length. ``generate``/``score`` default to
    ``titans.tasks.babilong.generate_babilong`` / ``score_babilong``."""
    if generate is None or score is None:
        from ..tasks.babilong import generate_babilong, score_babilong

        generate, score = generate or generate_babilong, score or score_babilong
    lengths = _check_common(lengths, samples)
    unknown = [t for t in tasks if t not in BABILONG_TASKS]
    if unknown or not tasks:
        raise EvalSettingError(f"unknown BABILong task(s) {unknown}; choose from {list(BABILONG_TASKS)}")
    name = model_name or getattr(getattr(model, "cfg", None), "variant", "model")
    cells = [(task, length) for task in tasks for length in lengths]

    def make(task, length, n):
        return generated(f"BABILong {task} at length {length}", generate, tokenizer, task=task, length=length,
                         num_samples=n, seed=seed)  # fmt: skip

    for cell in cells:  # one prompt of each setting first: a setting the generator refuses fails at once
        make(*cell, 1)
    records = []
    bar = tqdm(total=len(cells) * samples, desc="babilong", unit="sample", disable=not progress)
    for task, length in cells:  # one setting's prompts at a time (long prompts are large)
        for i, sample in enumerate(make(task, length, samples)):
            prompt_tokens, prediction = answer_sample(model, tokenizer, sample, max_new_tokens, chunk_tokens)
            records.append(dict(
                model=name, task=task, length=length, index=i, prompt_tokens=prompt_tokens,
                question=sample.question, answers=list(sample.answers), prediction=prediction,
                score=float(score(prediction, sample)),
            ))  # fmt: skip
            bar.update(1)
    bar.close()
    cells = defaultdict(list)
    for r in records:
        cells[(r["task"], r["length"])].append(r["score"])
    rows = [dict(model=name, task=t, length=n, samples=len(s), accuracy=100.0 * float(np.mean(s)))
            for (t, n), s in cells.items()]  # fmt: skip
    return EvalResult(
        task="babilong", rows=rows, records=records, table=babilong_table(rows),
        meta=dict(tasks=list(tasks), lengths=lengths, samples=samples, seed=seed, chunk_tokens=chunk_tokens,
                  max_new_tokens=max_new_tokens),
    )  # fmt: skip


def _task_means(rows: list[dict]) -> dict[tuple[str, int], float]:
    """(model, length) -> accuracy averaged over the tasks."""
    acc = defaultdict(list)
    for r in rows:
        acc[(r["model"], r["length"])].append(r["accuracy"])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def babilong_table(rows: list[dict]) -> str:
    """One line per model and task (and the model's mean over tasks), one column per context
    length: accuracy (%)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    acc = {(r["model"], r["task"], r["length"]): r["accuracy"] for r in rows}
    means = _task_means(rows)
    body = []
    for m in models:
        body += [[m, t] + [fmt(acc.get((m, t, n))) for n in lengths] for t in tasks]
        body.append([m, "Avg"] + [fmt(means.get((m, n))) for n in lengths])
    return format_table(["Model", "Task"] + [length_label(n) for n in lengths], body, title="BABILong accuracy (%)")


def plot_babilong(rows: list[dict], path, title: str | None = None) -> str:
    """Figure 6's plot: accuracy (%) against context length (log scale). One model: a line per
    task and their mean (dashed); several models: a line per model (mean over tasks)."""
    if not rows:
        raise ValueError("no BABILong rows to plot")
    fig, ax = new_figure(figsize=(6, 4), layout="constrained")
    models = list(dict.fromkeys(r["model"] for r in rows))
    means = _task_means(rows)
    if len(models) == 1:
        for task in dict.fromkeys(r["task"] for r in rows):
            pts = sorted((r["length"], r["accuracy"]) for r in rows if r["task"] == task)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=task)
    for model in models:
        pts = sorted((n, a) for (m, n), a in means.items() if m == model)
        style = dict(color="black", linestyle="--", label="mean") if len(models) == 1 else dict(marker="o", label=model)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
    lengths = sorted({r["length"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-2, 102)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "BABILong")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
