"""The files of a stage-1 checkpoint, and which checkpoints of a run can be trusted.

A checkpoint is a folder ``checkpoint_*`` in :attr:`.layout.RunDir.checkpoints` with
``model.pt`` (weights), ``train_state.pt`` (optimiser, scheduler, scaler) and ``meta.json``
(epoch, config, attribute names, metrics and history). Ray Train V2 resumes a run from the
latest one named in ``checkpoint_manager_snapshot.json``; :func:`check_resumable` looks at
that same checkpoint on the driver, so a damaged or foreign one stops the run in seconds with
one line instead of failing inside every worker (or, worse, loading a planted pickle).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import torch

from campar_ray import storage
from campar_ray.artifacts import ArtifactError, load_json, load_tensors
from campar_ray.bounded import BoundedError, load_yaml
from campar_ray.config import CHOICES, Config, ModelConfig
from campar_ray.model import ParModel, WeightsMismatch, load_network, rebuild_network
from campar_ray.run.layout import RunDir

if TYPE_CHECKING:  # serving (bundle, predict) loads checkpoints without Ray Train
    import ray.train

MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "train_state.pt", "meta.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_RULES = CHOICES["train.checkpoint_rule"]
"""``train.checkpoint_rule``: what makes one epoch's checkpoint the run's result."""
LEGACY_RULE = "val_mA"
"""The rule of runs trained before ``train.checkpoint_rule`` existed (their logits were
written with the best checkpoint by validation mA)."""
SCORE_KEY = "checkpoint_score"
"""The metric Ray Train ranks (and keeps) checkpoints by: the rule's value of the epoch."""
UNSCORED = -1.0
"""The score of a mid-epoch checkpoint: below every rule's value (AUC and mA lie in [0, 1],
epochs start at 1), so it ranks last; finite, because Ray's run snapshot stores -inf as null
and a resumed run could then not rank its checkpoints."""


def check_checkpoint_rule(rule: str) -> None:
    if rule not in CHECKPOINT_RULES:
        raise ValueError(
            f"unknown train.checkpoint_rule {rule!r}; valid: {', '.join(CHECKPOINT_RULES)}"
        )


def checkpoint_score(metrics: dict[str, Any], rule: str) -> float:
    """One finished epoch's score under ``rule`` (higher is better; ties go to the earlier
    epoch). A NaN AUC (no attribute with both classes in validation) scores as unscored."""
    check_checkpoint_rule(rule)
    value = float(metrics["epoch"] if rule == "last" else metrics[rule])
    return value if value == value else UNSCORED


def run_rule(meta: dict[str, Any]) -> str:
    """The checkpoint rule a run was trained under (its checkpoint's config)."""
    return meta.get("config", {}).get("train", {}).get("checkpoint_rule", LEGACY_RULE)


def best_checkpoint(run_dir: str) -> str:
    """The checkpoint the run's ``train.checkpoint_rule`` keeps as its result (the one stage 1
    wrote the logits with): the best finished epoch's score, ties to the earlier epoch."""
    checkpoints = stage1_checkpoints(run_dir)
    rule = run_rule(checkpoints[-1][1])
    return max(
        checkpoints,
        key=lambda item: (checkpoint_score(item[1]["metrics"], rule), -item[1]["epoch"]),
    )[0]


def read_meta(checkpoint: str, *, ranked: bool = False) -> dict[str, Any]:
    """A checkpoint's ``meta.json``, checked to hold what its readers take from it: an object
    with ``attributes`` and ``config``; ``ranked`` (a run's checkpoints, ranked by epoch and
    validation mA) also ``epoch``, ``history`` and, unless it is a mid-epoch checkpoint
    (``partial``), ``metrics`` with ``val_mA``."""
    path = storage.join(checkpoint, META_FILE)
    meta = load_json(path)
    kinds: dict[str, type] = {"attributes": list, "config": dict}
    if ranked:
        kinds.update(epoch=int, history=list)
    if ranked and isinstance(meta, dict) and "partial" not in meta:
        kinds["metrics"] = dict
    problem = None
    if not isinstance(meta, dict):
        problem = f"expected a JSON object, got {type(meta).__name__}"
    else:
        missing = [key for key, kind in kinds.items() if not isinstance(meta.get(key), kind)]
        if missing:
            problem = f"no {missing[0]!r} of the right type"
        elif "metrics" in kinds and not isinstance(meta["metrics"].get("val_mA"), int | float):
            problem = "no number 'val_mA' in 'metrics'"
    if problem is not None:
        raise ArtifactError(
            f"{path} is not a stage-1 checkpoint's metadata ({problem}); the checkpoint is "
            f"damaged: move {checkpoint} away (the run goes on from its previous checkpoint), "
            "or start over with --fresh"
        )
    return meta


