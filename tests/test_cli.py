"""The command line: every command has help; a prepare -> train -> generate session works."""

from __future__ import annotations

import json

import pytest

from titans.__main__ import build_parser, main

COMMANDS = ["demo", "data", "train", "eval", "generate", "bench", "timeseries"]


def _check_help(parser, where):
    """Every option and every sub-command explains itself, recursively."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for sub_name, sub_parser in action.choices.items():
                assert helps.get(sub_name), f"{where} {sub_name} has no help line"
                _check_help(sub_parser, f"{where} {sub_name}")
        else:
            assert action.help, f"{where}: {action.option_strings or action.dest} has no help"


def test_every_command_has_help(capsys):
    parser = build_parser()
    listed = parser._subparsers._group_actions[0].choices
    for name in COMMANDS:
        if name not in listed:
            continue  # not built in this checkout
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: titans {name}" in out and len(out) > 200
        _check_help(listed[name], f"titans {name}")
    assert {"train", "generate", "bench", "data", "demo"} <= set(listed)


def test_prepare_train_generate_session(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + "the quick brown fox jumps over the lazy dog. " * 40)
    shards = tmp_path / "shards"
    assert main(["data", "prepare", str(corpus), "--out", str(shards), "--val-fraction", "0.3", "--no-progress"]) == 0
    run_dir = tmp_path / "run"
    overrides = [
        f"--train.out_dir={run_dir}", f"--data.path={shards}", "--model.dim=32", "--model.heads=2", "--model.depth=1",
        "--model.segment=16", "--model.memory_chunk=8", "--train.seq_len=32", "--train.batch_tokens=64",
        "--train.micro_batch=2", "--train.max_steps=3", "--train.eval_every=3", "--train.eval_batches=1",
        "--train.eval_rows=2", "--train.progress=false", "--train.tensorboard=false",
    ]  # fmt: skip
    assert main(["train", "--config", "configs/tiny.yaml", *overrides]) == 0
    assert "done: step 3" in capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and "val_loss" in records[-1]
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "the quick", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("the quick")
    # a second fresh run into the same directory is refused; --resume auto continues it
    assert main(["train", "--config", "configs/tiny.yaml", *overrides]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert main(["train", "--config", "configs/tiny.yaml", *overrides, "--train.max_steps=4", "--resume", "auto"]) == 0


def test_user_mistakes_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", "--train.lerning_rate=1"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["train", f"--data.path={tmp_path / 'nowhere'}", "--train.progress=false"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "none")]) != 0
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", "x", "--bogus=1"])  # overrides only where a command takes them
    assert main(["demo", "niah", "--variants", "pair-xx"]) == 2
    assert "--variants: unknown ['pair-xx']" in capsys.readouterr().err
    assert main(["demo", "niah", "--variants", "pair-pk", "--needles", "8"]) == 2  # was prompts per length
    assert "prompts per length is --samples" in capsys.readouterr().err
