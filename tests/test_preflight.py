"""Preflight: the run-vs-cluster checks on known shapes (live nodes, autoscaler node types,
the machines the nodes run on), waiting for the autoscaler with a faked clock, then `campar
doctor` and `campar train --gpu` against the real local cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from campar_ray.cli import main
from campar_ray.config import Config, load_config
from campar_ray.data import generate_synthetic
from campar_ray.data.concurrency import cluster_decode_tasks, decode_tasks, least_decode_tasks
from campar_ray.preflight import (
    GIB,
    ClusterShape,
    NodeType,
    PreflightError,
    Reservation,
    RunSections,
    check_cluster,
    doctor_report,
    findings,
    image_folders,
    launcher_shape,
    plan,
    resolve_decoding,
)

LAPTOP = ClusterShape(nodes=({"CPU": 4.0, "object_store_memory": 2.0 * GIB},))
RUN = Config().override(
    {
        "data": {"image_size": [64, 32], "decode_concurrency": 2, "prefetch_batches": 2},
        "train": {"num_workers": 2, "cpus_per_worker": 1.0, "batch_size": 32},
    }
)


def _errors(config: Config, shape: ClusterShape) -> list[str]:
    return [f.message for f in findings(RunSections.of(config), shape) if f.level == "error"]


def test_a_run_that_fits_has_no_findings():
    assert findings(RunSections.of(RUN), LAPTOP) == []
    need = Reservation.of(RunSections.of(RUN), decode_tasks=2)
    assert plan(RunSections.of(RUN), LAPTOP).data_cpus == 2.0 and need.worker_bundle == {"CPU": 1.0}
    # (prefetch 2 + 1 in use) x 32 images x 2 workers + 2 tasks x 256 rows x 2 pools
    assert need.prefetch_bytes == (3 * 32 * 2 + 2 * 256 * 2) * 64 * 32 * 3


def test_workers_that_leave_ray_data_no_cpu_are_refused():
    (error,) = _errors(RUN.override({"train.cpus_per_worker": 2.0}), LAPTOP)
    assert "leaving none for Ray Data decoding" in error and "train.cpus_per_worker" in error


def test_a_worker_bundle_larger_than_every_node_is_refused():
    two_small = ClusterShape(nodes=({"CPU": 2.0}, {"CPU": 2.0}))
    one_big_worker = RUN.override({"train.cpus_per_worker": 3.0, "train.num_workers": 1})
    errors = _errors(one_big_worker, two_small)
    assert any("needs 3 CPU but the largest node offers 2 CPU" in e for e in errors)


def test_gpu_runs_need_a_gpu_now_or_from_the_autoscaler():
    gpu_run = RUN.override({"train.use_gpu": True, "run.dir": "s3://bucket/run"})
    assert "no node has a GPU" in _errors(gpu_run, LAPTOP)[0]
    scaled_to_zero = ClusterShape(
        nodes=({"CPU": 8.0, "object_store_memory": 8.0 * GIB},),
        node_types=(NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}),),
    )
    assert _errors(gpu_run, scaled_to_zero) == []


def test_prefetch_larger_than_the_object_store_is_refused_and_half_of_it_warned():
    big = RUN.override({"data.image_size": [256, 192], "train.batch_size": 256})
    small_store = ClusterShape(nodes=({"CPU": 4.0, "object_store_memory": 0.25 * GIB},))
    assert "GiB of object store" in _errors(big, small_store)[0]
    need = Reservation.of(RunSections.of(RUN), decode_tasks=2).prefetch_bytes
    tight = ClusterShape(nodes=({"CPU": 4.0, "object_store_memory": 1.5 * need},))
    (warning,) = findings(RunSections.of(RUN), tight)
    assert warning.level == "warning" and "object store" in warning.message


def test_doctor_report_lists_nodes_reservation_and_verdict():
    text, fits = doctor_report(RunSections.of(RUN.override({"train.num_workers": 4})), LAPTOP)
    assert not fits
    assert text.splitlines()[0] == "cluster: 1 node(s), 4 CPU, 0 GPU, 2.00 GiB object store"
    assert "run: 4 worker(s) x 1 CPU; Ray Data keeps 0 CPU" in text
    assert "error: 4 training worker(s)" in text


# A cold cluster from cluster/aws.yaml: the head (no CPUs: it only schedules), no workers yet,
# up to 8 GPU workers of 8 CPU + 1 GPU; the recipe's 4 GPU workers run on 4 of them.
COLD = ClusterShape(
    nodes=({"CPU": 0.0, "object_store_memory": 8.0 * GIB},),
    node_types=(NodeType("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, max_count=8),),
    hosts=("10.0.0.1",),
)
GROWN = ClusterShape(
    nodes=(*COLD.nodes, *[{"CPU": 8.0, "GPU": 1.0, "object_store_memory": 8.0 * GIB}] * 4),
    node_types=COLD.node_types,
    hosts=("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"),
)
GPU_RECIPE = Config().override(
    {
        "data": {"manifest": "s3://bucket/pa100k", "decode_concurrency": 8, "decode_cpus": 1.0},
        "train": {"num_workers": 4, "cpus_per_worker": 4, "use_gpu": True},
        "run": {"dir": "s3://bucket/runs/pa100k"},
    }
)

BUCKET = ["data.manifest=s3://my-bucket/pa100k", "run.dir=s3://my-bucket/runs/pa100k"]


class FakeCluster:
    """A cluster whose shape changes on a faked clock, and the requests sent to its autoscaler."""

    def __init__(self, shapes: list[ClusterShape]):
        self.shapes, self.requests, self.now = shapes, [], 0.0

    def observe(self) -> ClusterShape:
        return self.shapes.pop(0) if len(self.shapes) > 1 else self.shapes[0]

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def check(self, config: Config) -> int:
        """The decode tasks :func:`check_cluster` plans for ``config``'s run."""
        return check_cluster(
            RunSections.of(config), self.observe, self.requests.append, self.sleep, lambda: self.now
        )


