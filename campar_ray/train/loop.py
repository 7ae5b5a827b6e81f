"""Stage-1 optimisation in plain PyTorch: the part of training that knows nothing of Ray.

``train_one_epoch`` and ``evaluate`` take any iterable of batches (a Ray Data shard in the
Ray Train worker, a list of dicts in the unit tests), any ``nn.Module`` and the loss and
logits functions as callables, in the shape of torchvision's reference ``train.py``.

A batch is a mapping with ``image`` (uint8 ``N x H x W x 3``), ``labels`` (``N x M``) and
``valid`` (``N`` bools: False where the image could not be decoded). Rows that are not valid
are dropped here and counted, so a corrupt image costs one row of one batch, never the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from campar_ray.config import CHOICES
from campar_ray.decision import probabilities
from campar_ray.metrics import mean_auc, par_metrics, summary
from campar_ray.model.inputs import normalize
from campar_ray.model.scoring import autocast

Batch = Mapping[str, torch.Tensor]
SCHEDULERS = CHOICES["train.scheduler"]


@dataclass(frozen=True)
class EpochStats:
    """What one worker saw during one training epoch."""

    loss_sum: float
    """Sum over images of the per-image loss (batch mean x batch size)."""
    images: int
    steps: int
    seconds: float
    data_seconds: float
    """Time spent waiting for the next batch."""
    skipped: int
    """Rows dropped because their image could not be decoded."""
    batches: int = 0
    """Batches taken from the input, those left empty by undecodable images included."""

    @property
    def rows(self) -> int:
        """Rows consumed: trained images plus undecodable ones."""
        return self.images + self.skipped

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def data_wait_fraction(self) -> float:
        return self.data_seconds / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class Predictions:
    """Labels, prediction logits and probabilities of every valid image one worker evaluated."""

    labels: np.ndarray
    probs: np.ndarray
    skipped: int
    logits: np.ndarray | None = None
    """The logits whose sigmoid ``probs`` is (kept as each epoch's evidence)."""
    loss_sum: float | None = None
    """The training loss summed over the images (given a ``loss_fn``): the validation loss
    that goes beside the training loss."""


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with L2 weight decay, the reference recipe's optimiser."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """``plateau``: cut the rate by 10x when validation mA stalls; ``cosine``: anneal to 0."""
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=4)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")


def step_scheduler(
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau,
    val_ma: float,
) -> None:
    """Advance one epoch; the plateau scheduler watches validation mA."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_ma)
    else:
        scheduler.step()


def make_grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A loss scaler that is active only for fp16 autocast (GPU); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")


def prepare_batch(
    batch: Batch, device: torch.device, channels_last: bool = False, model: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop undecodable rows, normalise the images (with ``model``'s encoder's mean and std,
    ImageNet's without a model): ``(x, float targets, rows skipped)``.

    Rows are only gathered when some are invalid: a boolean index copies the whole batch even
    when it keeps every row, which is nearly always.
    """
    valid = batch["valid"].to(torch.bool)
    skipped = int(valid.numel() - valid.sum())
    images, labels = batch["image"], batch["labels"]
    if skipped:
        images, labels = images[valid.to(images.device)], labels[valid.to(labels.device)]
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    encoder = getattr(getattr(model, "module", model), "backbone", None)  # DDP wraps the model
    statistics = {"mean": encoder.mean, "std": encoder.std} if encoder is not None else {}
    return normalize(images, channels_last=channels_last, **statistics), labels.float(), skipped


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor],
    *,
    device: torch.device,
    grad_clip: float = 0.0,
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
) -> EpochStats:
    """One pass over ``batches``: forward, ``loss_fn(output, targets)``, backward, clip, step.

    A batch left empty by undecodable images is skipped. Under DDP that leaves this rank one
    step short of the others, which ``DistributedDataParallel.join`` absorbs (the uneven-
    inputs protocol) instead of hanging in the gradient all-reduce.
    """
    model.train()
    scaler = scaler or make_grad_scaler(device, amp=False)
    loss_sum, images, steps, skipped, taken, data_seconds = 0.0, 0, 0, 0, 0, 0.0
    join = model.join() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    start = time.perf_counter()
    with join:
        iterator = iter(batches)
        while True:
            fetch_start = time.perf_counter()
            batch = next(iterator, None)
            data_seconds += time.perf_counter() - fetch_start
            if batch is None:
                break
            taken += 1
            x, y, dropped = prepare_batch(batch, device, channels_last, model)
            skipped += dropped
            if len(x) == 0:
                continue
            with autocast(device, amp):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise _diverged(value, steps + 1, optimizer, autocast=amp)
            loss_sum += value * len(x)
            images += len(x)
            steps += 1
    return EpochStats(
        loss_sum=loss_sum,
        images=images,
        steps=steps,
        seconds=time.perf_counter() - start,
        data_seconds=data_seconds,
        skipped=skipped,
        batches=taken,
    )


