"""A run directory and the files one stage hands the next.

- :mod:`~campar_ray.run.layout`: every path inside a run directory (:class:`~.layout.RunDir`);
- :mod:`~campar_ray.run.logits`: the logits Parquet format, stage 1's hand-off to stage 2;
- :mod:`~campar_ray.run.checkpoints`: the stage-1 checkpoint files, and which can be resumed.

``train`` writes these, ``cfar``, ``tune``, ``evaluate`` and ``bundle`` read them; all of them
import this part and none imports another for a path. Nothing is imported here: a process
that only reads logits (an ALS actor) must not pay for torch (checkpoints).
"""
