"""Long-term forecasting data in the Time-Series-Library (TSLib) protocol.

A dataset is a CSV (optionally gzip-compressed) in the standard layout ``date, features..., OT``.
The multivariate ("M") setting forecasts every column but the date. Splits follow TSLib:

* ETT hourly (``ETTh*``): train ``[0, 12*30*24)``, val ``[12*30*24 - L, 16*30*24)``,
  test ``[16*30*24 - L, 20*30*24)`` (12 / 4 / 4 months; rows past 20 months are unused).
* ETT 15-minute (``ETTm*``): the same borders times 4.
* anything else ("custom": ECL, Traffic, Weather, ...): ``n_train = int(0.7 n)``,
  ``n_test = int(0.2 n)``, val = the rest; val starts ``L`` rows before its first target row,
  test likewise.

Every split except train starts ``L`` (lookback) rows early so that its first window forecasts
the split's first row. Data is standardised with the mean / std of the train rows only.
A window starting at ``s`` has input ``x = data[s : s + L]`` and target ``y = data[s + L : s + L + H]``.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ForecastSplits",
    "SeriesTable",
    "WindowDataset",
    "dataset_name",
    "load_table",
    "make_splits",
    "split_borders",
]

_ETT_HOUR_MONTH = 30 * 24  # rows per "month" in TSLib's ETT borders


@dataclass
class SeriesTable:
    """A loaded CSV: ``values [rows, channels]`` (float32), the column names and the date strings."""

    values: np.ndarray
    columns: list[str]
    dates: list[str]


def dataset_name(path: str | Path) -> str:
    """``/x/ETTh1.csv.gz`` -> ``ETTh1`` (the name decides the split rule)."""
    name = Path(path).name
    for suffix in (".gz", ".csv"):
        name = name.removesuffix(suffix)
    return name


def load_table(path: str | Path) -> SeriesTable:
    """Read ``date, features..., OT`` from a ``.csv`` or ``.csv.gz`` file.

    Raises FileNotFoundError for a missing file and ValueError (naming the row and column) for a
    file that is not in the layout: no ``date`` first column, ragged rows, non-numeric values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"time-series file not found: {path} (expected a CSV 'date, features..., OT', e.g. ETTh1.csv)"
        )
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    # Weather's header has non-UTF-8 unit symbols (e.g. W/m^2 in latin-1); only numbers matter.
    reader = csv.reader(io.StringIO(raw.decode("utf-8", errors="replace")))
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{path} is empty") from None
    if len(header) < 2 or header[0].strip().lower() != "date":
        raise ValueError(f"{path}: first column must be 'date', header is {header[:3]}...")
    dates, rows = [], []
    for i, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{path} line {i}: {len(row)} fields, header has {len(header)}")
        dates.append(row[0])
        rows.append(row[1:])
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    try:
        values = np.asarray(rows, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: non-numeric value in a feature column ({err})") from None
    if not np.isfinite(values).all():
        bad = np.argwhere(~np.isfinite(values))[0]
        raise ValueError(
            f"{path} line {bad[0] + 2}, column {header[bad[1] + 1]!r}: not a finite number"
        )
    return SeriesTable(values=values.astype(np.float32), columns=header[1:], dates=dates)


def split_borders(name: str, n_rows: int, seq_len: int) -> dict[str, tuple[int, int]]:
    """Row ranges ``[start, end)`` of train / val / test for a dataset called ``name``.

    The ranges include the ``seq_len`` rows of context before val and test (TSLib's borders).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if name.startswith(("ETTh", "ETTm")):
        month = _ETT_HOUR_MONTH * (4 if name.startswith("ETTm") else 1)
        b1 = (0, 12 * month - seq_len, 16 * month - seq_len)
        b2 = (12 * month, 16 * month, 20 * month)
        if n_rows < b2[2]:
            raise ValueError(f"{name} has {n_rows} rows; the ETT protocol needs at least {b2[2]}")
    else:
        n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
        n_val = n_rows - n_train - n_test
        b1 = (0, n_train - seq_len, n_rows - n_test - seq_len)
        b2 = (n_train, n_train + n_val, n_rows)
        if b1[1] < 0:
            raise ValueError(f"{name} has {n_rows} rows, too few for seq_len={seq_len}")
    return {"train": (b1[0], b2[0]), "val": (b1[1], b2[1]), "test": (b1[2], b2[2])}


@dataclass
class ForecastSplits:
    """Standardised train / val / test arrays ``[rows, channels]`` and the train statistics."""

    name: str
    columns: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mean: np.ndarray  # [channels], from train rows only
    std: np.ndarray
    borders: dict[str, tuple[int, int]]

    @property
    def channels(self) -> int:
        return self.train.shape[1]

    def inverse(self, scaled: np.ndarray) -> np.ndarray:
        """Undo the standardisation (``[..., channels]``), e.g. for plots in original units."""
        return scaled * self.std + self.mean


def make_splits(table: SeriesTable, name: str, seq_len: int = 96) -> ForecastSplits:
    """Split by the protocol and standardise every split with train-row statistics."""
    borders = split_borders(name, len(table.values), seq_len)
    lo, hi = borders["train"]
    train_rows = table.values[lo:hi].astype(np.float64)
    mean = train_rows.mean(axis=0)
    std = train_rows.std(axis=0)  # population std, as sklearn's StandardScaler
    std = np.where(std == 0, 1.0, std)  # a constant train column stays 0 after scaling (as sklearn)

    def scaled(split: str) -> np.ndarray:
        a, b = borders[split]
        return ((table.values[a:b] - mean) / std).astype(np.float32)

    return ForecastSplits(
        name=name, columns=table.columns, train=scaled("train"), val=scaled("val"), test=scaled("test"),
        mean=mean.astype(np.float32), std=std.astype(np.float32), borders=borders,
    )  # fmt: skip


class WindowDataset:
    """All sliding windows of one split: item ``s`` is ``(x [seq_len, C], y [horizon, C])``.

    ``batch(starts)`` gathers many windows at once as ``(x [B, seq_len, C], y [B, horizon, C])``
    numpy arrays, which is much faster than indexing item by item.
    """

    def __init__(self, data: np.ndarray, seq_len: int, horizon: int) -> None:
        if data.ndim != 2:
            raise ValueError(f"data must be [rows, channels], got shape {data.shape}")
        if seq_len < 1 or horizon < 1:
            raise ValueError(f"seq_len and horizon must be >= 1, got {seq_len}, {horizon}")
        if len(data) < seq_len + horizon:
            raise ValueError(
                f"split has {len(data)} rows, fewer than seq_len + horizon = {seq_len + horizon}"
            )
        self.data, self.seq_len, self.horizon = data, seq_len, horizon
        self._offsets = np.arange(seq_len + horizon)

    def __len__(self) -> int:
        return len(self.data) - self.seq_len - self.horizon + 1

    def __getitem__(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= s < len(self):
            raise IndexError(f"window {s} out of range [0, {len(self)})")
        return self.data[s : s + self.seq_len], self.data[
            s + self.seq_len : s + self.seq_len + self.horizon
        ]

    def batch(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        block = self.data[np.asarray(starts)[:, None] + self._offsets]  # [B, L + H, C]
        return block[:, : self.seq_len], block[:, self.seq_len :]
