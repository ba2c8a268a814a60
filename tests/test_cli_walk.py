"""Every option of every command, given values no one should pass (negative, zero, NaN, 1e400,
20-digit integers, words, empty): the command exits 0 or 2 with a one-line message, never with a
traceback. The inputs the commands read do not exist, so nothing runs past the checks; the cases
below that do load a model name the values that used to crash deep inside."""

from __future__ import annotations

import argparse

import pytest

from titans.__main__ import build_parser, main

BAD = ["-5", "0", "nan", "inf", "1e400", "abc", "", "99999999999999999999"]
# what each command reads, made not to exist (commands not listed take a missing checkpoint)
MISSING = {
    "demo": ["--models", "no-such-model"],
    "data prepare": ["/nonexistent/in.txt", "--out", "{tmp}/out"],
    "data info": ["/nonexistent/dir"],
    "train": ["--config", "/nonexistent/c.yaml"],
    "timeseries train": ["--data", "/nonexistent/x.csv"],
    "timeseries eval": ["--data", "/nonexistent/x.csv", "--checkpoint", "/nonexistent/ck"],
    "timeseries report": ["--out", "/nonexistent/out"],
}


def _commands(parser: argparse.ArgumentParser, prefix=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield list(prefix), parser
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, (*prefix, name))


def _cases():
    for prefix, parser in _commands(build_parser()):
        base = MISSING.get(" ".join(prefix), ["--checkpoint", "/nonexistent/ck"])
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and action.option_strings[0] not in base:
                yield prefix, base, action.option_strings[0]


@pytest.mark.parametrize(("prefix", "base", "option"), list(_cases()), ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_bad_values_exit_2_with_one_line(prefix, base, option, tmp_path, capsys):
    base = [b.format(tmp=tmp_path) for b in base]
    for value in BAD:
        try:
            code = main([*prefix, *base, option, value])
        except SystemExit as stop:  # argparse's own refusals
            code = stop.code
        err = capsys.readouterr().err
        assert code in (0, 2), f"{prefix} {option} {value!r}: exit {code}\n{err[-300:]}"
        assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["eval", "niah", "--config", "micro-untrained", "--lengths", "99999999999999999999"], "beyond any run here"),
        (["eval", "niah", "--config", "micro-untrained", "--depths", "99999999999999999999"], "--depths must lie in"),
        (["eval", "niah", "--config", "micro-untrained", "--init-seed", "99999999999999999999"], "--init-seed must lie"),
        (["eval", "mqar", "--config", "micro-untrained", "--vocab-size", "0"], "--vocab-size must be >= 2"),
        (["eval", "mqar", "--config", "micro-untrained", "--power-a", "1e400"], "--power-a must be a finite"),
        (["eval", "mqar", "--config", "micro-untrained", "--device", "abc"], "--device 'abc' is not a device"),
        (["generate", "--checkpoint", "titans/checkpoints/recall-mag-4", "--device", "0"], "--device '0'"),
        (["generate", "--checkpoint", "titans/checkpoints/recall-mag-4", "--seed", "99999999999999999999"],
         "--seed must lie"),
        (["demo", "--needles", "99999999999999999999"], "--needles must lie"),
        (["demo", "--chunk-tokens", "0"], "--chunk-tokens must lie"),
        (["demo", "--head-dim", "16"], "--head-dim sets the recall demo's width"),
        (["demo", "recall", "--head-dim", "-5"], "--head-dim must lie"),
        (["bench", "--config", "configs/tiny.yaml", "--batch", "0"], "--batch must lie"),
        (["bench", "--config", "configs/tiny.yaml", "--stream-tokens", "-5"], "--stream-tokens must lie"),
        (["timeseries", "train", "--data", "x.csv", "--threads", "99999999999999999999"], "--threads must be between"),
    ],
)
def test_values_that_crashed_deep_inside_are_refused_first(argv, said, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse: its usage line, then the error
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and said in err.strip().splitlines()[-1], err


def _config_cases():
    import dataclasses

    from titans.model import TitansConfig
    from titans.train.config import DataConfig, TrainConfig

    for section, klass in (("model", TitansConfig), ("train", TrainConfig), ("data", DataConfig)):
        for f in dataclasses.fields(klass):
            yield section, f.name


@pytest.mark.parametrize(("section", "name"), list(_config_cases()), ids=lambda x: x)
def test_every_config_field_refuses_bad_values_by_name_before_anything_is_built(section, name):
    """``--model.X=...`` / ``--train.X=...`` / ``--data.X=...`` with values no one should pass: the
    config is refused with a ConfigError, or the model it describes builds (on the meta device: no
    memory); never another exception from deep inside, never a size that takes forever."""
    import time

    import torch

    from titans.io.config_files import ConfigError
    from titans.model import TitansLM
    from titans.train.config import load_run_config

    for value in [*BAD, "true", "[1]", "-1e-9", "1e9", "2.5"]:
        start = time.perf_counter()
        try:
            run = load_run_config(None, [f"{section}.{name}={value}"])
        except ConfigError:
            continue
        if section == "model":
            with torch.device("meta"):
                TitansLM(run.model)
        assert time.perf_counter() - start < 10, f"{section}.{name}={value!r} took {time.perf_counter() - start:.0f} s"
