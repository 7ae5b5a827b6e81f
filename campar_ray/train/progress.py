"""What a stage-1 report says about progress: the mid-epoch marker and the epoch line.

The worker writes both (its reports, its log line) and the driver's epoch monitor and a
full-pipeline search trial read them back, so they live here, below all three, instead of in
one of them (the worker and the monitor used to import each other for them).
"""

from __future__ import annotations

import datetime

import numpy as np

PROGRESS_KEY = "epoch_progress"
"""Marks a mid-epoch report: the fraction of the epoch's rows trained so far."""


def progress_line(metrics: dict[str, float], history: list[dict[str, float]], epochs: int) -> str:
    """``epoch 3/30 step 450 loss 0.213 412 img/s data-wait 8% val mA 71.20 ETA 0:41:10``."""
    this_run = [m["epoch_seconds"] for m in history[-3:]]
    eta = (epochs - metrics["epoch"]) * float(np.mean(this_run))
    return (
        f"[stage1] epoch {metrics['epoch']}/{epochs} step {metrics['step']} "
        f"loss {metrics['train_loss']:.4f} {metrics['images_per_s']:.0f} img/s "
        f"data-wait {metrics['data_wait_fraction']:.0%} skipped {metrics['skipped_images']} "
        f"val mA {100 * metrics['val_mA']:.2f} F1 {100 * metrics['val_f1']:.2f} "
        f"ETA {datetime.timedelta(seconds=round(eta))}"
    )
