"""Stage 1: the plain PyTorch loops (no Ray) and the Ray Train driver on a real local cluster."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
import ray._private.state as ray_state
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from campar_ray.config import Config, ConfigError, TrainConfig, load_config
from campar_ray.data import decode_image, generate_synthetic, load_image_bytes, read_manifest
from campar_ray.data.manifest import resolve_image
from campar_ray.data.ray_pipeline import data_execution_options
from campar_ray.model.inputs import normalize
from campar_ray.run.checkpoints import load_stage1_checkpoint
from campar_ray.run.logits import read_split_logits
from campar_ray.train import worker
from campar_ray.train.loop import (
    EpochStats,
    Predictions,
    add_stats,
    batches_left,
    build_optimizer,
    build_scheduler,
    evaluate,
    lr_scale,
    make_grad_scaler,
    merge_predictions,
    reduce_stats,
    rescale_lr,
    step_scheduler,
    train_one_epoch,
    validation_metrics,
)
from campar_ray.train.monitor import StepPoster
from campar_ray.train.stage1 import Stage1Result, resolve_config, train_stage1

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """Conv + GAP + linear: small enough for unit tests, shaped like an image classifier."""

    def __init__(self, attributes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, attributes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)


def _batches(count: int = 4, size: int = 16, seed: int = 0, invalid: int = 0) -> list[dict]:
    """Attribute j is on when channel j is bright: a task a tiny CNN learns in a few epochs."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        labels = rng.integers(0, 2, (size, 3))
        images = rng.integers(0, 60, (size, 8, 6, 3)) + 180 * labels[:, None, None, :]
        valid = np.ones(size, dtype=bool)
        valid[:invalid] = False
        batches.append(
            {
                "image": torch.from_numpy(images.astype(np.uint8)),
                "labels": torch.from_numpy(labels.astype(np.int8)),
                "valid": torch.from_numpy(valid),
            }
        )
    return batches


def test_train_one_epoch_learns_and_counts_images():
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = build_optimizer(model, lr=3e-2, weight_decay=0.0)
    data = _batches()
    first = train_one_epoch(model, data, optimizer, _bce, device=CPU, grad_clip=10.0)
    for _ in range(8):
        last = train_one_epoch(model, data, optimizer, _bce, device=CPU, grad_clip=10.0)
    assert first.images == last.images == 64 and first.steps == 4 and first.skipped == 0
    assert last.loss < 0.5 * first.loss
    assert 0 <= last.data_wait_fraction <= 1 and last.images_per_s > 0
    predictions = evaluate(model, _batches(seed=1), lambda out: out, device=CPU)
    metrics = validation_metrics(predictions.labels, predictions.probs, [0, 1, 2])
    assert metrics["val_mA"] > 0.9
    assert predictions.loss_sum is None  # no loss asked for


def test_evaluate_gives_the_validation_loss_as_training_measures_it():
    """The validation loss is training's loss on the validation images, averaged per image as
    the training loss is: on the data it trained on, the two agree (no step between)."""
    torch.manual_seed(0)
    model, data = TinyNet(), _batches(invalid=3)
    predictions = evaluate(model, data, lambda out: out, device=CPU, loss_fn=_bce)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # measures, changes nothing
    stats = train_one_epoch(model, data, optimizer, _bce, device=CPU)
    assert predictions.loss_sum / len(predictions.probs) == pytest.approx(stats.loss, rel=1e-5)
    halves = [
        evaluate(model, data[i::2], lambda out: out, device=CPU, loss_fn=_bce) for i in (0, 1)
    ]
    merged = merge_predictions(halves)  # workers' shares add up
    assert merged.loss_sum == pytest.approx(predictions.loss_sum, rel=1e-5)