def test_a_cold_autoscaling_cluster_is_planned_against_its_node_types():
    assert findings(RunSections.of(GPU_RECIPE), COLD) == []
    planned = plan(RunSections.of(GPU_RECIPE), COLD)
    assert planned.add == {"gpu_worker": 4} and planned.decode_fit == 8
    assert planned.data_cpus == 16.0  # 4 nodes x 8 CPU, less 4 workers x 4
    text, fits = doctor_report(RunSections.of(GPU_RECIPE), COLD)
    assert fits and "autoscaler node type gpu_worker: 8 CPU, 1 GPU, up to 8" in text
    assert "plan: the autoscaler adds 4 x gpu_worker" in text


def test_the_shipped_recipe_on_a_cold_cluster_from_cluster_aws_yaml_waits_instead_of_failing():
    # Before: "training workers reserve 16 of the cluster's 0 CPUs" on the head alone.
    root = Path(__file__).resolve().parents[1]
    cold = launcher_shape(yaml.safe_load((root / "cluster" / "aws.yaml").read_text()))
    assert cold.nodes == ({"CPU": 0.0},) and cold.can_grow
    recipe = load_config(root / "configs" / "pa100k.yaml", BUCKET)
    grown = ClusterShape(nodes=(*cold.nodes, *[{"CPU": 8.0, "GPU": 1.0}] * 4))
    cluster = FakeCluster([cold, grown])
    cluster.check(recipe)
    assert cluster.requests[0][:4] == [{"CPU": 4.0, "GPU": 1.0}] * 4


def test_training_asks_the_autoscaler_for_nodes_and_waits_for_them(capsys):
    cluster = FakeCluster([COLD, COLD, GROWN])
    cluster.check(GPU_RECIPE)
    assert "waiting up to 20 min" in capsys.readouterr().err
    *asked, cleared = cluster.requests  # asked at every look, withdrawn once they came
    assert asked == [[{"CPU": 4.0, "GPU": 1.0}] * 4 + [{"CPU": 1.0}] * 8] * 2 and cleared == []
    assert cluster.now == 10.0  # one poll found the cluster still cold


