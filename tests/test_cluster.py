"""The README's "Scaling out" path on a real multi-node Ray cluster whose nodes share nothing but
the object store, with a node killed mid-run.

Head plus three worker nodes, each its own raylet started by `ray start` with token
authentication, its own temp dir and its own working directory (see ``multinode.py``), as
separate machines would be; the manifest, its images and the run directory are in a local S3
server (moto), the only storage every node reads. The job is submitted with the README's
command (`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python
jobs/pipeline.py ... --set data.manifest=s3://... --set run.dir=s3://...`); only the address
and the settings differ (given as `--set`, so no local file is read). The job generates its
synthetic data into the bucket (`--prepare synthetic`), trains stage 1 with two workers whose
decode tasks fetch the images from the bucket, fits CFAR on Ray actors and writes the test
report. As soon as epoch 1's checkpoint lands in the bucket, the worker node hosting a training
worker is killed like a machine that dies: its raylet and every process under it get SIGKILL.
"""

from __future__ import annotations

import json
import time
import uuid

import pyarrow.fs as pafs
import pytest
from multinode import LocalCluster, wait_for

from campar_ray import storage
from campar_ray.runtime import InsecureClusterError, require_authentication

EPOCHS = 4
TINY = {
    "model.backbone": "resnet18",
    "model.fusion": "false",
    "data.image_size": "[32, 16]",
    "train.epochs": str(EPOCHS),
    "train.batch_size": "16",
    "train.num_workers": "2",
    "train.max_failures": "2",
    "cfar.actors": "2",
    "cfar.keys": "4",
    "cfar.factors": "4",
    "cfar.fc2_epochs": "50",
}
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(s3_server):
    # The S3 server first: every node's environment names its endpoint and keys, as an
    # instance profile would give each machine its credentials.
    # 2 CPUs a node: after losing one, the survivors still hold both training workers *and*
    # leave CPUs for Ray Data decoding (none left = a silent hang).
    nodes = {"node_a": 2, "node_b": 2, "node_c": 2}
    with LocalCluster.running(nodes, share_nothing=True) as cluster:
        yield cluster


def _metas(run_dir: str) -> list[dict]:
    """The ``meta.json`` of every checkpoint in the bucket."""
    filesystem, inner = storage.resolve(f"{run_dir}/ray/stage1")
    found = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    metas = []
    for info in found:
        if info.path.endswith("/meta.json"):
            try:
                with filesystem.open_input_stream(info.path) as stream:
                    metas.append(json.loads(stream.read()))
            except (OSError, json.JSONDecodeError):  # deleted as a better one landed
                continue
    return metas


def _two(actors: list[dict]) -> list[dict] | None:
    return actors if len(actors) == 2 else None


def _while_running(job, log_path, predicate):
    """``predicate`` for :func:`wait_for`, failing at once with the job's output if it ended."""

    def check():
        if job.poll() is not None:
            raise AssertionError(f"the job ended early:\n{log_path.read_text()[-3000:]}")
        return predicate()

    return check


def test_pipeline_job_on_nodes_sharing_only_a_bucket_survives_a_lost_node(
    cluster, s3_server, tmp_path, record_property
):
    prefix = f"{s3_server}/cluster-{uuid.uuid4().hex[:8]}"
    run_dir, manifest = f"{prefix}/run", f"{prefix}/data/manifest.parquet"
    log_path = tmp_path / "job.log"
    settings = {**TINY, "data.manifest": manifest, "run.dir": run_dir}
    entrypoint = ["python", "jobs/pipeline.py"]
    entrypoint += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    entrypoint += ["--prepare", "synthetic", "--prepare-args", "--n 240 --size 32x16"]
    with cluster.job(entrypoint, "cluster/runtime_env.yaml", log_path) as job:
        workers = wait_for(
            _while_running(job, log_path, lambda: _two(cluster.actors("RayTrainWorker"))),
            timeout=600,
            interval=1,
            what="two training workers",
        )
        snapshot = f"{run_dir}/ray/stage1/checkpoint_manager_snapshot.json"
        landed = _while_running(job, log_path, lambda: storage.exists(snapshot))
        wait_for(landed, 600, 0.2, "epoch 1's checkpoint in the bucket")
        saved = time.monotonic()
        epochs_saved = sorted(meta["epoch"] for meta in _metas(run_dir))
        victim = cluster.node_of(workers[0]["pid"])
        cluster.kill_node(victim)
        killed = time.monotonic()
        job.wait(timeout=900)
    output = log_path.read_text()
    assert job.returncode == 0 and "succeeded" in output, output[-3000:]

    # Training went on without the dead node, from the last checkpoint, to the last epoch.
    assert epochs_saved and epochs_saved[-1] < EPOCHS, "the node died after training ended"
    history = max(_metas(run_dir), key=lambda meta: meta["epoch"])["history"]
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1))
    everyone = cluster.actors("RayTrainWorker", alive_only=False)
    replaced = [a for a in everyone if a["pid"] not in {w["pid"] for w in workers}]
    assert len(replaced) >= 2, "no new worker group was started after the node died"
    # Work redone: only the epoch that was running when the node died (at most one epoch).
    record_property("epochs_done_before_kill", epochs_saved[-1])
    record_property("seconds_of_lost_work", round(killed - saved, 2))

    # Every artefact of the pipeline is in the bucket.
    assert storage.exists(manifest) and storage.exists(f"{prefix}/data/images")
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
        assert storage.exists(f"{run_dir}/{artefact}"), artefact
    metrics = json.loads(storage.read_bytes(f"{run_dir}/report/test/metrics.json"))
    assert metrics["cfar"] and 0 < metrics["sources"][metrics["final"]]["mA"] <= 1


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
