"""Stage 1: CAM-PAR training on Ray Train, its checkpoints, and the logits it hands to stage 2.

- :mod:`~campar_ray.train.loop`: optimiser, scheduler, ``train_one_epoch`` and ``evaluate`` in
  plain PyTorch (no Ray);
- :mod:`~campar_ray.train.stage1`: the ``TorchTrainer`` driver, the worker loop, checkpoints;
- :mod:`~campar_ray.train.inference`: logits of every image by Ray Data batch inference;
- :mod:`~campar_ray.train.logits`: the logits Parquet format.
"""

from campar_ray.train.logits import (
    SplitLogits,
    count_rows,
    logits_path,
    read_split_logits,
    write_split_logits,
)
from campar_ray.train.stage1 import (
    Stage1Result,
    load_stage1_checkpoint,
    resolve_config,
    train_stage1,
)

__all__ = [
    "SplitLogits",
    "Stage1Result",
    "count_rows",
    "load_stage1_checkpoint",
    "logits_path",
    "read_split_logits",
    "resolve_config",
    "train_stage1",
    "write_split_logits",
]
