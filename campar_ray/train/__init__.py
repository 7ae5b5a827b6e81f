"""Stage 1: CAM-PAR training on Ray Train, and the logits it hands to stage 2.

- :mod:`~campar_ray.train.loop`: optimiser, scheduler, ``train_one_epoch`` and ``evaluate`` in
  plain PyTorch (no Ray);
- :mod:`~campar_ray.train.stage1`: the ``TorchTrainer`` driver;
- :mod:`~campar_ray.train.worker`: one Ray Train worker's epochs, reports and checkpoints;
- :mod:`~campar_ray.train.monitor`: what rank 0 records of each epoch, the driver's epoch lines;
- :mod:`~campar_ray.train.inference`: logits of every image by Ray Data batch inference.

The files it writes (checkpoints, logits) and where they go are :mod:`campar_ray.run`'s.
Nothing is imported here, so that :mod:`.loop` loads without Ray Train.
"""
