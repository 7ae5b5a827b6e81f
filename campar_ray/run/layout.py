"""Every name inside a run directory, in one place.

A run directory is what ``run.dir`` names: each stage writes its part of it and later stages,
the bundle, evaluation and the demo read those parts back. Spelling the paths here, and
nowhere else, lets ``train``, ``cfar``, ``tune``, ``evaluate`` and ``bundle`` find each
other's files without importing each other. A search trial's folder is a run directory too
(scope ``full`` trains stage 1 into it).

What a folder holds inside, when only the part that writes it reads it, stays with that part:
the checkpoint files (:mod:`.checkpoints`), the stage-2 model files
(:mod:`campar_ray.cfar.model`, shared with bundles) and the report's files
(:mod:`campar_ray.evaluate.report`). A search's folder has its own :class:`SearchDir`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from campar_ray import storage

CONFIG_FILE = "config.yaml"
"""The resolved config of a run (a bundle keeps its config under the same name)."""
LOGITS_DIR = "logits"
EPOCH_LOGITS_DIR = "epochs"
"""Under :data:`LOGITS_DIR`: every epoch's validation logits, the evidence behind the
checkpoint rule (``train.checkpoint_rule``)."""
SKIPPED_FILE = "skipped.json"
CFAR_DIR = "cfar"
"""Stage 2's artefacts (a bundle copies them under the same name)."""
CFAR_METRICS_FILE = "metrics.json"
CALIBRATION_FILE = "calibration.json"
"""The final source's per-attribute logit offsets, fitted on val (:mod:`campar_ray.decision`);
a bundle keeps them under the same name."""
TUNE_DIR = "tune"
BEST_CONFIG_FILE = "best.yaml"
TRIAL_RECORD_FILE = "trials.json"
"""campar's own record of a search's trials: what ``--resume`` trusts."""
SEARCH_SETTINGS_FILE = "search.json"
SEARCH_SUMMARY_FILE = "summary.json"
TRIALS_TABLE = "trials"
"""The table of trials, ``trials.parquet`` and ``trials.csv``."""
TRIALS_DIR = "trials"
"""One run directory per trial (a ``full`` trial trains stage 1 into it)."""
REPORT_DIR = "report"
TENSORBOARD_DIR = "tensorboard"
DATA_STATS_DIR = "data_stats"
LOGS_DIR = "logs"
RAY_DIR = "ray"
LOCK_FILE = ".campar-lock"
"""Held by the one command writing the run (:mod:`.lock`); it names that command."""
STAGE1_RUN = "stage1"
"""Stage 1's Ray Train run, stored under :data:`RAY_DIR`: the folder of its checkpoints."""

DERIVED = (
    CONFIG_FILE,
    f"{RAY_DIR}/{STAGE1_RUN}",
    LOGITS_DIR,
    CALIBRATION_FILE,
    CFAR_DIR,
    TUNE_DIR,
    TENSORBOARD_DIR,
    DATA_STATS_DIR,
    REPORT_DIR,
)
"""What ``campar train --fresh`` deletes: everything a previous run derived (its logs stay)."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (a local folder or a URI)."""

    path: str

    def _join(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    @property
    def config_file(self) -> str:
        return self._join(CONFIG_FILE)

    @property
    def ray_storage(self) -> str:
        """Ray Train's ``storage_path``; its run :data:`STAGE1_RUN` holds the checkpoints."""
        return self._join(RAY_DIR)

    @property
    def checkpoints(self) -> str:
        return self._join(RAY_DIR, STAGE1_RUN)

    def logits(self, split: str) -> str:
        """The stage-1 logits of ``split``: what stage 2, evaluation and the bundle read."""
        return self._join(LOGITS_DIR, f"{split}.parquet")

    def epoch_logits(self, epoch: int) -> str:
        """Epoch ``epoch``'s validation prediction logits and labels (``.npz``, float16
        logits), written as the epoch is scored, whichever checkpoint the rule keeps."""
        return self._join(LOGITS_DIR, EPOCH_LOGITS_DIR, f"val-epoch{epoch:03d}.npz")

    @property
    def skipped_images(self) -> str:
        """The images of each split left out of the logits (they could not be decoded)."""
        return self._join(LOGITS_DIR, SKIPPED_FILE)

    @property
    def cfar(self) -> str:
        return self._join(CFAR_DIR)

    @property
    def cfar_metrics(self) -> str:
        return self._join(CFAR_DIR, CFAR_METRICS_FILE)

    @property
    def calibration(self) -> str:
        """The calibration of the run's final prediction (stage 1, or stage 1 + CFAR)."""
        return self._join(CALIBRATION_FILE)

    @property
    def tune(self) -> str:
        return self._join(TUNE_DIR)

    @property
    def search(self) -> SearchDir:
        """The files of a search in :attr:`tune`."""
        return SearchDir(self.tune)

    @property
    def best_config(self) -> str:
        """The best config a search found (``campar train --config`` accepts it)."""
        return self._join(TUNE_DIR, BEST_CONFIG_FILE)

    def report(self, split: str) -> str:
        return self._join(REPORT_DIR, split)

    def tensorboard(self, stage: str) -> str:
        """The event files of ``stage`` (``stage1``, ``cfar``, a search's ``trial``)."""
        return self._join(TENSORBOARD_DIR, stage)

    def data_stats(self, epoch: int) -> str:
        """Ray Data's statistics of one stage-1 epoch."""
        return self._join(DATA_STATS_DIR, f"epoch_{epoch:03d}.txt")

    @property
    def logs(self) -> str:
        """The command's tracebacks and Ray's output when it runs quietly."""
        return self._join(LOGS_DIR)

    @property
    def lock(self) -> str:
        return self._join(LOCK_FILE)

    def contains(self, path: str) -> bool:
        """True when ``path`` is this run directory or lies inside it (symlinks resolved on a
        local disk): where a command that writes elsewhere must not write."""
        if storage.is_uri(self.path) or storage.is_uri(path):
            run, other = self.path.rstrip("/"), path.rstrip("/")
        else:
            run, other = os.path.realpath(self.path), os.path.realpath(path)
        return other == run or other.startswith(run.rstrip("/") + "/")


@dataclass(frozen=True)
class SearchDir:
    """The paths of a search's folder (a run's ``tune/``): campar's record of the trials,
    the settings a resume must repeat, the summary, the table and plots, each trial's folder."""

    path: str

    def _join(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    @property
    def record(self) -> str:
        return self._join(TRIAL_RECORD_FILE)

    @property
    def settings(self) -> str:
        return self._join(SEARCH_SETTINGS_FILE)

    @property
    def summary(self) -> str:
        return self._join(SEARCH_SUMMARY_FILE)

    def table(self, suffix: str) -> str:
        """The trials table as ``parquet`` or ``csv``."""
        return self._join(f"{TRIALS_TABLE}.{suffix}")

    def plot(self, name: str) -> str:
        """A figure of the search (``history``, ``importances``) as PNG."""
        return self._join(f"{name}.png")

    @property
    def trials(self) -> str:
        """The folder of the trials' run directories."""
        return self._join(TRIALS_DIR)
