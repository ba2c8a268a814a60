"""Needle in a haystack: RULER's single-needle S-NIAH (the paper's Table 2), its multi-key MK-NIAH
(the asked needle among distractor needles with other keys), and the length x depth heatmap.

For every (variant, length) the generator (``titans.tasks.niah.generate_niah``) builds prompts
measuring ``length`` tokens of the model's tokenizer with the needle at evenly spaced depths; the
prompt is streamed through the model with its state and the answer decoded greedily for a few
tokens; a sample scores 1 when an expected value appears in the decoded text (case-insensitive).
The ``mk-`` variants come from ``titans.tasks.recall.generate_recall`` (``needles`` needles per
prompt) and score the first answer only (up to the first full stop or line end) against the asked
value; their records also say whether that answer was a distractor's value instead
(``distractor``: the wrong key's value was found).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .report import EvalResult, EvalSettingError, fmt, format_table, generated, length_label, new_figure, save_figure
from .streaming import check_chunk_tokens, decode_prediction, greedy_continue, model_device

__all__ = ["NIAH_VARIANTS", "answer_budget", "niah_table", "plot_niah_heatmap", "run_niah"]

NIAH_VARIANTS = {
    "pk": "S-NIAH-PK", "n": "S-NIAH-N", "w": "S-NIAH-W", "uuid": "S-NIAH-UUID",
    "kv-pk": "KV-NIAH-PK", "kv-n": "KV-NIAH-N", "kv-w": "KV-NIAH-W",
    "pair-pk": "PAIR-NIAH-PK", "pair-n": "PAIR-NIAH-N", "pair-w": "PAIR-NIAH-W",
    "mk-pk": "MK-NIAH-PK", "mk-n": "MK-NIAH-N", "mk-w": "MK-NIAH-W", "mk-wiki": "MK-NIAH-WIKI",
    "mk-milton": "MK-NIAH-MILTON (held-out text)", "mk-unseen": "MK-NIAH-N (held-out phrasing)",
}  # fmt: skip
MULTI_KEY = ("mk-pk", "mk-n", "mk-w", "mk-wiki", "mk-milton", "mk-unseen")
DEFAULT_NEEDLES = 4  # needles per MK-NIAH prompt: the asked one and three distractors


def answer_budget(tokenizer, answers: Sequence[str], margin: int = 8) -> int:
    """Tokens to decode when none are given: the longest expected answer (with a leading space,
    as it follows the answer prefix) plus ``margin``. Scoring is a substring test, so extra
    tokens never hurt; too few would cut the answer off."""
    return max(len(tokenizer.encode(" " + a)) for a in answers) + margin if answers else margin


def answer_sample(model, tokenizer, sample, max_new_tokens: int | None, chunk_tokens: int) -> tuple[int, str]:
    """Stream ``sample.prompt`` and decode greedily: ``(prompt tokens, predicted text)``. Shared by
    the NIAH and BABILong runners (any sample with ``prompt`` and ``answers``)."""
    prompt = tokenizer.encode(sample.prompt)
    budget = max_new_tokens or answer_budget(tokenizer, sample.answers)
    new = greedy_continue(model, prompt, budget, chunk_tokens, eos_id=tokenizer.eos_id)
    return len(prompt), decode_prediction(tokenizer, new)


def answer_batch(
    model, tokenizer, samples, max_new_tokens: int | None, chunk_tokens: int, bar=None
) -> list[tuple[int, str]]:
    """``answer_sample`` for several samples streamed side by side as one batch (the state holds a
    row per sample, so tokens/s grows with the batch while memory stays flat). Prompts shorter
    than the longest are left-padded with ``eos`` (a document boundary, as the training rows
    start). ``bar``: a tqdm bar advanced by the tokens streamed (all rows)."""
    import torch

    check_chunk_tokens(model, chunk_tokens)
    eos = tokenizer.eos_id
    prompts = [tokenizer.encode(s.prompt) for s in samples]
    if not all(prompts):
        raise ValueError("a prompt tokenizes to zero tokens")
    if eos is None and len({len(p) for p in prompts}) > 1:
        raise ValueError("prompts of different lengths need a tokenizer with an eos id to pad with")
    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=model_device(model))
    budget = max_new_tokens or answer_budget(tokenizer, [a for s in samples for a in s.answers])
    n_head = (width - 1) // chunk_tokens * chunk_tokens
    state = None
    with torch.inference_mode():
        for start in range(0, n_head, chunk_tokens):
            _, _, state = model(ids[:, start : start + chunk_tokens], state=state, logits_to_keep=1)
            if bar is not None:
                bar.update(ids.shape[0] * chunk_tokens)
        out, _ = model.generate(ids[:, n_head:], budget, temperature=0.0, top_k=1, eos_token_id=eos, state=state)
    if bar is not None:
        bar.update(ids.shape[0] * (width - n_head))
    results = []
    for prompt, row in zip(prompts, out[:, width - n_head :].tolist()):
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        results.append((len(prompt), decode_prediction(tokenizer, row)))
    return results


def _depth_list(depths: int | Sequence[float]) -> list[float]:
    if isinstance(depths, int):
        if depths < 1:
            raise EvalSettingError(f"depths must be >= 1, got {depths}")
        return [0.5] if depths == 1 else np.linspace(0.0, 1.0, depths).round(6).tolist()
    out = [float(d) for d in depths]
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise EvalSettingError(f"depths must be fractions in [0, 1], got {out}")
    return out


def _check_common(lengths: Sequence[int], samples: int) -> list[int]:
    lengths = [int(n) for n in lengths]
    if not lengths or any(n < 1 for n in lengths):
        raise EvalSettingError(f"lengths must be positive token counts, got {lengths}")
    if samples < 1:
        raise EvalSettingError(f"samples must be >= 1, got {samples}")
    return lengths


def run_niah(
    model,
    tokenizer,
    lengths: Sequence[int],
    variants: Sequence[str] = ("pk", "n", "w"),
    *,
    samples: int = 20,
    depths: int | Sequence[float] = 10,
    seed: int = 0,
    chunk_tokens: int = 4096,
    max_new_tokens: int | None = None,
    model_name: str | None = None,
    progress: bool = True,
    generate: Callable | None = None,
    score: Callable | None = None,
    batch_size: int = 1,
    bar_unit: str = "sample",
    needles: int | None = None,
) -> EvalResult:
    """Accuracy (%) per variant and length. ``depths``: a number of evenly spaced depths over
    [0, 1] or the depths themselves. ``batch_size`` > 1 streams that many prompts side by side
    (``answer_batch``; shorter prompts left-padded with eos); ``bar_unit`` "token" makes the
    progress bar count streamed tokens instead of samples. ``generate``/``score`` default to
    ``titans.tasks.niah.generate_niah`` / ``score_niah``, and ``generate_recall`` for the ``mk-``
    variants (pass others for custom haystacks). ``needles``: needles per ``mk-`` prompt (default
    4); single-needle variants refuse it."""
    lengths = _check_common(lengths, samples)
    unknown = [v for v in variants if v not in NIAH_VARIANTS]
    if unknown or not variants:
        raise EvalSettingError(f"unknown NIAH variant(s) {unknown}; choose from {sorted(NIAH_VARIANTS)}")
    if needles is not None:
        single = [v for v in variants if v not in MULTI_KEY]
        if single:
            raise EvalSettingError(f"needles is a setting of the multi-key variants; {single} hold one needle")
        if needles < 1:
            raise EvalSettingError(f"needles must be >= 1, got {needles}")
    if generate is None or score is None:
        generate, score = generate or _generator(needles or DEFAULT_NEEDLES), score or _score
    depth_values = _depth_list(depths)
    name = model_name or getattr(getattr(model, "cfg", None), "variant", "model")
    cells = [(variant, length) for variant in variants for length in lengths]

    def make(variant, length, n):
        return generated(f"NIAH-{variant} at length {length}", generate, tokenizer, length, n, variant=variant,
                         depths=depth_values, seed=seed)  # fmt: skip

    for cell in cells:  # one prompt of each setting first: a setting the generator refuses fails at once
        make(*cell, 1)
    if batch_size < 1:
        raise EvalSettingError(f"batch_size must be >= 1, got {batch_size}")
    if bar_unit not in ("sample", "token"):
        raise EvalSettingError(f"bar_unit must be 'sample' or 'token', got {bar_unit!r}")
    records = []
    per_token = bar_unit == "token"
    total = sum(length * samples for _, length in cells) if per_token else len(cells) * samples
    bar = tqdm(total=total, desc="niah", unit="tok" if per_token else "sample", unit_scale=per_token,
               disable=not progress)  # fmt: skip
    for variant, length in cells:  # one setting's prompts at a time (long prompts are large)
        made = make(variant, length, samples)
        for first in range(0, len(made), batch_size):
            group = made[first : first + batch_size]
            if batch_size == 1:
                answers = [answer_sample(model, tokenizer, group[0], max_new_tokens, chunk_tokens)]
            else:
                answers = answer_batch(model, tokenizer, group, max_new_tokens, chunk_tokens,
                                       bar=bar if per_token else None)  # fmt: skip
            for i, sample, (prompt_tokens, prediction) in zip(range(first, first + len(group)), group, answers):
                _record(records, name, variant, length, i, sample, prompt_tokens, prediction, score)
            if not per_token:
                bar.update(len(group))
            elif batch_size == 1:
                bar.update(answers[0][0])
    bar.close()
    rows = _cell_rows(records)
    return EvalResult(
        task="niah", rows=rows, records=records, table=niah_table(rows),
        meta=dict(lengths=lengths, variants=list(variants), samples=samples, depths=depth_values, seed=seed,
                  chunk_tokens=chunk_tokens, max_new_tokens=max_new_tokens, batch_size=batch_size, needles=needles),
    )  # fmt: skip


def _generator(needles: int) -> Callable:
    """The default prompt generator: ``generate_niah``, or ``generate_recall`` for ``mk-`` variants."""
    from ..tasks.niah import generate_niah
    from ..tasks.recall import generate_recall

    def generate(tokenizer, length, num_samples, *, variant, **kw):
        if variant in MULTI_KEY:
            return generate_recall(tokenizer, length, num_samples, variant=variant, needles=needles, **kw)
        return generate_niah(tokenizer, length, num_samples, variant=variant, **kw)

    return generate


def _score(prediction, sample) -> float:
    """The default scoring: RULER's substring match for one needle; for a multi-key prompt the
    first answer must be the asked value (``titans.tasks.recall.score_recall``): a substring test
    would pass a wrong answer followed by a chained question line that names the right one."""
    from ..tasks.niah import score_niah
    from ..tasks.recall import RecallSample, score_recall

    return score_recall(prediction, sample) if isinstance(sample, RecallSample) else score_niah(prediction, sample)


def _record(records, name, variant, length, i, sample, prompt_tokens, prediction, score) -> None:
    record = dict(
        model=name, variant=variant, length=length, depth=round(float(sample.depth), 6), index=i,
        prompt_tokens=prompt_tokens, answers=list(sample.answers), prediction=prediction,
        score=float(score(prediction, sample)),
    )  # fmt: skip
    distractors = getattr(sample, "distractors", None)
    if distractors is not None:  # a multi-key prompt: did a wrong key's value come back?
        from ..tasks.recall import names_distractor

        record["distractor"] = float(not record["score"] and names_distractor(prediction, sample))
        record["needles"] = len(distractors) + 1
    records.append(record)


def _cell_rows(records: list[dict]) -> list[dict]:
    cells = defaultdict(list)
    for r in records:
        cells[(r["model"], r["variant"], r["length"])].append(r)
    rows = []
    for (m, v, n), rs in cells.items():
        row = dict(model=m, task=NIAH_VARIANTS[v], variant=v, length=n, samples=len(rs),
                   accuracy=100.0 * float(np.mean([r["score"] for r in rs])))  # fmt: skip
        if all("distractor" in r for r in rs):  # % of answers that named another needle's value
            row["distractor"] = 100.0 * float(np.mean([r["distractor"] for r in rs]))
        rows.append(row)
    return rows


def niah_table(rows: list[dict]) -> str:
    """Table 2's layout: one line per model, accuracy (%) under S-NIAH-PK / -N / -W x lengths."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    acc = {(r["model"], r["variant"], r["length"]): r["accuracy"] for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    columns = ["Model"] + [length_label(n) for _ in variants for n in lengths]
    body = [[m] + [fmt(acc.get((m, v, n))) for v in variants for n in lengths] for m in models]
    groups = [("", 1)] + [(NIAH_VARIANTS[v], len(lengths)) for v in variants]
    return format_table(columns, body, title="NIAH accuracy (%)", groups=groups)