def test_undecodable_rows_are_dropped_and_counted_and_empty_batches_skip_the_step():
    model = TinyNet()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    stats = train_one_epoch(model, _batches(invalid=3), optimizer, _bce, device=CPU)
    assert (stats.images, stats.skipped, stats.steps) == (4 * 13, 12, 4)

    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, _batches(count=2, invalid=16), optimizer, _bce, device=CPU)
    assert (stats.images, stats.skipped, stats.steps, stats.batches) == (0, 32, 0, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    predictions = evaluate(model, _batches(invalid=5), lambda out: out, device=CPU)
    assert predictions.probs.shape == (4 * 11, 3) and predictions.skipped == 20


def test_gradient_clipping_bounds_the_gradient_norm():
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def huge_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 1e6 * _bce(logits, targets)

    train_one_epoch(model, _batches(count=1), optimizer, huge_loss, device=CPU, grad_clip=0.5)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm == pytest.approx(0.5, rel=1e-4)


def test_bf16_autocast_on_cpu_trains_with_finite_loss():
    model = TinyNet()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=5e-4)
    stats = train_one_epoch(model, _batches(), optimizer, _bce, device=CPU, amp=True)
    assert np.isfinite(stats.loss) and stats.steps == 4
    predictions = evaluate(model, _batches(), lambda out: out, device=CPU, amp=True)
    assert predictions.probs.dtype == np.float32


def test_non_finite_loss_stops_training_with_a_named_error():
    model = TinyNet()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0)

    def nan_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.sum() * float("nan")

    with pytest.raises(FloatingPointError, match="step 1"):
        train_one_epoch(model, _batches(), optimizer, nan_loss, device=CPU)


def test_schedulers_plateau_on_val_ma_and_cosine_anneal():
    model = TinyNet()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    plateau = build_scheduler(optimizer, name="plateau", epochs=30)
    for value in (0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6):
        step_scheduler(plateau, value)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)

    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    cosine = build_scheduler(optimizer, name="cosine", epochs=4)
    for _ in range(4):
        optimizer.step()
        step_scheduler(cosine, 0.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    with pytest.raises(ValueError, match="plateau, cosine"):
        build_scheduler(optimizer, name="step", epochs=4)


@pytest.mark.parametrize("name", ["plateau", "cosine"])
def test_rescaled_rates_continue_the_same_schedule_scaled(name):
    def schedule(factor_at: int | None) -> list[float]:
        optimizer = build_optimizer(TinyNet(), lr=1e-3, weight_decay=0.0)
        scheduler = build_scheduler(optimizer, name=name, epochs=12)
        rates = []
        for epoch, value in enumerate([0.5, 0.6] + [0.6] * 10):
            if epoch == factor_at:
                rescale_lr(optimizer, scheduler, 0.5)
            optimizer.step()
            step_scheduler(scheduler, value)
            rates.append(optimizer.param_groups[0]["lr"])
        return rates

    plain, scaled = schedule(None), schedule(3)
    assert scaled[:3] == plain[:3]
    assert scaled[3:] == pytest.approx([0.5 * rate for rate in plain[3:]], rel=1e-9, abs=1e-15)
    assert len(set(plain)) > 2  # the schedule did move: the comparison means something


def test_learning_rate_follows_the_square_root_of_the_group_size():
    assert lr_scale(4, 4) == 1.0
    assert lr_scale(1, 4) == pytest.approx(0.5)
    assert lr_scale(2, 8) * lr_scale(8, 2) == pytest.approx(1.0)


def test_stats_of_epoch_parts_and_ranks_combine():
    a = EpochStats(
        loss_sum=2.0, images=8, steps=1, seconds=1.0, data_seconds=0.5, skipped=1, batches=1
    )
    b = EpochStats(
        loss_sum=1.0, images=4, steps=2, seconds=3.0, data_seconds=1.5, skipped=0, batches=2
    )
    assert add_stats(a, b) == EpochStats(3.0, 12, 3, 4.0, 2.0, 1, 3)
    group = reduce_stats([a, b])
    assert (group.images, group.skipped, group.rows, group.loss_sum) == (12, 1, 13, 3.0)
    assert (group.steps, group.batches, group.seconds, group.data_seconds) == (2, 2, 3.0, 1.0)


def test_a_resumed_epoch_takes_the_batches_that_cover_the_rows_left():
    assert batches_left(100, 0, world_size=2, batch_size=10) == 5
    assert batches_left(100, 60, world_size=2, batch_size=10) == 2
    assert batches_left(100, 61, world_size=1, batch_size=10) == 4  # rounded up
    assert batches_left(100, 100, world_size=2, batch_size=10) == 0
    assert batches_left(100, 104, world_size=2, batch_size=10) == 0


class _Shard:
    """A training shard's stand-in: the same batches every pass."""

    def __init__(self, batches: list[dict]):
        self._batches = batches

    def iter_torch_batches(self, **_: object) -> list[dict]:
        return self._batches


def _worker(minutes: float = 0.0) -> worker._Run:
    """A single worker (no Ray) on 320 rows: 20 batches of 16."""
    model = TinyNet()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    return worker._Run(
        setup=worker.WorkerSetup(
            config=Config(train=TrainConfig(batch_size=16, checkpoint_every_minutes=minutes)),
            attributes=(),
            eval_attributes=(),
            eval_indices=(),
            positive_ratio=(),
            epoch_rows=320,
        ),
        model=model,
        ddp_model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, name="plateau", epochs=2),
        scaler=make_grad_scaler(CPU, False),
        loss_fn=_bce,
        options={"device": CPU},
        batches={},
        world=1,
        rank=0,
        clock=worker._CheckpointClock(minutes),
        steps=StepPoster(None, world=1, epoch_rows=320),
    )


