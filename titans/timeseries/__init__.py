"""Long-term time-series forecasting with the neural memory (Titans paper, section 5.6, Table 3).

* ``data``: CSV loading (``date, features..., OT``), TSLib splits and train-only scaling, windows.
* ``models``: the Simba-style Titans forecaster, the attention reference (iTransformer / PatchTST
  style) and DLinear, all ``[batch, seq_len, channels] -> [batch, horizon, channels]``.
* ``train``: TSLib's recipe with early stopping; MSE / MAE over all test windows.
* ``experiment`` / ``report`` / ``cli``: runs from a config, result tables, plots, the command line.
"""

from .data import ForecastSplits, WindowDataset, load_table, make_splits, split_borders
from .models import ForecasterConfig, build_forecaster
from .train import TrainConfig, evaluate, fit

__all__ = [
    "ForecastSplits",
    "ForecasterConfig",
    "TrainConfig",
    "WindowDataset",
    "build_forecaster",
    "evaluate",
    "fit",
    "load_table",
    "make_splits",
    "split_borders",
]  # fmt: skip
