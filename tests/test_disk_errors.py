"""A full disk or an unwritable directory ends a command with one line that names the path and the
cause (exit 2, as every error the user fixes), never a traceback; a training run that cannot write its checkpoint keeps the last
complete one and leaves no half-written directory behind."""

from __future__ import annotations

import errno

import pytest
import yaml

from titans.__main__ import main
from titans.errors import describe_os_error
from titans.train import checkpoint as ckpt
from titans.train import trainer as trainer_mod

from _train_helpers import fake_build_sources, tiny_run


@pytest.fixture(autouse=True)
def _fake_data(monkeypatch):
    monkeypatch.setattr(trainer_mod, "build_sources", fake_build_sources)


def _config(tmp_path, **train):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run(tmp_path / "run", **train).to_dict()))
    return str(path)


@pytest.mark.parametrize(
    "code, hint",
    [(errno.ENOSPC, "free space"), (errno.EDQUOT, "free space"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")],
)
def test_describe_os_error_names_path_cause_and_remedy(code, hint):
    said = describe_os_error(OSError(code, "strerror text", "/some/dir/file.bin"))
    assert "/some/dir/file.bin" in said and "strerror text" in said and hint in said and "\n" not in said


def test_a_full_disk_mid_run_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real = ckpt.save_tree
    calls = []

    def full_after_the_first_checkpoint(tree, path):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoint writes two trees; the second one finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tree, path)

    monkeypatch.setattr(ckpt, "save_tree", full_after_the_first_checkpoint)
    code = main(["train", "--config", _config(tmp_path, max_steps=6, checkpoint_every=2)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "No space left on device" in err[0] and "free space" in err[0], err
    assert "step-0000002" in err[0] and "--resume auto" in err[0]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-0000002"]
    ckpt.verify_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000002")
    assert not list((tmp_path / "run" / "checkpoints").glob(".step-*"))  # the half-written one is gone
    monkeypatch.setattr(ckpt, "save_tree", real)  # room again: the run continues where it stopped
    assert main(["train", "--config", _config(tmp_path, max_steps=6, checkpoint_every=2), "--resume", "auto"]) == 0


def test_an_unwritable_output_directory_is_one_line(tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out" / "x"))

    monkeypatch.setattr(ckpt, "save_tree", read_only)
    assert main(["train", "--config", _config(tmp_path, max_steps=2, checkpoint_every=1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only" in err[0] and "holds no checkpoint" in err[0], err


def test_other_commands_report_write_failures_in_one_line(tmp_path, monkeypatch, capsys):
    from titans.eval import report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "e" / "results.json"))

    monkeypatch.setattr(report, "write_results", full)
    code = main(["eval", "mqar", "--config", "micro-untrained", "--out", str(tmp_path / "e"), "--no-progress", "--seq-lens", "64", "--num-pairs", "4", "--samples", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and "titans eval" in err[0], err


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])  # fmt: skip
def test_a_length_the_machine_cannot_hold_is_one_line(error, tmp_path, monkeypatch, capsys):
    from titans.eval import mqar

    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(mqar, "run_mqar", too_big)
    code = main(["eval", "mqar", "--config", "micro-untrained", "--out", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "out of memory" in err[0] and "--batch-size" in err[0], err


def test_out_of_memory_in_training_names_training_settings(tmp_path, monkeypatch, capsys):
    def too_big(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(trainer_mod, "evaluate", too_big)
    assert main(["train", "--config", _config(tmp_path, max_steps=3, eval_every=1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train.micro_batch" in err[0] and "--batch-size" not in err[0], err


def test_a_missing_file_inside_a_run_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the refusals a user fixes on the machine (full disk, read-only, permission) become one
    line; a file the code looked for and did not find is a bug or a missing input, and says so."""
    def missing(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nonexistent/recipe.yaml")

    monkeypatch.setattr(ckpt, "save_tree", missing)
    with pytest.raises(FileNotFoundError):
        main(["train", "--config", _config(tmp_path, max_steps=2, checkpoint_every=1)])


def test_a_permission_refusal_reads_as_one_for_any_path(tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/corpus/train.bin")

    monkeypatch.setattr(ckpt, "save_tree", forbidden)
    assert main(["train", "--config", _config(tmp_path, max_steps=2, checkpoint_every=1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no permission for that path" in err[0] and "checkpoint" not in err[0], err


def test_other_runtime_errors_still_raise(tmp_path, monkeypatch):
    from titans.eval import mqar

    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(mqar, "run_mqar", bug)
    with pytest.raises(RuntimeError, match="shapes"):
        main(["eval", "mqar", "--config", "micro-untrained", "--out", str(tmp_path / "e"), "--no-progress"])