def test_an_epoch_checkpoints_mid_way_when_due_and_a_resumed_one_trains_what_was_left(
    monkeypatch,
):
    saved = []
    monkeypatch.setattr(
        worker, "_report_progress", lambda run, epoch, done, history: saved.append(done)
    )
    data = _Shard(_batches(count=20))
    whole = worker._train_epoch(_worker(minutes=1e-9), data, 1, [], None)
    assert (whole.batches, whole.images, whole.steps) == (20, 320, 20)
    # Due at every check: after each full chunk of 8 batches, never at the end of the pass.
    assert [done.rows for done in saved] == [128, 256]

    saved.clear()
    done = EpochStats(
        loss_sum=64.0, images=128, steps=8, seconds=5.0, data_seconds=1.0, skipped=0, batches=8
    )
    progress = {"epoch": 1, "stats": dataclasses.asdict(done)}
    resumed = worker._train_epoch(_worker(minutes=60.0), data, 1, [], progress)
    assert (resumed.images, resumed.steps, resumed.batches) == (320, 20, 20)  # 8 saved + 12
    assert resumed.loss_sum > 64.0 and resumed.seconds > 5.0 and not saved


def test_validation_metrics_use_only_the_evaluated_attributes():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.int8)
    probs = labels.astype(np.float32)
    probs[:, 1] = 1 - probs[:, 1]  # attribute 1 is always wrong
    assert validation_metrics(labels, probs, [0, 2])["val_mA"] == pytest.approx(1.0)
    assert validation_metrics(labels, probs, [0, 1, 2])["val_mA"] == pytest.approx(2 / 3)


def test_merge_predictions_concatenates_shares_and_sums_skips():
    a = Predictions(np.ones((2, 3), np.int8), np.full((2, 3), 0.9, np.float32), skipped=1)
    empty = Predictions(np.zeros((0, 0), np.int8), np.zeros((0, 0), np.float32), skipped=2)
    merged = merge_predictions([a, empty, a])
    assert merged.probs.shape == (4, 3) and merged.skipped == 4
    with pytest.raises(ValueError, match="no decodable validation image"):
        merge_predictions([empty])


