"""The defaults run: from an empty directory, each command with no config and only its step counts
made tiny does its job (train, generate, evaluate, benchmark) and writes only under that directory."""

from __future__ import annotations

import pytest

from titans.__main__ import main


def test_every_command_runs_with_its_defaults_from_an_empty_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--train.max_steps=2", "--train.eval_every=2", "--train.eval_batches=1", "--train.progress=false"]
    assert main(["train", *tiny]) == 0
    said = capsys.readouterr().out
    assert "done: step 2" in said and (tmp_path / "runs" / "tiny").is_dir()
    assert main(["generate", "--checkpoint", "runs/tiny", "--prompt", "To be", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    checks = [
        ["eval", "niah", "--checkpoint", "runs/tiny", "--lengths", "1K", "--samples", "1", "--no-progress"],
        ["eval", "mqar", "--checkpoint", "runs/tiny", "--seq-lens", "64", "--num-pairs", "4", "--samples", "4",
         "--no-progress"],
        ["eval", "throughput", "--checkpoint", "runs/tiny", "--lengths", "64", "--no-progress"],
        ["bench", "--stream-tokens", "256", "--decode-tokens", "4"],
        ["data", "prepare"],  # the built-in corpus, tokenised into ./data
    ]  # fmt: skip
    for argv in checks:
        assert main(argv) == 0, argv
        assert capsys.readouterr().out.strip(), argv
    made = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert made <= {"runs", "eval-results", "data"}, made


@pytest.mark.parametrize("argv", [["timeseries", "train"], ["eval", "ppl"]])
def test_commands_that_need_a_user_path_say_so_in_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "required" in err[-1] and "Traceback" not in "\n".join(err)
