"""What a search trial shares, what it reserves, and the scope-``cfar`` trial itself.

A scope-``cfar`` trial fits stage 2 on the shared stage-1 logits of the search's run
directory and reports once; the scope-``full`` trial is :class:`.full_trial.FullTrial`.
Every trial writes under ``<run_dir>/tune/trials/<trial_id>/`` and is tracked from inside
the trial (Train V2 refuses Tune's logger callbacks): one MLflow run per trial in the
search's experiment, keyed by the trial's folder so that a resumed search continues it, and
TensorBoard files in ``<trial folder>/tensorboard/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray.tune
import yaml

from campar_ray import storage
from campar_ray.cfar.ray_als import ACTOR_CPUS
from campar_ray.config import Config
from campar_ray.data.concurrency import least_decode_tasks
from campar_ray.run.layout import RunDir
from campar_ray.tracking import RUN_DIR_TAG, Tracker, markdown_table, open_tracker, run_key
from campar_ray.tune.space import SearchSpace
from campar_ray.tune.stage2 import fit_cfar_on_val

TRIAL_CPUS = 1.0
"""The trial process itself: stage 2's k-means, fc2 and (``solver=local`` or ``auto``) ALS run
in it."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (sent once through the object store)."""

    base: Config
    space: SearchSpace
    run_dir: str
    """The search's run directory: its ``logits/`` feed scope ``cfar``."""
    trials_dir: str
    experiment: str
    """The MLflow experiment of the search's trials."""


def cfar_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Scope ``cfar``: refit stage 2 on the shared logits, report its validation metrics."""
    config = context.space.apply(context.base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    folder = storage.join(context.trials_dir, trial_id)
    _save_config(config, folder)
    tracker = open_trial_tracker(context, folder, trial_id)
    tracker.log_config(config.to_dict())
    metrics = fit_cfar_on_val(context.run_dir, RunDir(folder).cfar, config.cfar, config.seed)
    finish_trial_tracking(tracker, params, metrics)
    ray.tune.report({**metrics, "complete": True, "trial_dir": folder})


def open_trial_tracker(context: TrialContext, folder: str, trial_id: str) -> Tracker:
    """The trial's tracker; a scope-``full`` trial's stage-1 run logs to the same MLflow run."""
    return open_tracker(
        context.base.tracking,
        log_dir=RunDir(folder).tensorboard("trial"),
        experiment=context.experiment,
        run_name=trial_id,
        key=run_key(folder),
        tags={RUN_DIR_TAG: folder, "campar.stage": "trial"},
    )


def finish_trial_tracking(
    tracker: Tracker, params: dict[str, Any], metrics: dict[str, Any]
) -> None:
    """The trial's two-stage validation result and a report of what it sampled."""
    tracker.log_final(metrics, prefix="trial")
    sampled = "\n".join(f"- {key}: {value}" for key, value in params.items())
    scores = {
        "stage 1": {m: metrics[f"stage1_val_{m}"] for m in ("mA", "f1")},
        "stage 1 + CFAR": {m: metrics[f"val_{m}"] for m in ("mA", "f1")},
    }
    tracker.log_report(f"**Trial** (validation)\n\n{sampled}\n\n{markdown_table(scores)}\n")
    tracker.close()


def trial_bundles(config: Config) -> list[dict[str, float]]:
    """The trial's own placement group: its process, plus ALS actors when stage 2 uses Ray.

    Tune makes a trial's tasks and actors inherit its placement group, so the ALS actors a
    trial starts need bundles of their own there. Stage-1 workers do not: Ray Train gives
    them a placement group of their own (counted by :func:`trial_footprint`).
    """
    actors = config.cfar.actors if config.cfar.solver == "ray" else 0
    return [{"CPU": TRIAL_CPUS}] + [{"CPU": ACTOR_CPUS}] * actors


def trial_footprint(config: Config, scope: str) -> dict[str, float]:
    """Everything one running trial holds in the cluster, to bound how many run at once."""
    cpus = sum(bundle["CPU"] for bundle in trial_bundles(config))
    gpus = 0.0
    if scope == "full":
        cfg = config.train
        cpus += cfg.max_workers * cfg.cpus_per_worker
        # Automatic decoding takes what its trial's workers leave: counted by its first task.
        cpus += least_decode_tasks(config.data) * config.data.decode_cpus
        gpus = float(cfg.max_workers) if cfg.use_gpu else 0.0
    return {"CPU": cpus, "GPU": gpus}


def max_concurrent_trials(available: dict[str, float], footprint: dict[str, float]) -> int:
    """How many trials of ``footprint`` fit in ``available`` resources (at least one)."""
    fits = [available.get(name, 0.0) // need for name, need in footprint.items() if need > 0]
    return max(1, int(min(fits)))


def _save_config(config: Config, folder: str) -> None:
    storage.write_bytes(
        RunDir(folder).config_file,
        yaml.safe_dump(config.to_dict(), sort_keys=False).encode(),
    )
