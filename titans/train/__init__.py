"""Training: run configs, the trainer loop, checkpoints, and distributed wrapping (applied from
outside the model: ``titans.train.distributed.parallelize``)."""

from .checkpoint import CheckpointError, load_pretrained
from .config import DataConfig, RunConfig, TrainConfig, load_run_config

__all__ = ["CheckpointError", "DataConfig", "RunConfig", "TrainConfig", "load_pretrained", "load_run_config"]