def test_waiting_for_nodes_ends_at_the_timeout_in_one_line():
    cluster = FakeCluster([COLD])
    with pytest.raises(PreflightError, match=r"waited 1 min .* 4 x gpu_worker.*node_wait_min"):
        cluster.check(GPU_RECIPE.override({"train.node_wait_minutes": 1}))
    assert cluster.requests[-1] == []  # the sticky request is withdrawn


def test_only_what_can_never_fit_is_refused():
    two_gpu_nodes = ClusterShape(
        nodes=COLD.nodes, node_types=(NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, max_count=2),)
    )
    (error,) = _errors(GPU_RECIPE, two_gpu_nodes)
    assert error.startswith("4 training worker(s) x 4 CPU, 1 GPU need more nodes than the cluster")
    assert "can grow to" in error
    cluster = FakeCluster([two_gpu_nodes])
    with pytest.raises(PreflightError, match="need more nodes"):
        cluster.check(GPU_RECIPE)
    assert cluster.requests == []  # nothing asked of the autoscaler, no wait


def test_decode_tasks_that_do_not_all_fit_are_a_warning():
    roomy = ClusterShape(nodes=({"CPU": 6.0, "GPU": 1.0},) * 4)  # 2 CPUs left a node
    assert (
        findings(RunSections.of(GPU_RECIPE), roomy) == []
        and plan(RunSections.of(GPU_RECIPE), roomy).decode_fit == 8
    )
    tight = ClusterShape(nodes=({"CPU": 5.0, "GPU": 1.0},) * 4)  # 1 CPU left a node
    (warning,) = findings(RunSections.of(GPU_RECIPE), tight)
    assert warning.level == "warning"
    assert warning.message.startswith("only 4 of data.decode_concurrency=8 decode tasks fit")


# --- automatic decoding (data.decode_concurrency = 0), made concrete before the plan ----------


def test_the_one_reading_of_decode_concurrency():
    assert decode_tasks(5, 0.5, free_cpus=1.0) == 5  # set explicitly: kept
    assert decode_tasks(0, 0.5, free_cpus=3.0) == 6  # 2 cores, 4 logical CPUs, 1 worker
    assert decode_tasks(0, 1.0, free_cpus=0.5) == 1  # always at least one
    auto = RUN.override({"data.decode_concurrency": 0})
    assert least_decode_tasks(auto.data) == 1 and least_decode_tasks(RUN.data) == 2
    assert cluster_decode_tasks(auto.data, auto.train, cluster_cpus=4.0) == 4  # 2 left
    assert cluster_decode_tasks(RUN.data, RUN.train, cluster_cpus=64.0) == 2


def test_automatic_decoding_is_planned_with_the_tasks_training_runs():
    auto = RUN.override({"data.decode_concurrency": 0})
    planned = plan(RunSections.of(auto), LAPTOP)
    assert planned.need.decode_tasks == planned.decode_fit == 4  # 2 CPUs left / 0.5
    assert planned.need.prefetch_bytes == (3 * 32 * 2 + 4 * 256 * 2) * 64 * 32 * 3
    assert resolve_decoding(RunSections.of(auto), LAPTOP) == 4
    assert resolve_decoding(RunSections.of(RUN), LAPTOP) == 2  # a number set is kept
    cluster = FakeCluster([LAPTOP])
    assert cluster.check(auto) == 4 and cluster.requests == []


def test_automatic_decoding_on_a_cold_cluster_counts_the_nodes_the_workers_bring():
    auto = GPU_RECIPE.override({"data.decode_concurrency": 0})
    planned = plan(RunSections.of(auto), COLD)
    assert planned.add == {"gpu_worker": 4}
    assert planned.need.decode_tasks == planned.decode_fit == 16  # 4 x 8 CPU, less 4 x 4
    cluster = FakeCluster([COLD, GROWN])
    assert cluster.check(auto) == 16
    # The autoscaler is asked for the workers and the first decode task only: the rest
    # takes what the workers leave and is no reason for a node.
    assert cluster.requests[0] == [{"CPU": 4.0, "GPU": 1.0}] * 4 + [{"CPU": 1.0}]