def stage1_checkpoints(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """Every end-of-epoch checkpoint folder of a run with its ``meta.json``, oldest first.

    Only checkpoints Ray Train registered count: a worker that died between writing a
    folder and reporting it leaves an orphan that no resume or ranking ever saw. Mid-epoch
    checkpoints (``partial`` in their metadata) are left out too: they exist to resume from
    and hold no finished epoch's weights or metrics.
    """
    root = RunDir(run_dir).checkpoints
    filesystem, inner = storage.resolve(root)
    if filesystem.get_file_info(inner).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no stage-1 checkpoints in {run_dir} (expected {root})")
    registered = _registered(root)
    found = []
    for info in filesystem.get_file_info(pafs.FileSelector(inner)):
        path = storage.join(root, info.base_name)
        if registered is not None and info.base_name not in registered:
            continue
        if info.type == pafs.FileType.Directory and storage.exists(storage.join(path, META_FILE)):
            meta = read_meta(path, ranked=True)
            if "partial" not in meta:
                found.append((path, meta))
    if not found:
        raise FileNotFoundError(f"no stage-1 checkpoint with {META_FILE} under {root}")
    return sorted(found, key=lambda item: item[1]["epoch"])


def training_history(run_dir: str) -> list[dict[str, float]]:
    """Per-epoch metrics of the whole run (the latest checkpoint carries all of them)."""
    return stage1_checkpoints(run_dir)[-1][1]["history"]


def _registered(root: str) -> set[str] | None:
    """Folder names in Ray Train's checkpoint snapshot (None: no snapshot, e.g. a copied run)."""
    snapshot = _snapshot(root)
    if snapshot is None:
        return None
    return {_dir_name(entry, root) for entry in snapshot["checkpoint_results"]}


def resume_checkpoint(run_dir: str) -> str | None:
    """The checkpoint Ray Train will resume ``run_dir`` from, or None for a fresh run."""
    root = RunDir(run_dir).checkpoints
    snapshot = _snapshot(root)
    latest = None if snapshot is None else snapshot.get("latest_checkpoint_result")
    if not latest:
        return None
    return storage.join(root, _dir_name(latest, root))


def _snapshot(root: str) -> dict[str, Any] | None:
    """Ray Train's checkpoint snapshot under ``root``, checked to be an object with a list
    ``checkpoint_results`` (None: there is none)."""
    path = storage.join(root, SNAPSHOT_FILE)
    if not storage.exists(path):
        return None
    snapshot = load_json(path)
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("checkpoint_results"), list):
        raise ArtifactError(f"{path} is not Ray Train's checkpoint snapshot; {_SNAPSHOT_FIX}")
    return snapshot


def _dir_name(entry: Any, root: str) -> str:
    """A snapshot entry's ``checkpoint_dir_name``: a plain folder name under ``root``."""
    name = entry.get("checkpoint_dir_name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ArtifactError(
            f"{storage.join(root, SNAPSHOT_FILE)} has an entry without a folder name "
            f"(checkpoint_dir_name); {_SNAPSHOT_FIX}"
        )
    return name


_SNAPSHOT_FIX = (
    "the run's checkpoint record is damaged: start over in place with --fresh, or use a new run.dir"
)


def stored_config(run_dir: str) -> dict[str, Any] | None:
    """The config of the run already in ``run_dir`` (None: there is none).

    The resume checkpoint's config comes first (its weights were trained with it), else
    ``config.yaml`` (a run stopped before its first checkpoint). Both are plain JSON/YAML.
    """
    checkpoint = resume_checkpoint(run_dir)
    path = RunDir(run_dir).config_file
    try:
        if checkpoint is not None:
            stored = read_meta(checkpoint).get("config")
        elif storage.exists(path):
            stored = load_yaml(storage.read_bytes(path), path)
        else:
            return None
    except (ArtifactError, BoundedError, AttributeError) as error:
        raise ArtifactError(f"cannot resume {run_dir}: {error}; no file was changed") from None
    if not isinstance(stored, dict):
        raise ArtifactError(f"cannot resume {run_dir}: its stored config is not a mapping")
    return stored


def check_resumable(run_dir: str, attributes: tuple[str, ...]) -> str | None:
    """Refuse, before any work, to resume from a checkpoint that cannot or must not load.

    Returns the checkpoint that will be resumed (None: a fresh run). Raises
    :class:`ArtifactError` for a missing, corrupt or tampered file (nothing is deleted: the
    other checkpoints of the run stay where they are), and ``ValueError`` when the
    checkpoint was trained on other attributes than the manifest's.
    """
    checkpoint = resume_checkpoint(run_dir)
    if checkpoint is None:
        return None
    try:
        meta = read_meta(checkpoint)
        for name in (MODEL_FILE, STATE_FILE):
            load_tensors(storage.join(checkpoint, name))
    except ArtifactError as error:
        raise ArtifactError(
            f"cannot resume {run_dir}: {error}; no file was changed (move that checkpoint "
            "folder away to resume from the previous one, or use a new run.dir)"
        ) from None
    if tuple(meta["attributes"]) != tuple(attributes):
        raise ValueError(
            f"cannot resume {run_dir}: its checkpoint was trained on {len(meta['attributes'])} "
            f"attributes ({_differences(meta['attributes'], attributes)}), the manifest has "
            f"{len(attributes)}; use a new run.dir for this manifest"
        )
    return checkpoint


