"""titans.timeseries: the TSLib protocol (splits, scaling, windows), the forecasters, the CLI."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from titans.timeseries.data import (
    WindowDataset,
    dataset_name,
    load_table,
    make_splits,
    split_borders,
)
from titans.timeseries.experiment import (
    DEFAULT_CONFIG,
    evaluate_checkpoint,
    spec_from_config,
)
from titans.timeseries.models import EinFFT, ForecasterConfig, RevIN, build_forecaster
from titans.timeseries.report import read_results, write_tables
from titans.timeseries.train import TrainConfig, evaluate, fit

REPO = Path(__file__).resolve().parents[1]
# the published ETT / Weather files: ../shared/data/timeseries next to the clone, or $TITANS_TIMESERIES_DATA
DATA_DIR = Path(os.environ.get("TITANS_TIMESERIES_DATA", REPO.parent / "shared" / "data" / "timeseries"))


def _dataset(name: str) -> Path:
    path = DATA_DIR / f"{name}.csv.gz"
    if not path.is_file():
        pytest.skip(
            f"{path} not found: put the published {name}.csv.gz in ../shared/data/timeseries/ "
            f"or point TITANS_TIMESERIES_DATA at their directory"
        )
    return path


def _write_csv(path: Path, values: np.ndarray, compress: bool = False) -> Path:
    lines = ["date," + ",".join(f"f{i}" for i in range(values.shape[1] - 1)) + ",OT"]
    for t, row in enumerate(values):
        lines.append(f"2020-01-01 {t:05d}," + ",".join(f"{v:.6f}" for v in row))
    text = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(text) if compress else text)
    return path


# ---- protocol ---------------------------------------------------------------------------------


def test_etth1_split_row_counts_match_tslib():
    splits = make_splits(load_table(_dataset("ETTh1")), "ETTh1", seq_len=96)
    assert splits.borders == {"train": (0, 8640), "val": (8544, 11520), "test": (11424, 14400)}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8640, 2976, 2976)
    assert splits.channels == 7 and splits.columns[-1] == "OT"
    # windows per split for horizon 96 (TSLib: len = rows - seq_len - pred_len + 1)
    assert [len(WindowDataset(getattr(splits, s), 96, 96)) for s in ("train", "val", "test")] == [
        8449,
        2785,
        2785,
    ]


def test_ettm1_split_row_counts_match_tslib():
    splits = make_splits(load_table(_dataset("ETTm1")), "ETTm1", seq_len=96)
    assert splits.borders == {"train": (0, 34560), "val": (34464, 46080), "test": (45984, 57600)}
    assert [len(WindowDataset(getattr(splits, s), 96, 720)) for s in ("train", "val", "test")] == [
        33745,
        10801,
        10801,
    ]


def test_custom_split_rule_70_10_20():
    n = 52696  # Weather's rows
    b = split_borders("weather", n, 96)
    n_train, n_test = int(n * 0.7), int(n * 0.2)
    assert b == {
        "train": (0, n_train),
        "val": (n_train - 96, n - n_test),
        "test": (n - n_test - 96, n),
    }
    assert (
        b["val"][1] - b["val"][0] - 96 == n - n_train - n_test
    )  # val forecasts exactly its own rows


def test_scaling_uses_train_rows_only(tmp_path):
    rng = np.random.default_rng(0)
    n = 1000
    values = rng.normal(size=(n, 3)).astype(np.float32)
    path = _write_csv(tmp_path / "toy.csv", values)
    base = make_splits(load_table(path), "toy", seq_len=24)
    original = load_table(path).values
    # Change every row after the train split: the statistics must not move.
    values[base.borders["train"][1] :] += 1000.0
    leaked = make_splits(load_table(_write_csv(tmp_path / "toy.csv", values)), "toy", seq_len=24)
    np.testing.assert_array_equal(base.mean, leaked.mean)
    np.testing.assert_array_equal(base.std, leaked.std)
    np.testing.assert_allclose(base.train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(base.train.std(0), 1, atol=1e-4)
    a, b = base.borders["test"]
    np.testing.assert_allclose(base.inverse(base.test), original[a:b], atol=1e-4)


def test_windows_align_input_and_target():
    data = np.arange(50, dtype=np.float32)[:, None] * np.array([[1.0, -1.0]], dtype=np.float32)
    ds = WindowDataset(data, seq_len=8, horizon=4)
    assert len(ds) == 50 - 8 - 4 + 1
    x, y = ds[5]
    np.testing.assert_array_equal(x[:, 0], np.arange(5, 13))
    np.testing.assert_array_equal(y[:, 0], np.arange(13, 17))
    bx, by = ds.batch(np.array([0, 5, len(ds) - 1]))
    np.testing.assert_array_equal(bx[1], x)
    np.testing.assert_array_equal(by[1], y)
    assert by[2, -1, 0] == 49  # the last window ends on the last row
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_table(tmp_path / "missing.csv")
    (tmp_path / "nodate.csv").write_text("time,a,OT\n1,2,3\n")
    with pytest.raises(ValueError, match="'date'"):
        load_table(tmp_path / "nodate.csv")
    (tmp_path / "text.csv").write_text("date,a,OT\nx,1,abc\n")
    with pytest.raises(ValueError, match="non-numeric"):
        load_table(tmp_path / "text.csv")
    (tmp_path / "ragged.csv").write_text("date,a,OT\nx,1\n")
    with pytest.raises(ValueError, match="line 2"):
        load_table(tmp_path / "ragged.csv")
    with pytest.raises(ValueError, match="at least 14400"):
        split_borders("ETTh1", 1000, 96)
    with pytest.raises(ValueError, match="fewer than"):
        WindowDataset(np.zeros((10, 2), np.float32), 8, 4)


def test_gzip_and_plain_csv_load_the_same(tmp_path):
    values = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    a = load_table(_write_csv(tmp_path / "x.csv", values))
    b = load_table(_write_csv(tmp_path / "x.csv.gz", values, compress=True))
    np.testing.assert_array_equal(a.values, b.values)
    assert dataset_name(tmp_path / "x.csv.gz") == "x" and a.columns[-1] == "OT"


# ---- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{"model": "dlinear"}, {"model": "titans", "tokens": "variate"}, {"model": "titans", "tokens": "patch"},
     {"model": "transformer", "tokens": "variate"}, {"model": "transformer", "tokens": "patch"},
     {"model": "titans", "tokens": "variate", "bidirectional": True}],
)  # fmt: skip
def test_forecaster_shapes(kw):
    cfg = ForecasterConfig(
        seq_len=32, horizon=12, channels=3, dim=16, heads=2, patch_len=8, stride=4, **kw
    )
    model = build_forecaster(cfg)
    y = model(torch.randn(5, 32, 3))
    assert y.shape == (5, 12, 3) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="seq_len=32"):
        model(torch.randn(5, 31, 3))


def test_revin_round_trip_and_scale_invariance():
    rev = RevIN(3)
    x = torch.randn(4, 20, 3) * 5 + 7
    z, stats = rev.normalise(x)
    torch.testing.assert_close(rev.denormalise(z, stats), x, atol=1e-4, rtol=1e-4)
    cfg = ForecasterConfig(
        seq_len=20, horizon=6, channels=3, dim=16, heads=2, tokens="variate", dropout=0.0
    )
    model = build_forecaster(cfg).eval()
    # With RevIN, shifting and scaling a window shifts and scales its forecast the same way.
    torch.testing.assert_close(model(3 * x + 2), 3 * model(x) + 2, atol=1e-3, rtol=1e-3)


def test_einfft_mixes_features_and_keeps_shape():
    mix = EinFFT(16, blocks=4, shrink=0.0)
    x = torch.randn(2, 5, 16)
    y = mix(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mix.parameters())


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="model must be one of"):
        ForecasterConfig(model="lstm")
    with pytest.raises(ValueError, match="unknown key 'dimm' in model; did you mean 'dim'"):
        ForecasterConfig.from_dict({"dimm": 3})
    with pytest.raises(ValueError, match="has no section"):
        spec_from_config({"models": {}}, "titans", 96, 7)
    with pytest.raises(ValueError, match="unknown key 'lrr' in train; did you mean 'lr'"):
        spec_from_config({"models": {"dlinear": {"train": {"lrr": 1}}}}, "dlinear", 96, 7)


def test_default_config_matches_the_committed_yaml():
    from titans.io.config_files import load_config_file

    assert load_config_file(REPO / "configs" / "timeseries" / "table3.yaml") == DEFAULT_CONFIG


# ---- training ---------------------------------------------------------------------------------


def _synthetic_splits(tmp_path, n=700, channels=3):
    t = np.arange(n)[:, None]
    values = np.sin(2 * np.pi * t / 24 + np.arange(channels)) + 0.05 * np.random.default_rng(
        0
    ).normal(size=(n, channels))
    return make_splits(
        load_table(_write_csv(tmp_path / "synth.csv", values.astype(np.float32))), "synth", 48
    )


@pytest.mark.parametrize("model", ["titans", "transformer", "dlinear"])
def test_model_trains_a_few_steps_on_a_synthetic_series(tmp_path, model):
    splits = _synthetic_splits(tmp_path)
    mcfg = ForecasterConfig(model=model, seq_len=48, horizon=12, channels=3, dim=16, heads=2,
                            tokens="variate", dropout=0.0)  # fmt: skip
    tcfg = TrainConfig(
        epochs=3, batch_size=16, lr=3e-3, lr_decay=1.0, max_train_windows=160, seed=0
    )
    val = WindowDataset(splits.val, 48, 12)
    torch.manual_seed(0)
    before = evaluate(build_forecaster(mcfg), val)["mse"]
    result = fit(splits, mcfg, tcfg, log=lambda s: None)
    assert result.epochs_run >= 1 and result.val_mse < 0.7 * before
    assert np.isfinite(result.test_mse) and result.test_mae > 0


def test_train_eval_cli_round_trip(tmp_path, capsys):
    from titans.__main__ import main

    splits_path = _write_csv(
        tmp_path / "synth.csv", np.sin(np.arange(600)[:, None] / 5.0 + np.arange(2))
    )
    out = tmp_path / "out"
    code = main(["timeseries", "train", "--data", str(splits_path), "--horizon", "12", "--model", "dlinear",
                 "--out", str(out), "--quiet", "--seq_len=24", "--train.epochs=2"])  # fmt: skip
    assert code == 0
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 1 and rows[0]["horizon"] == 12 and rows[0]["model"] == "dlinear"
    splits = make_splits(load_table(splits_path), "synth", 24)
    assert rows[0]["test_windows"] == len(WindowDataset(splits.test, 24, 12))  # every test window
    assert (out / "per_horizon.md").is_file() and (out / "average.md").is_file()
    ckpt = out / "checkpoints" / "synth_dlinear_H12_seed2021.safetensors"
    m = evaluate_checkpoint(splits_path, ckpt, 12)
    assert m["mse"] == pytest.approx(rows[0]["mse"], rel=1e-6)
    assert (
        main(
            [
                "timeseries",
                "eval",
                "--data",
                str(splits_path),
                "--checkpoint",
                str(ckpt),
                "--horizon",
                "24",
            ]
        )
        == 2
    )
    assert "does not match" in capsys.readouterr().err
    assert (
        main(["timeseries", "train", "--data", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    )
    assert (
        main(
            [
                "timeseries",
                "train",
                "--data",
                str(splits_path),
                "--out",
                str(out),
                "--models.titans.model.dimm=3",
            ]
        )
        == 2
    )
    assert "unknown key 'dimm' in model; did you mean 'dim'" in capsys.readouterr().err


def test_evaluate_subsamples_only_when_asked():
    data = WindowDataset(np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32), 16, 4)
    model = build_forecaster(ForecasterConfig(model="dlinear", seq_len=16, horizon=4, channels=2))
    assert evaluate(model, data)["windows"] == len(data)
    assert evaluate(model, data, max_windows=50)["windows"] == 50
    assert evaluate(model, data, batch_size=7)["mse"] == pytest.approx(
        evaluate(model, data)["mse"], rel=1e-9
    )


def test_tables_average_over_horizons(tmp_path):
    rows = [{"dataset": "ETTh1", "model": "titans", "horizon": h, "mse": m, "mae": m / 2}
            for h, m in zip((96, 192, 336, 720), (0.1, 0.2, 0.3, 0.4))]  # fmt: skip
    rows.append({"dataset": "ETTh2", "model": "titans", "horizon": 96, "mse": 1.0, "mae": 1.0})
    write_tables(rows, tmp_path)
    avg = (tmp_path / "average.md").read_text()
    assert "| ETTh1 | 0.420 | 0.421 | 0.250 | 0.125 |" in avg  # paper row beside ours
    assert "(1/4 horizons)" in avg  # an unfinished dataset is not averaged
