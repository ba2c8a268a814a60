"""Evaluation: runners for every benchmark of the paper, reports (tables, CSV/JSON, plots) and
``titans eval``.

The runners are plain functions taking a model and a tokenizer, independent of the command line:

    from titans.eval import run_niah, plot_niah_heatmap
    result = run_niah(model, tokenizer, lengths=[1024, 4096], variants=("pk", "n", "w"))
    print(result.table())
    plot_niah_heatmap(result.records, "niah.png")

Every long input is streamed through the model in pieces with its recurrent state
(``titans.eval.streaming``), so memory stays flat however long the prompt or document is.
Submodules import torch; this package namespace imports them lazily so that ``titans --help``
stays fast.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "EvalResult": "report",
    "EvalSettingError": "report",
    "combine_results": "report",
    "format_table": "report",
    "write_results": "report",
    "length_label": "report",
    "check_chunk_tokens": "streaming",
    "prefill": "streaming",
    "token_nll": "streaming",
    "greedy_continue": "streaming",
    "decode_prediction": "streaming",
    "run_niah": "niah",
    "niah_table": "niah",
    "plot_niah_heatmap": "niah",
    "run_babilong": "babilong",
    "plot_babilong": "babilong",
    "run_mqar": "mqar",
    "run_perplexity": "perplexity",
    "plot_ppl_by_position": "perplexity",
    "text_file_documents": "perplexity",
    "shard_documents": "perplexity",
    "run_zeroshot": "zeroshot",
    "score_choices": "zeroshot",
    "run_throughput": "throughput",
    "plot_throughput": "throughput",
}

__all__ = list(_EXPORTS)  # noqa: PLE0605


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