def check_weights(
    run_dir: str, checkpoint: str | None, model: ModelConfig, attributes: int
) -> None:
    """Load ``checkpoint``'s weights into the network ``model`` builds, on the driver's CPU
    before any worker starts: weights of another network are refused in one line."""
    if checkpoint is None:
        return
    path = storage.join(checkpoint, MODEL_FILE)
    try:
        network = rebuild_network(model, attributes, load_tensors(path))
    except WeightsMismatch as mismatch:
        raise ArtifactError(
            f"cannot resume {run_dir}: {path} does not fit a model.backbone={model.backbone} "
            f"network ({mismatch}); no file was changed (--fresh starts over in place)"
        ) from None
    state_path = storage.join(checkpoint, STATE_FILE)
    problem = _state_mismatch(load_tensors(state_path), network)
    if problem is not None:
        raise ArtifactError(
            f"cannot resume {run_dir}: {state_path} does not fit this network's optimiser "
            f"({problem}); the file is damaged or from another run, no file was changed (move "
            f"{checkpoint} away to resume from the previous checkpoint, or --fresh)"
        )


def _state_mismatch(state: Any, network: torch.nn.Module) -> str | None:
    """Why ``train_state.pt``'s Adam state cannot drive ``network`` (None: it can). Checked on
    the driver: a wrong shape otherwise fails deep in every worker's first step."""
    optimizer = state.get("optimizer") if isinstance(state, dict) else None
    if not isinstance(optimizer, dict) or not all(
        isinstance(state.get(key), dict) for key in ("scheduler", "scaler")
    ):
        return "expected optimizer, scheduler and scaler states"
    shapes = [tuple(parameter.shape) for parameter in network.parameters()]
    groups = optimizer.get("param_groups")
    indices = [i for group in groups or [] for i in group.get("params", [])]
    if indices != list(range(len(shapes))):
        return f"{len(indices)} parameters, the network has {len(shapes)}"
    for index, entry in (optimizer.get("state") or {}).items():
        if not isinstance(index, int) or not 0 <= index < len(shapes):
            return f"state for parameter {index!r}, which the network does not have"
        for name, value in (entry or {}).items():
            if (
                isinstance(value, torch.Tensor)
                and value.dim()
                and tuple(value.shape) != shapes[index]
            ):
                return (
                    f"its {name} of parameter {index} is {list(value.shape)}, the parameter "
                    f"is {list(shapes[index])}"
                )
    return None


def _differences(trained: list[str], manifest: tuple[str, ...]) -> str:
    only_trained = [name for name in trained if name not in manifest]
    only_manifest = [name for name in manifest if name not in trained]
    parts = []
    if only_trained:
        parts.append("not in the manifest: " + ", ".join(only_trained[:5]))
    if only_manifest:
        parts.append("new in the manifest: " + ", ".join(only_manifest[:5]))
    return "; ".join(parts) or "same names in another order"


def save_checkpoint(
    folder: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    meta: dict[str, Any],
) -> None:
    """Weights, training state and JSON metadata into ``folder`` (a local directory)."""
    torch.save(model.state_dict(), os.path.join(folder, MODEL_FILE))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    torch.save(state, os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=1)


def restore_checkpoint(
    checkpoint: ray.train.Checkpoint | None,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any] | None:
    """Load the latest checkpoint's state into the live objects; return its metadata."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        device = next(model.parameters()).device
        model.load_state_dict(load_tensors(os.path.join(folder, MODEL_FILE), device))
        state = load_tensors(os.path.join(folder, STATE_FILE), device)
        meta = read_meta(folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return meta


def load_stage1_checkpoint(path: str) -> tuple[ParModel, dict[str, Any]]:
    """The trained network (CPU, eval mode) and metadata of a checkpoint folder or URI.

    Needs no Ray: inference, evaluation and export load checkpoints the same way. The
    network is rebuilt from the config stored in the checkpoint, without pretrained
    weights (the checkpoint's weights replace them, so nothing is downloaded).
    """
    meta = read_meta(path)
    model_config = Config().override(meta["config"]).model
    weights = storage.join(path, MODEL_FILE)
    return load_network(model_config, len(meta["attributes"]), weights), meta