# --- Ray Train integration ----------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[str, str]:
    """600 synthetic 64 x 32 images; the first training image is overwritten with garbage.

    600, not fewer: an epoch must outlast the moment between epoch 1's checkpoint landing and
    the test killing a worker, or the kill lands after training (on a quiet 2-core machine
    200 images trained an epoch in well under a second).
    """
    manifest = generate_synthetic(str(tmp_path_factory.mktemp("synthetic")), n=600, size=(64, 32))
    table, info = read_manifest(manifest)
    corrupt = table.filter(pc.equal(table.column("split"), "train")).column("image")[0].as_py()
    with open(resolve_image(corrupt, info.root), "wb") as handle:
        handle.write(b"not an image")
    return manifest, corrupt


def _config(manifest: str, run_dir: Path, **train: object) -> Config:
    return Config().override(
        {
            "model": {"backbone": "resnet18", "fusion": False},
            "data": {
                "manifest": manifest,
                "image_size": [64, 32],
                "pad": 4,
                "decode_concurrency": 2,
            },
            "train": {"epochs": 2, "batch_size": 32, "num_workers": 2, "cpus_per_worker": 0.5}
            | {"lr": 1e-3, **train},
            "run": {"dir": str(run_dir)},
        }
    )


def _checkpoint_epochs(run_dir: Path) -> list[int]:
    metas = (run_dir / "ray" / "stage1").glob("checkpoint_*/meta.json")
    return sorted(json.loads(meta.read_text())["epoch"] for meta in metas)


