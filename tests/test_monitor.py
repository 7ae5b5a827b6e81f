"""What the driver shows of a quiet stage-1 run: the epoch lines and the bar inside an epoch.

The printer is fed the posts a run makes (rank 0's progress, the controller's epoch reports)
and writes to a buffer standing in for the terminal; the poster runs against a real mailbox
actor on the session's Ray cluster.
"""

from __future__ import annotations

import io
import uuid

import pytest
import ray

from campar_ray.config import DataConfig
from campar_ray.train.monitor import ROWS_KEY, EpochPrinter, StepPoster, _Mailbox


def _epoch(epoch: int) -> dict[str, float]:
    """A finished epoch's report as rank 0 sends it (the keys the epoch line reads)."""
    return {
        "epoch": epoch,
        "step": 10 * epoch,
        "train_loss": 0.5,
        "images_per_s": 100.0,
        "data_wait_fraction": 0.0,
        "skipped_images": 0,
        "val_mA": 0.7,
        "val_f1": 0.6,
        "epoch_seconds": 3.0,
    }


def _progress(epoch: int, rows: int) -> dict[str, int]:
    return {"epoch": epoch, ROWS_KEY: rows, "epoch_rows": 200}


def test_a_terminal_sees_a_bar_inside_each_epoch_cleared_before_its_line():
    terminal = io.StringIO()
    printer = EpochPrinter(2, DataConfig(), terminal, bar=True)
    for post in (_progress(1, 50), _progress(1, 150), _epoch(1), _progress(2, 100), _epoch(2)):
        printer.show(post)
    printer.close()
    shown = terminal.getvalue()
    assert "[stage1] epoch 1/2:" in shown and "150/200" in shown
    assert "[stage1] epoch 2/2:" in shown and "100/200" in shown
    lines = [line for line in shown.replace("\r", "\n").splitlines() if "val mA" in line]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"]
    # The bar of epoch 1 is drawn before epoch 1's line, epoch 2's after it.
    assert shown.index("150/200") < shown.index(lines[0]) < shown.index("100/200")


def test_a_pipe_gets_only_the_epoch_lines():
    piped = io.StringIO()
    printer = EpochPrinter(2, DataConfig(), piped, bar=False)
    for post in (_progress(1, 50), _epoch(1), _progress(2, 100), _epoch(2)):
        printer.show(post)
    printer.close()
    lines = piped.getvalue().splitlines()
    assert len(lines) == 2 and all("val mA" in line for line in lines)


@pytest.mark.ray
def test_rank_zero_posts_the_groups_rows_to_the_mailbox(ray_cluster):
    name = f"test-mailbox-{uuid.uuid4().hex[:8]}"
    box = ray.remote(num_cpus=0)(_Mailbox).options(name=name).remote()
    try:
        poster = StepPoster(name, world=2, epoch_rows=100, every=0.0)
        batches = [{"image": [0] * 10, "labels": [0] * 10} for _ in range(4)]
        assert list(poster.count(batches, epoch=3, done=10)) == batches
        posts = ray.get(box.take.remote())
    finally:
        ray.kill(box)
    # A resumed epoch: 10 rows before; each batch of 10 rows on rank 0 is 20 for the group.
    assert [post[ROWS_KEY] for post in posts] == [30, 50, 70, 90]
    assert {post["epoch"] for post in posts} == {3}


def test_without_a_mailbox_batches_pass_through_unposted():
    batches = [{"image": [0] * 4}]
    assert list(StepPoster(None, world=1, epoch_rows=4).count(batches, 1, 0)) == batches