def test_automatic_decoding_adds_no_node_and_warns_of_nothing():
    # 3 CPUs less 1 worker leave 2 tasks' worth, in halves that hold one task between them.
    halves = ClusterShape(
        nodes=({"CPU": 1.5},) * 2, node_types=(NodeType("cpu", {"CPU": 8.0}, max_count=4),)
    )
    auto = RUN.override(
        {
            "data": {"manifest": "s3://b/m", "decode_concurrency": 0, "decode_cpus": 1.0},
            "train.num_workers": 1,
            "run.dir": "s3://b/r",
        }
    )
    planned = plan(RunSections.of(auto), halves)
    assert planned.add == {} and (planned.need.decode_tasks, planned.decode_fit) == (2, 1)
    assert findings(RunSections.of(auto), halves) == []


MULTI_MACHINE = ClusterShape(nodes=({"CPU": 4.0},) * 2, hosts=("10.0.0.1", "10.0.0.2"))


def test_local_paths_are_refused_on_a_cluster_of_several_machines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = RUN.override({"data.manifest": "data/m.parquet", "run.dir": "runs/r"})
    manifest, run_dir = _errors(local, MULTI_MACHINE)
    # Resolved once, here on the driver, and the fix named in the same line.
    assert manifest.startswith(f"data.manifest {tmp_path / 'data' / 'm.parquet'} is on this")
    assert run_dir.startswith(f"run.dir {tmp_path / 'runs' / 'r'} is on this machine's disk")
    assert "s3:// or gs:// URI" in run_dir and "storage.shared_mounts" in run_dir
    # A declared shared mount, or object storage, is read by every node.
    assert _errors(local.override({"storage.shared_mounts": [str(tmp_path)]}), MULTI_MACHINE) == []
    in_bucket = local.override({"data.manifest": "s3://b/m", "run.dir": "gs://b/r"})
    assert _errors(in_bucket, MULTI_MACHINE) == []
    # The same paths are fine where every node is this machine, or there is only one node.
    one_machine = ClusterShape(nodes=({"CPU": 2.0},) * 3, hosts=("10.0.0.1",) * 3)
    assert _errors(local, one_machine) == [] and _errors(local, LAPTOP) == []
    # A cluster that can add nodes has other machines, even while it has one.
    assert len(_errors(local, COLD)) == 2


def test_a_path_manifests_image_folder_must_be_shared_too(tmp_path):
    manifest = generate_synthetic(str(tmp_path / "data"), n=12, size=(32, 16))
    assert image_folders(manifest) == [str(tmp_path / "data")]
    shared = RUN.override({"data.manifest": "s3://b/m", "run.dir": "s3://b/r"})
    (error,) = _errors_with_images(shared, image_folders(manifest))
    assert error.startswith(f"the manifest's images in {tmp_path / 'data'} is on this machine")
    mounted = shared.override({"storage.shared_mounts": [str(tmp_path)]})
    assert _errors_with_images(mounted, image_folders(manifest)) == []


def _errors_with_images(config: Config, folders: list[str]) -> list[str]:
    return [
        f.message
        for f in findings(RunSections.of(config), MULTI_MACHINE, folders)
        if f.level == "error"
    ]


@pytest.mark.ray
def test_doctor_and_train_on_the_real_cluster(ray_cluster, tmp_path, capsys):
    manifest = generate_synthetic(str(tmp_path / "data"), n=40, size=(32, 16))
    run_dir = tmp_path / "run"
    common = ["--manifest", manifest, "--run-dir", str(run_dir)]
    assert main(["doctor", *common, "--set", "train.cpus_per_worker=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cluster: 1 node(s), 4 CPU") and "ok: nothing found" in out
    assert not run_dir.exists()  # doctor checks the run directory, creates nothing

    assert main(["doctor", *common, "--num-workers", "8"]) == 1
    assert "8 training worker(s) x 1 CPU need more nodes than the cluster has" in (
        capsys.readouterr().out
    )
    assert main(["doctor", *common, "--num-workers", "4"]) == 1
    assert "leaving none for Ray Data decoding" in capsys.readouterr().out

    # Training refuses before it writes anything.
    assert main(["train", *common, "--gpu"]) == 2
    assert "no node has a GPU" in capsys.readouterr().err
    assert not (run_dir / "config.yaml").exists()
