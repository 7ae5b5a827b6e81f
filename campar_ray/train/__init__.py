"""Stage 1: CAM-PAR training on Ray Train, its checkpoints, and the logits it hands to stage 2.

- :mod:`~campar_ray.train.loop`: optimiser, scheduler, ``train_one_epoch`` and ``evaluate`` in
  plain PyTorch (no Ray);
- :mod:`~campar_ray.train.stage1`: the ``TorchTrainer`` driver;
- :mod:`~campar_ray.train.worker`: one Ray Train worker's epochs, reports and checkpoints;
- :mod:`~campar_ray.train.checkpoints`: the checkpoint files, and which can be resumed;
- :mod:`~campar_ray.train.inference`: logits of every image by Ray Data batch inference;
- :mod:`~campar_ray.train.logits`: the logits Parquet format.

Nothing is imported here: a process that only reads logits (an ALS actor) must not pay for
torch and Ray Train (about 750 MiB per process).
"""
