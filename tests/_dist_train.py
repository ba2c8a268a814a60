"""Run by torchrun from test_distributed.py: train the tiny run with DDP or FSDP."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import titans.train.trainer as trainer  # noqa: E402
from _train_helpers import fake_build_sources, tiny_run  # noqa: E402

torch.set_num_threads(1)
trainer.build_sources = fake_build_sources
out_dir, mode = sys.argv[1], sys.argv[2]
trainer.train(tiny_run(out_dir, parallel=mode, max_steps=4, eval_every=2, checkpoint_every=2))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