def _split_sizes(manifest: str) -> dict[str, int]:
    splits = read_manifest(manifest)[0].column("split").to_pylist()
    return {split: splits.count(split) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def killed_run(ray_cluster, synthetic, tmp_path_factory) -> tuple[Config, Stage1Result, dict]:
    """Two workers, two epochs; one worker is SIGKILLed once epoch 1's checkpoint is registered.

    Shared by the integration tests below: one Ray Train run is the expensive part.
    """
    run_dir = tmp_path_factory.mktemp("stage1") / "run"
    config = _config(synthetic[0], run_dir, max_failures=2).override(
        {"tracking.mlflow_uri": f"sqlite:///{run_dir.parent}/mlflow.db"}
    )
    killed: dict[str, int] = {}

    def kill_a_worker_after_the_first_checkpoint() -> None:
        snapshot = run_dir / "ray" / "stage1" / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 600
        while not snapshot.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [
            actor["Pid"]
            for actor in ray_state.actors().values()
            if actor["ActorClassName"] == "RayTrainWorker" and actor["State"] == "ALIVE"
        ]
        killed["checkpoints"] = len(_checkpoint_epochs(run_dir))
        killed["pid"] = workers[-1]
        os.kill(workers[-1], signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    result = train_stage1(config, progress=False)
    killer.join(timeout=5)
    return config, result, killed


@pytest.mark.ray
def test_a_killed_worker_resumes_at_the_next_epoch_without_losing_or_redoing_one(killed_run):
    config, result, killed = killed_run
    assert killed["checkpoints"] == 1  # killed during epoch 2, after epoch 1 was saved
    assert [m["epoch"] for m in result.history] == [1, 2]
    # Every epoch was checkpointed exactly once: a restart from scratch would add epoch 1 again.
    assert _checkpoint_epochs(Path(config.run.dir)) == [1, 2]


@pytest.mark.ray
def test_the_restarted_run_is_one_mlflow_run_and_one_tensorboard_curve(killed_run):
    config, result, _ = killed_run
    run = _mlflow_run(config)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert _logged_epochs(config, run) == [1, 2]  # epoch 1 logged once, before and after the kill
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["model.backbone"] == "resnet18"
    assert run.data.metrics["final/val_mA"] == result.metrics["val_mA"]
    assert "kept epoch" in run.data.tags["mlflow.note.content"]

    events = EventAccumulator(str(Path(config.run.dir) / "tensorboard" / "stage1"))
    events.Reload()
    curve = events.Scalars("val_mA")
    assert [(p.step, p.value) for p in curve] == [
        (m["epoch"], pytest.approx(m["val_mA"])) for m in result.history
    ]
    for epoch in (1, 2):  # Ray Data's own stats, per epoch
        stats = Path(config.run.dir) / "data_stats" / f"epoch_{epoch:03d}.txt"
        assert "Operator" in stats.read_text()


def _mlflow_run(config: Config) -> Any:
    client = MlflowClient(config.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def _logged_epochs(config: Config, run: Any) -> list[int]:
    history = MlflowClient(config.tracking.mlflow_uri).get_metric_history(run.info.run_id, "epoch")
    return sorted(point.step for point in history)


@pytest.mark.ray
def test_run_reports_metrics_checkpoints_and_logits(killed_run, synthetic):
    config, result, _ = killed_run
    manifest, corrupt = synthetic
    run_dir = Path(config.run.dir)
    sizes = _split_sizes(manifest)
    for metrics in result.history:
        assert 0 <= metrics["val_mA"] <= 1 and 0 <= metrics["val_f1"] <= 1
        assert metrics["skipped_images"] == metrics["train_skipped_images"] == 1
        assert metrics["val_images"] == sizes["val"]  # evaluation shards drop no image
        assert metrics["images_per_s"] > 0 and 0 <= metrics["data_wait_fraction"] <= 1
    assert result.metrics["val_auc"] == max(m["val_auc"] for m in result.history)  # the rule
    for metrics in result.history:  # every epoch's validation logits are kept as evidence
        kept = np.load(run_dir / "logits" / "epochs" / f"val-epoch{metrics['epoch']:03d}.npz")
        assert (
            kept["logits"].shape == kept["labels"].shape == (sizes["val"], kept["labels"].shape[1])
        )
    # config.yaml names the resize filter the run used, not "encoder"
    assert config.data.interpolation == "encoder"
    saved = resolve_config(config).override({"data.interpolation": "bilinear"})  # resnet18's
    assert load_config(run_dir / "config.yaml") == saved

    assert result.skipped == {"train": [corrupt], "val": [], "test": []}
    info = read_manifest(manifest)[1]
    for split, path in result.logits.items():
        logits = read_split_logits(path)
        assert len(logits.images) == sizes[split] - len(result.skipped[split])
        assert logits.specific is not None and logits.shared.shape == logits.specific.shape
        assert logits.attributes == info.attributes
    assert corrupt not in read_split_logits(result.logits["train"]).images

    # The best checkpoint loads without Ray and reproduces the logits that were written.
    model, meta = load_stage1_checkpoint(result.checkpoint)
    val = read_split_logits(result.logits["val"])
    pixels = [
        decode_image(load_image_bytes(image, info.root), size=(64, 32)) for image in val.images[:8]
    ]
    with torch.no_grad():
        output = model(normalize(torch.from_numpy(np.stack(pixels))))
    assert np.allclose(output.specific.numpy(), val.specific[:8], atol=1e-4)
    assert meta["attributes"] == list(info.attributes)
    # (A re-run in the same run directory continuing the run and its MLflow run: test_run_dir.)


def test_resolve_config_names_bad_values_and_makes_paths_absolute():
    with pytest.raises(ConfigError, match=r"data\.manifest"):
        resolve_config(Config())
    base = Config().override({"data.manifest": "m.parquet", "run.dir": "runs/x"})
    resolved = resolve_config(base)
    assert os.path.isabs(resolved.data.manifest) and os.path.isabs(resolved.run.dir)
    with pytest.raises(ConfigError, match="bce, weighted_bce"):
        resolve_config(base.override({"train.loss": "focal"}))
    with pytest.raises(ConfigError, match="plateau, cosine"):
        resolve_config(base.override({"train.scheduler": "step"}))
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        resolve_config(base.override({"train.epochs": 0}))


@pytest.mark.ray
def test_data_gets_the_cpus_training_leaves_and_an_error_when_none_are_left(ray_cluster):
    total = ray_cluster.cluster_resources()["CPU"]
    assert data_execution_options(1.0).resource_limits.cpu == total - 1.0
    with pytest.raises(ValueError, match=r"train\.cpus_per_worker"):
        data_execution_options(total)