def _diverged(
    value: float, step: int, optimizer: torch.optim.Optimizer, *, autocast: bool
) -> FloatingPointError:
    """The error of a loss that stopped being finite, naming the setting to change.

    Labels are 0/1 (the manifest is checked when read) and inputs are normalised bytes, so a
    non-finite loss means the weights blew up (the learning rate is too high for this model
    and data) or autocast failed: fp16 overflowing on a GPU, or oneDNN's bf16 kernels for
    AMX CPUs, which gave NaN for a finite fp32 network in ``tests/test_model.py`` (torch
    2.14.1, Sapphire Rapids-class Xeon). A restart from the last checkpoint would train with
    the same settings and fail again, so the worker does not retry it.
    """
    rate = optimizer.param_groups[0]["lr"]
    change = "lower train.lr" + (" or set train.amp=false" if autocast else "")
    return FloatingPointError(
        f"training loss became {value} at step {step} with learning rate {rate:g}: training "
        f"diverged; {change}"
    )


def add_stats(first: EpochStats, second: EpochStats) -> EpochStats:
    """Two consecutive parts of one epoch on the same worker(s) as one."""
    return EpochStats(
        *(
            a + b
            for a, b in zip(dataclasses.astuple(first), dataclasses.astuple(second), strict=True)
        )
    )


def reduce_stats(ranks: list[EpochStats]) -> EpochStats:
    """Every rank's share of the same stretch of training as the group's.

    Images, losses and skips add up; steps and wall time are the slowest rank's (ranks step
    together); waiting for data is the average rank's.
    """
    return EpochStats(
        loss_sum=sum(s.loss_sum for s in ranks),
        images=sum(s.images for s in ranks),
        steps=max(s.steps for s in ranks),
        seconds=max(s.seconds for s in ranks),
        data_seconds=float(np.mean([s.data_seconds for s in ranks])),
        skipped=sum(s.skipped for s in ranks),
        batches=max(s.batches for s in ranks),
    )


def batches_left(epoch_rows: int, rows_done: int, world_size: int, batch_size: int) -> int:
    """Batches each of ``world_size`` workers takes to finish an epoch ``rows_done`` into it.

    Rounded up, so a resumed epoch trains at least the rows that were left.
    """
    return math.ceil(max(epoch_rows - rows_done, 0) / (world_size * batch_size))


def lr_scale(world_size: int, full_size: int) -> float:
    """Learning-rate factor for ``world_size`` workers when ``train.lr`` is set for ``full_size``.

    The global batch is ``world_size x train.batch_size``. For Adam the square-root rule keeps
    training on the same course when the batch changes (Malladi et al., "On the SDEs and
    Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022); the linear rule of Goyal et
    al. (2017) is SGD's.
    """
    return math.sqrt(world_size / full_size)


def rescale_lr(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau,
    factor: float,
) -> None:
    """Multiply the current and base learning rates by ``factor``, mid-schedule.

    Both schedulers are linear in the rates they keep (cosine anneals to 0, plateau cuts by a
    factor), so the schedule continues where it was, scaled.
    """
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    logits_fn: Callable[[object], torch.Tensor],
    *,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor] | None = None,
) -> Predictions:
    """Sigmoid of ``logits_fn(model(x))`` for every valid image, with its labels, and the
    summed ``loss_fn(model(x), labels)`` when given (training's loss, on these images).

    Pass the unwrapped module under DDP: evaluation shards may differ in length across
    ranks, and a plain module issues no collective that could wait for a finished rank.
    """
    model.eval()
    labels, probs, raw, skipped = [], [], [], 0
    loss_sum = None if loss_fn is None else 0.0
    for batch in batches:
        x, y, dropped = prepare_batch(batch, device, channels_last, model)
        skipped += dropped
        if len(x) == 0:
            continue
        with autocast(device, amp):
            output = model(x)
            logits = logits_fn(output)
            if loss_fn is not None:
                loss_sum += float(loss_fn(output, y)) * len(y)
        raw.append(logits.float().cpu().numpy())
        probs.append(probabilities(raw[-1]))
        labels.append(y.cpu().numpy().astype(np.int8))
    if not probs:
        empty = np.zeros((0, 0), np.float32)
        return Predictions(np.zeros((0, 0), np.int8), empty, skipped, empty, loss_sum)
    return Predictions(
        np.concatenate(labels), np.concatenate(probs), skipped, np.concatenate(raw), loss_sum
    )


def merge_predictions(parts: Iterable[Predictions]) -> Predictions:
    """One ``Predictions`` from every worker's share (shares without images are skipped)."""
    parts = list(parts)
    filled = [part for part in parts if len(part.probs)]
    if not filled:
        raise ValueError("no decodable validation image on any worker; cannot compute metrics")
    return Predictions(
        labels=np.concatenate([part.labels for part in filled]),
        probs=np.concatenate([part.probs for part in filled]),
        skipped=sum(part.skipped for part in parts),
        logits=None
        if any(part.logits is None for part in filled)
        else np.concatenate([part.logits for part in filled]),
        loss_sum=None
        if any(part.loss_sum is None for part in parts)
        else sum(part.loss_sum for part in parts),
    )


def validation_metrics(
    labels: np.ndarray, probs: np.ndarray, eval_indices: np.ndarray | list[int]
) -> dict[str, float]:
    """``val_mA``, ``val_accuracy``, ... on the evaluated attributes at threshold 0.5, and
    ``val_auc`` (their mean AUC, threshold-free)."""
    columns = np.asarray(eval_indices)
    metrics = summary(par_metrics(labels[:, columns], probs[:, columns]))
    metrics["auc"] = mean_auc(labels[:, columns], probs[:, columns])
    return {f"val_{key}": value for key, value in metrics.items()}
