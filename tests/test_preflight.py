"""Preflight: the run-vs-cluster checks on known shapes, then `campar doctor` and
`campar train --gpu` against the real local cluster."""

from __future__ import annotations

import pytest

from campar_ray.cli import main
from campar_ray.config import Config
from campar_ray.data import generate_synthetic
from campar_ray.preflight import GIB, ClusterShape, Reservation, doctor_report, findings

LAPTOP = ClusterShape(nodes=({"CPU": 4.0, "object_store_memory": 2.0 * GIB},))
RUN = Config().override(
    {
        "data": {"image_size": [64, 32], "decode_concurrency": 2, "prefetch_batches": 2},
        "train": {"num_workers": 2, "cpus_per_worker": 1.0, "batch_size": 32},
    }
)


def _errors(config: Config, shape: ClusterShape) -> list[str]:
    return [f.message for f in findings(config, shape) if f.level == "error"]


def test_a_run_that_fits_has_no_findings():
    assert findings(RUN, LAPTOP) == []
    need = Reservation.of(RUN, LAPTOP)
    assert need.data_cpus == 2.0 and need.worker_bundle == {"CPU": 1.0}
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
    gpu_run = RUN.override({"train.use_gpu": True})
    assert "no node has a GPU" in _errors(gpu_run, LAPTOP)[0]
    scaled_to_zero = ClusterShape(
        nodes=({"CPU": 8.0, "object_store_memory": 8.0 * GIB},),
        node_types=({"CPU": 8.0, "GPU": 1.0},),
    )
    assert _errors(gpu_run, scaled_to_zero) == []


def test_prefetch_larger_than_the_object_store_is_refused_and_half_of_it_warned():
    big = RUN.override({"data.image_size": [256, 192], "train.batch_size": 256})
    small_store = ClusterShape(nodes=({"CPU": 4.0, "object_store_memory": 0.25 * GIB},))
    assert "GiB of object store" in _errors(big, small_store)[0]
    need = Reservation.of(RUN, LAPTOP).prefetch_bytes
    tight = ClusterShape(nodes=({"CPU": 4.0, "object_store_memory": 1.5 * need},))
    (warning,) = findings(RUN, tight)
    assert warning.level == "warning" and "object store" in warning.message


def test_doctor_report_lists_nodes_reservation_and_verdict():
    text, fits = doctor_report(RUN.override({"train.num_workers": 4}), LAPTOP)
    assert not fits
    assert text.splitlines()[0] == "cluster: 1 node(s), 4 CPU, 0 GPU, 2.00 GiB object store"
    assert "run: 4 worker(s) x 1 CPU; Ray Data keeps 0 CPU" in text
    assert "error: 4 training worker(s)" in text


@pytest.mark.ray
def test_doctor_and_train_on_the_real_cluster(ray_cluster, tmp_path, capsys):
    manifest = generate_synthetic(str(tmp_path / "data"), n=40, size=(32, 16))
    run_dir = tmp_path / "run"
    common = ["--manifest", manifest, "--run-dir", str(run_dir)]
    assert main(["doctor", *common, "--set", "train.cpus_per_worker=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cluster: 1 node(s), 4 CPU") and "ok: nothing found" in out

    assert main(["doctor", *common, "--num-workers", "8"]) == 1
    assert "leaving none for Ray Data decoding" in capsys.readouterr().out

    # Training refuses before it writes anything.
    assert main(["train", *common, "--gpu"]) == 2
    assert "no node has a GPU" in capsys.readouterr().err
    assert not (run_dir / "config.yaml").exists()
