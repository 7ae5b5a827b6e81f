"""Elastic stage 1 on a real multi-node Ray cluster: a node dies, training shrinks; one
comes back, training grows.

Head plus two worker nodes (``multinode.py``, token authentication on). The README's job
command trains with ``train.num_workers=1..2`` and one training worker per node (each node
holds 3 CPUs, a worker takes 2: the third is left to Ray Data decoding), with time-based
checkpoints at every check (every 8 batches). Once Ray Train has registered a mid-epoch
checkpoint after epoch 1, one node is killed like a machine that dies: the surviving worker
cannot report again, so that checkpoint is the one the run must resume from, finishing the
interrupted epoch with one worker. Once an epoch finishes with one worker, a new node joins,
and a later epoch must run on two workers again.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml
from multinode import LocalCluster, wait_for

from campar_ray.data import generate_synthetic, read_manifest

ROOT = Path(__file__).resolve().parents[1]
# Enough epochs to outlast kill -> shrink -> join -> grow with room to spare, few enough that
# the run ends soon after: in a loaded 2-core run the node died in epoch 2, epochs 2-4 ran on one
# worker and epoch 5 on two again (world sizes [2, 1, 1, 1, 2, ...]); with the node found dead
# within seconds (multinode.py) epoch 3 already ran on two. Each epoch more costs about 6 s.
EPOCHS = 10
BATCH = 4  # 18 batches per worker and epoch: two mid-epoch checkpoints each
LR = 1e-3
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster.running({"node_a": 3, "node_b": 3}) as cluster:
        yield cluster


def _job_files(folder: Path) -> tuple[Path, Path, int]:
    """The run's config, a runtime env and the number of training rows of its data."""
    manifest = generate_synthetic(str(folder / "data"), n=240, size=(32, 16))
    splits = read_manifest(manifest)[0].column("split").to_pylist()
    config = {
        # A small network keeps the many checkpoints of this run small (a few MB each).
        "model": {"backbone": "timm:mobilenetv3_small_050", "fusion": False},
        "data": {"manifest": manifest, "image_size": [32, 16]},
        "train": {
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "lr": LR,
            "num_workers": "1..2",
            "cpus_per_worker": 2,
            "resize_check_seconds": 5,
            "checkpoint_every_minutes": 0.001,  # at every check
            "keep_checkpoints": 1,
            "max_failures": 3,
        },
    }
    config_path = folder / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    # A restart right after the node died may first wait for a group that no longer fits.
    runtime_env["env_vars"] = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    env_path = folder / "runtime_env.yaml"
    env_path.write_text(yaml.safe_dump(runtime_env))
    return config_path, env_path, splits.count("train")


def _history(run_dir: Path) -> list[dict]:
    """The history of the latest end-of-epoch checkpoint ([] before epoch 1's)."""
    latest: list[dict] = []
    for path in (run_dir / "ray" / "stage1").glob("checkpoint_*/meta.json"):
        try:
            meta = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # being written or deleted
            continue
        if "partial" not in meta and len(meta["history"]) > len(latest):
            latest = meta["history"]
    return latest


def _registered(run_dir: Path) -> dict | None:
    """The metrics of the latest checkpoint Ray Train registered (None before the first)."""
    try:
        snapshot = (run_dir / "ray" / "stage1" / "checkpoint_manager_snapshot.json").read_text()
        return (json.loads(snapshot).get("latest_checkpoint_result") or {}).get("metrics")
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being written
        return None


def _mid_epoch_after_epoch_1(run_dir: Path) -> dict | None:
    latest = _registered(run_dir)
    return latest if latest and "epoch_progress" in latest and latest["epoch"] >= 2 else None


def test_training_shrinks_when_a_node_dies_and_grows_when_one_joins(
    cluster, tmp_path, record_property
):
    run_dir = tmp_path / "run"
    config, runtime_env, train_rows = _job_files(tmp_path)
    log_path = tmp_path / "job.log"
    entrypoint = ["python", "jobs/train.py", "--config", str(config), "--set", f"run.dir={run_dir}"]
    with cluster.job(entrypoint, str(runtime_env), log_path) as job:
        resumed = wait_for(
            lambda: _mid_epoch_after_epoch_1(run_dir),
            timeout=600,
            interval=0.05,
            what="a mid-epoch checkpoint after epoch 1",
        )
        cluster.kill_node("node_b")
        killed = time.monotonic()
        shrunk = wait_for(
            lambda: any(m["world_size"] == 1 for m in _history(run_dir)),
            timeout=600,
            interval=0.5,
            what="an epoch on one worker",
        )
        record_property("seconds_to_shrink", round(time.monotonic() - killed, 1))
        cluster.add_node("node_c", cpus=3)
        joined = time.monotonic()
        job.wait(timeout=900)
    output = log_path.read_text()
    assert shrunk and job.returncode == 0 and "succeeded" in output, output[-3000:]

    history = _history(run_dir)
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1))  # each epoch once
    sizes = [m["world_size"] for m in history]
    assert sizes[0] == 2 and 1 in sizes, sizes
    assert sizes[-1] == 2 and 2 in sizes[sizes.index(1) :], f"never grew back: {sizes}"
    # The interrupted epoch was finished by one worker from its mid-epoch checkpoint: fewer
    # steps than a whole epoch on one worker (which takes a step per batch of the split).
    interrupted = history[resumed["epoch"] - 1]
    steps = interrupted["step"] - history[resumed["epoch"] - 2]["step"]
    assert interrupted["world_size"] == 1 and steps < train_rows / BATCH, (resumed, interrupted)
    record_property("world_sizes", sizes)
    record_property("seconds_from_join_to_end", round(time.monotonic() - joined, 1))
    for metrics in history:
        # An epoch resumed mid-way trains the rows it had left: a whole epoch's worth.
        rows = metrics["train_images"] + metrics["train_skipped_images"]
        assert train_rows - BATCH * 2 <= rows <= train_rows + BATCH * 2, metrics
        # train.lr is the rate of two workers; one worker trains at 1/sqrt(2) of it, on the
        # same plateau schedule (LR x 10^-k).
        unscaled = metrics["lr"] * math.sqrt(2 / metrics["world_size"])
        cuts = math.log10(LR / unscaled)
        assert cuts == pytest.approx(round(cuts), abs=1e-6), metrics
