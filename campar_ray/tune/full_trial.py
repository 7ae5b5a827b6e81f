"""The scope-``full`` trial: Train inside Tune, one Tune step per stage-1 epoch, then stage 2.

Each trial trains stage 1 as its own Ray Train run (``train_stage1`` builds the
``TorchTrainer``, its storage in the trial's folder, which is a complete run directory), in a
background thread of the trial. Two small Train callbacks relay the run's controller and
each epoch's validation metrics back through a queue; :meth:`FullTrial.step` hands one epoch
to Tune per call, so ASHA ranks and stops trials by epoch. The last step fits stage 2 on the
trial's logits (validation data only) and reports the two-stage result (``complete``).

A reported ``val_<metric>`` is stage 1's after each epoch (at threshold 0.5), then stage 1 +
CFAR's (at its validation-chosen threshold). A trial ASHA stops keeps its last stage-1
value, a lower bound on what CFAR would add: fc2 starts as stage 1 and is selected on
validation data.

Why a class trainable rather than a function with ``TuneReportCallback``: stopping. When
ASHA stops a trial, Tune ends the trial's process, and the Train controller and workers die
with it, but their placement group does not (placement groups live as long as the job).
Ray Train starts a cleaner for that case, which finds the dead controller through the
dashboard's state API; without a dashboard (local clusters here), or with several Ray
instances on one machine, it never fires, and every stopped trial would keep its workers'
CPUs reserved until the search ends. :meth:`FullTrial.cleanup` runs before Tune ends the
process and aborts the run through its controller, which shuts the workers down and frees the
group the way Ray Train does on Ctrl+C.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import ray
import ray.tune
from ray.train import UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.util.queue import Queue

from campar_ray import storage
from campar_ray.config import Config
from campar_ray.run.layout import RunDir
from campar_ray.train.progress import PROGRESS_KEY
from campar_ray.train.stage1 import train_stage1
from campar_ray.tune.stage2 import fit_cfar_on_val
from campar_ray.tune.trials import TrialContext, finish_trial_tracking, open_trial_tracker


class FullTrial(ray.tune.Trainable):
    """Stage 1 (one step per epoch), then stage 2 (the last step) for one sampled config."""

    def setup(self, config: dict[str, Any], context: TrialContext) -> None:
        self._events = Queue(actor_options={"num_cpus": 0})
        self._controller: ray.actor.ActorHandle | None = None
        folder = storage.join(context.trials_dir, self.trial_id)
        run_config = context.space.apply(context.base, config).override(
            {"run.dir": folder, "tracking.experiment": context.experiment}
        )
        self._thread = threading.Thread(
            target=self._pipeline,
            args=(run_config, folder, context, config),
            name="campar-trial",
            daemon=True,
        )
        self._thread.start()

    def step(self) -> dict[str, Any]:
        """The next epoch's metrics, or the two-stage result (``done``), or the error."""
        while True:
            kind, payload = self._events.get()
            if kind == "controller":
                self._controller = payload
            elif kind == "epoch":
                return payload
            elif kind == "error":
                raise payload
            else:
                return {**payload, "done": True}

    def cleanup(self) -> None:
        """Stopped before the end (ASHA): abort the Train run so it frees its workers' group."""
        if self._controller is not None and self._thread.is_alive():
            # abort() ends the controller process, so the call itself fails once it has worked.
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(self._controller.abort.remote())

    def _pipeline(
        self, config: Config, folder: str, context: TrialContext, params: dict[str, Any]
    ) -> None:
        try:
            relays = [_ControllerRelay(self._events), _EpochRelay(self._events)]
            # Stage 1 tracks its epochs (rank 0) in the MLflow run keyed by this folder.
            stage1 = train_stage1(config, progress=False, callbacks=relays)
            metrics = fit_cfar_on_val(folder, RunDir(folder).cfar, config.cfar, config.seed)
            tracker = open_trial_tracker(context, folder, self.trial_id)
            finish_trial_tracking(tracker, params, metrics)
            final = {
                **metrics,
                "epoch": stage1.history[-1]["epoch"],
                "stage1_best_epoch": stage1.metrics["epoch"],
                "complete": True,
                "trial_dir": folder,
            }
            self._events.put(("final", final))
        except Exception as error:  # handed to Tune by step(), which raises it in the trial
            self._events.put(("error", error))


class _ControllerRelay(ControllerCallback):
    """Runs in the Train controller: sends the trial a handle to it, to abort the run."""

    def __init__(self, events: Queue) -> None:
        self._events = events

    def after_controller_start(self, train_run_context: Any) -> None:
        self._events.put(("controller", ray.get_runtime_context().current_actor))


class _EpochRelay(UserCallback):
    """Runs in the Train controller: forwards each epoch's metrics (all ranks report the same).

    Mid-epoch checkpoints (``train.checkpoint_every_minutes``) are reports too; they are no
    epoch for ASHA and stay behind.
    """

    def __init__(self, events: Queue) -> None:
        self._events = events

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if PROGRESS_KEY not in metrics[0]:
            self._events.put(("epoch", dict(metrics[0])))
