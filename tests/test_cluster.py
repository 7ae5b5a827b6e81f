"""The README's "Scaling out" path on a real multi-node Ray cluster, with a node killed mid-run.

Head plus three worker nodes, each its own raylet started by `ray start` with token
authentication (see ``multinode.py``). The job is submitted with the README's command
(`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python
jobs/pipeline.py ...`); only the address, config and run directory differ. The job
generates its synthetic data (`--prepare synthetic`), trains stage 1 with two workers, fits
CFAR on Ray actors and writes the test report. As soon as epoch 1's checkpoint lands, the
worker node hosting a training worker is killed like a machine that dies: its raylet and
every process under it get SIGKILL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from multinode import LocalCluster, wait_for

from campar_ray.runtime import InsecureClusterError, require_authentication

EPOCHS = 4
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    # 2 CPUs a node: after losing one, the survivors still hold both training workers *and*
    # leave CPUs for Ray Data decoding (none left = a silent hang).
    with LocalCluster.running({"node_a": 2, "node_b": 2, "node_c": 2}) as cluster:
        yield cluster


def _job_config(folder: Path) -> Path:
    config = {
        "model": {"backbone": "resnet18", "fusion": False},
        "data": {"manifest": str(folder / "data" / "manifest.parquet"), "image_size": [32, 16]},
        "train": {"epochs": EPOCHS, "batch_size": 16, "num_workers": 2, "max_failures": 2},
        "cfar": {"actors": 2, "keys": 4, "factors": 4, "fc2_epochs": 50},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _checkpoint_epochs(run_dir: Path) -> list[int]:
    metas = (run_dir / "ray" / "stage1").glob("checkpoint_*/meta.json")
    return sorted(json.loads(meta.read_text())["epoch"] for meta in metas)


def test_pipeline_job_finishes_after_losing_a_worker_node(cluster, tmp_path, record_property):
    run_dir = tmp_path / "run"
    config = _job_config(tmp_path)
    log_path = tmp_path / "job.log"
    entrypoint = ["python", "jobs/pipeline.py", "--config", str(config)]
    entrypoint += ["--set", f"run.dir={run_dir}", "--prepare", "synthetic"]
    entrypoint += ["--root", str(tmp_path / "data"), "--prepare-args", "--n 240 --size 32x16"]
    with cluster.job(entrypoint, "cluster/runtime_env.yaml", log_path) as job:
        workers = wait_for(
            lambda: len(found := cluster.actors("RayTrainWorker")) == 2 and found,
            timeout=600,
            interval=1,
            what="two training workers",
        )
        snapshot = run_dir / "ray" / "stage1" / "checkpoint_manager_snapshot.json"
        wait_for(snapshot.exists, timeout=600, interval=0.1, what="epoch 1's checkpoint")
        saved = time.monotonic()
        epochs_saved = _checkpoint_epochs(run_dir)
        victim = cluster.node_of(workers[0]["pid"])
        cluster.kill_node(victim)
        killed = time.monotonic()
        job.wait(timeout=900)
    output = log_path.read_text()
    assert job.returncode == 0 and "succeeded" in output, output[-3000:]

    # Training went on without the dead node, from the last checkpoint, to the last epoch.
    assert epochs_saved and epochs_saved[-1] < EPOCHS, "the node died after training ended"
    history = json.loads(
        max((run_dir / "ray" / "stage1").glob("checkpoint_*/meta.json"), key=_epoch).read_text()
    )["history"]
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1))
    everyone = cluster.actors("RayTrainWorker", alive_only=False)
    replaced = [a for a in everyone if a["pid"] not in {w["pid"] for w in workers}]
    assert len(replaced) >= 2, "no new worker group was started after the node died"
    # Work redone: only the epoch that was running when the node died (at most one epoch).
    record_property("epochs_done_before_kill", epochs_saved[-1])
    record_property("seconds_of_lost_work", round(killed - saved, 2))

    # Every artefact of the pipeline is in the storage path.
    for artefact in (
        "config.yaml",
        "logits/train.parquet",
        "logits/val.parquet",
        "logits/test.parquet",
        "cfar/cfar.json",
        "cfar/factors.npz",
        "report/test/metrics.json",
        "report/test/report.html",
    ):
        assert (run_dir / artefact).is_file(), artefact
    metrics = json.loads((run_dir / "report" / "test" / "metrics.json").read_text())
    assert metrics["cfar"] and 0 < metrics["sources"][metrics["final"]]["mA"] <= 1


def _epoch(meta: Path) -> int:
    return json.loads(meta.read_text())["epoch"]


def test_a_token_cluster_is_accepted_and_an_open_one_refused(cluster):
    require_authentication(cluster.gcs_address)  # demands a token: fine
    open_cluster = LocalCluster(auth=False)
    try:
        open_cluster.start_head(cpus=1)
        with pytest.raises(InsecureClusterError, match="accepts clients without a token"):
            require_authentication(open_cluster.gcs_address)
        require_authentication(open_cluster.gcs_address, insecure=True)
    finally:
        open_cluster.shutdown()
    with pytest.raises(InsecureClusterError, match="cannot be checked"):
        require_authentication("ray://127.0.0.1:10001")