def plot_niah_heatmap(records: list[dict], path, title: str | None = None) -> str:
    """The familiar needle heatmap: context length (x) by needle depth (y), colour = accuracy;
    one panel per variant, one row of panels per model. ``records`` as in
    ``run_niah(...).records`` (model, variant, length, depth, score). Returns the PNG path."""
    if not records:
        raise ValueError("no NIAH records to plot")
    models = list(dict.fromkeys(r.get("model", "") for r in records))
    variants = list(dict.fromkeys(r["variant"] for r in records))
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    width = 1.5 + (0.8 * len(lengths) + 1.0) * len(variants)
    height = (0.4 * len(depths) + 1.6) * len(models) + 0.4
    fig, axes = new_figure(nrows=len(models), ncols=len(variants), figsize=(width, height), squeeze=False,
                           sharey=True, layout="constrained")  # fmt: skip
    cells = defaultdict(list)
    for r in records:
        key = (r.get("model", ""), r["variant"], depths.index(r["depth"]), lengths.index(r["length"]))
        cells[key].append(r["score"])
    for row, model in enumerate(models):
        for col, variant in enumerate(variants):
            ax, grid = axes[row, col], np.full((len(depths), len(lengths)), np.nan)
            for (m, v, i, j), scores in cells.items():
                if (m, v) == (model, variant):
                    grid[i, j] = 100.0 * np.mean(scores)
            im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
            ax.set_xlabel("context length (tokens)")
            if col == 0:
                ax.set_ylabel(f"{model}\nneedle depth" if len(models) > 1 else "needle depth")
            ax.set_title(NIAH_VARIANTS.get(variant, variant))
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="accuracy (%)")
    title = title or (f"S-NIAH, {models[0]}" if len(models) == 1 and models[0] else None)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
