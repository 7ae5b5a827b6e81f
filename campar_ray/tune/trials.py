"""What a search trial shares, what it reserves, and the scope-``cfar`` trial itself.

A scope-``cfar`` trial fits stage 2 on the shared stage-1 logits of the search's run
directory and reports once; the scope-``full`` trial is :class:`.full_trial.FullTrial`.
Every trial writes under ``<run_dir>/tune/trials/<trial_id>/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray.tune
import yaml

from campar_ray import storage
from campar_ray.cfar.fit import CFAR_DIR
from campar_ray.config import Config
from campar_ray.tune.space import SearchSpace
from campar_ray.tune.stage2 import fit_cfar_on_val

ALS_ACTOR_CPUS = 0.5
"""CPUs each ALS actor reserves (``campar_ray.cfar.ray_als.fit_ray``'s default)."""
TRIAL_CPUS = 1.0
"""The trial process itself: stage 2's k-means, fc2 and (``solver=local``) ALS run in it."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (sent once through the object store)."""

    base: Config
    space: SearchSpace
    run_dir: str
    """The search's run directory: its ``logits/`` feed scope ``cfar``."""
    trials_dir: str


def cfar_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Scope ``cfar``: refit stage 2 on the shared logits, report its validation metrics."""
    config = context.space.apply(context.base, params)
    folder = storage.join(context.trials_dir, ray.tune.get_context().get_trial_id())
    _save_config(config, folder)
    metrics = fit_cfar_on_val(
        context.run_dir, storage.join(folder, CFAR_DIR), config.cfar, config.seed
    )
    ray.tune.report({**metrics, "complete": True, "trial_dir": folder})


def trial_bundles(config: Config) -> list[dict[str, float]]:
    """The trial's own placement group: its process, plus ALS actors when stage 2 uses Ray.

    Tune makes a trial's tasks and actors inherit its placement group, so the ALS actors a
    trial starts need bundles of their own there. Stage-1 workers do not: Ray Train gives
    them a placement group of their own (counted by :func:`trial_footprint`).
    """
    actors = config.cfar.actors if config.cfar.solver == "ray" else 0
    return [{"CPU": TRIAL_CPUS}] + [{"CPU": ALS_ACTOR_CPUS}] * actors


def trial_footprint(config: Config, scope: str) -> dict[str, float]:
    """Everything one running trial holds in the cluster, to bound how many run at once."""
    cpus = sum(bundle["CPU"] for bundle in trial_bundles(config))
    gpus = 0.0
    if scope == "full":
        cfg = config.train
        cpus += cfg.num_workers * cfg.cpus_per_worker
        cpus += config.data.decode_concurrency * config.data.decode_cpus
        gpus = float(cfg.num_workers) if cfg.use_gpu else 0.0
    return {"CPU": cpus, "GPU": gpus}


def max_concurrent_trials(available: dict[str, float], footprint: dict[str, float]) -> int:
    """How many trials of ``footprint`` fit in ``available`` resources (at least one)."""
    fits = [available.get(name, 0.0) // need for name, need in footprint.items() if need > 0]
    return max(1, int(min(fits)))


def _save_config(config: Config, folder: str) -> None:
    storage.write_bytes(
        storage.join(folder, "config.yaml"),
        yaml.safe_dump(config.to_dict(), sort_keys=False).encode(),
    )
