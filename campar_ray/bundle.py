"""A trained model as one directory that plain Python can load: no Ray, no run directory.

A bundle holds what inference needs and nothing else:

- ``model.pt``: the stage-1 state dict (``torch.save``, loaded with ``weights_only=True``);
- ``config.yaml``: the resolved config of the checkpoint (backbone, head, input size, ...);
- ``attributes.json``: attribute names and the evaluated ones;
- ``threshold.json``: the thresholds chosen on validation data, by protocol (``val``: one
  value, ``val-per-attribute``: one per attribute), each with where it came from; the
  ``0.5`` protocol needs none;
- ``cfar/``: the run's stage-2 artefacts (``.npz`` + ``cfar.json``), when it has them;
- ``samples.npz``: a few resized validation images (uint8), so that export can check
  parity on real inputs without the data set.

:func:`load_model` opens a bundle *or* a run directory (its best stage-1 checkpoint, its CFAR
artefacts) and returns the same :class:`ParPredictor`, so evaluation, prediction and export
share one inference path. Everything is read through :mod:`campar_ray.storage`, so bundles and
runs may live in object stores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import yaml
from torch import Tensor

from campar_ray import storage
from campar_ray.artifacts import copy_files, load_arrays, load_json, read_regular, save_arrays
from campar_ray.bounded import BoundedError, load_yaml
from campar_ray.cfar.fit import CfarPredictor, eval_columns, load_cfar
from campar_ray.cfar.model import MODEL_FILE as CFAR_MODEL_FILE
from campar_ray.cfar.model import MODEL_FILES as CFAR_MODEL_FILES
from campar_ray.config import Config, ConfigError
from campar_ray.data.images import ImageLimits, read_image
from campar_ray.data.manifest import read_manifest
from campar_ray.data.transforms import resize
from campar_ray.metrics import THRESHOLD_PROTOCOLS, check_protocol, select_threshold
from campar_ray.model import ParModel, ParOutput, Scorer, load_network, prediction_logits
from campar_ray.run.checkpoints import (
    META_FILE,
    MODEL_FILE,
    chosen_checkpoint,
    read_meta,
    stage1_checkpoints,
)
from campar_ray.run.layout import CFAR_DIR, CONFIG_FILE, RunDir
from campar_ray.run.logits import SplitLogits, read_split_logits

ATTRIBUTES_FILE = "attributes.json"
THRESHOLD_FILE = "threshold.json"
SAMPLES_FILE = "samples.npz"

Image = np.ndarray | str | os.PathLike


@dataclass(frozen=True)
class Threshold:
    """A decision threshold on the final probabilities and how it was obtained."""

    value: float | tuple[float, ...]
    """One value, or one per attribute (in ``attributes`` order)."""
    source: str
    protocol: str
    """One of :data:`campar_ray.metrics.THRESHOLD_PROTOCOLS`."""


FIXED = Threshold(0.5, "fixed, as PAR papers report", "0.5")
"""The ``0.5`` protocol's threshold: the same for every run."""

VAL_PROTOCOLS = tuple(p for p in THRESHOLD_PROTOCOLS if p != FIXED.protocol)
"""The protocols whose thresholds depend on the run, so a bundle must store them."""


def best_checkpoint(run_dir: str) -> str:
    """The checkpoint the run's ``train.checkpoint_rule`` keeps (the one stage 1 wrote the
    logits with); see :func:`campar_ray.run.checkpoints.chosen_checkpoint`."""
    return chosen_checkpoint(run_dir)


def training_history(run_dir: str) -> list[dict[str, float]]:
    """Per-epoch metrics of the whole run (the latest checkpoint carries all of them)."""
    return stage1_checkpoints(run_dir)[-1][1]["history"]


def stage1_probabilities(logits: SplitLogits, predict_from: str) -> np.ndarray:
    """sigmoid of the stage-1 prediction logits of stored logits, as the network computes it."""
    output = ParOutput(
        torch.from_numpy(logits.shared),
        None if logits.specific is None else torch.from_numpy(logits.specific),
        None,
    )
    return torch.sigmoid(prediction_logits(output, predict_from)).numpy()


def protocol_threshold(protocol: str, val: SplitLogits, probs: np.ndarray) -> float | np.ndarray:
    """``protocol``'s threshold for one source's validation probabilities (N x M).

    One value is chosen over the evaluated attributes, as mA is reported; per-attribute values
    cover all M attributes (each is chosen on its own column, so the evaluated ones are the same
    either way) because predictions name every attribute.
    """
    if protocol == "val-per-attribute":
        return select_threshold(protocol, val.labels, probs)
    columns = eval_columns(val)
    return select_threshold(protocol, val.labels[:, columns], probs[:, columns])


def run_threshold(
    run_dir: str, predict_from: str, cfar: CfarPredictor | None, protocol: str
) -> Threshold:
    """The threshold of a run's final prediction (stage 1 + CFAR when fitted) under ``protocol``.

    ``val`` with CFAR is the threshold fit-cfar chose and stored; every other val-chosen one
    comes from the run's validation logits, never from test data.
    """
    check_protocol(protocol)
    if protocol == FIXED.protocol:
        return FIXED
    final = "stage 1 + CFAR" if cfar is not None else f"stage 1 ({predict_from} logits)"
    if protocol == "val" and cfar is not None:
        return Threshold(cfar.threshold, f"val: maximises mA of {final} (fit-cfar)", protocol)
    val = read_split_logits(RunDir(run_dir).logits("val"))
    probs = (
        stage1_probabilities(val, predict_from)
        if cfar is None
        else cfar.probabilities(val.prediction)
    )
    value = protocol_threshold(protocol, val, probs)
    if protocol == "val":
        return Threshold(float(value), f"val: maximises mA of {final}", protocol)
    return Threshold(
        tuple(float(v) for v in value),
        f"val: each maximises its attribute's mA term, of {final}",
        protocol,
    )


def validation_threshold(run_dir: str, predict_from: str, cfar: CfarPredictor | None) -> Threshold:
    """The ``val`` protocol's threshold of a run (the PETA ablation tables' protocol)."""
    return run_threshold(run_dir, predict_from, cfar, "val")


class ParPredictor:
    """A trained network (+ CFAR) that turns images into attribute probabilities.

    ``predict_proba`` takes decoded images (``H x W x 3`` uint8 arrays of any size) or paths
    and URIs; they are resized and normalised exactly as in training. ``score`` is what batch
    prediction's actors call on decoded batches. Both go through the network's
    :class:`~campar_ray.model.Scorer`, as stage 1's logits do. Lower-level pieces (``stage1``
    on a normalised batch, ``probabilities`` of its output) serve evaluation and export,
    which need the CAMs or a traced module.
    """

    def __init__(
        self,
        model: ParModel,
        config: Config,
        attributes: Sequence[str],
        eval_attributes: Sequence[str],
        threshold: Threshold,
        cfar: CfarPredictor | None,
    ):
        self.scorer = Scorer(model)
        self.config = config
        self.attributes = tuple(attributes)
        self.eval_attributes = tuple(eval_attributes)
        self.decision = threshold
        """The threshold ``decide``/``predict`` apply, with its protocol and source."""
        self.cfar = cfar

    @property
    def model(self) -> ParModel:
        return self.scorer.network

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.config.data.image_size)

    @property
    def threshold(self) -> float | tuple[float, ...]:
        """One threshold, or one per attribute (``attributes`` order)."""
        return self.decision.value

    @property
    def threshold_source(self) -> str:
        """How ``threshold`` was obtained (protocol and data), for exported metadata."""
        return self.decision.source

    @property
    def predict_from(self) -> str:
        return self.config.model.predict_from

    def to(self, device: str | torch.device) -> ParPredictor:
        self.scorer.to(device)
        return self

    def prepare(self, images: Sequence[Image]) -> Tensor:
        """Decode (paths) and resize every image: uint8 ``N x H x W x 3`` on the CPU."""
        batch = np.zeros((len(images), *self.image_size, 3), dtype=np.uint8)
        for index, image in enumerate(images):
            if isinstance(image, np.ndarray):
                if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                    raise ValueError(
                        f"image {index} must be an H x W x 3 uint8 array, got "
                        f"{image.dtype} {image.shape}"
                    )
                batch[index] = resize(image, self.image_size)
            else:
                batch[index] = read_image(os.fspath(image), "", size=self.image_size)
        return torch.from_numpy(batch)

    def stage1(self, x: Tensor, return_cams: bool = False) -> ParOutput:
        """The network on a normalised ``N x 3 x H x W`` batch (eval mode, no gradients)."""
        return self.scorer.forward(x, return_cams=return_cams)

    def cfar_input(self, output: ParOutput) -> Tensor:
        """The logits CFAR was fitted on: specific for CAM-PAR, shared for the baseline."""
        return output.shared if output.specific is None else output.specific

    def probabilities(self, output: ParOutput) -> np.ndarray:
        """Final probabilities (N x M float32): stage 1 + CFAR when present, else stage 1."""
        if self.cfar is not None:
            return self.cfar.probabilities(self.cfar_input(output).float().cpu().numpy())
        logits = prediction_logits(output, self.predict_from)
        return torch.sigmoid(logits.float()).cpu().numpy()

    def score(self, pixels: Tensor) -> dict[str, np.ndarray]:
        """Final probabilities (``probs``, N x M) of a decoded, resized uint8 batch."""
        return {"probs": self.probabilities(self.scorer(pixels))}

    def predict_proba(self, images: Sequence[Image], batch_size: int = 32) -> np.ndarray:
        """Probabilities of every attribute (N x M, in ``attributes`` order)."""
        chunks = [np.zeros((0, len(self.attributes)), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            chunks.append(self.score(self.prepare(images[start : start + batch_size]))["probs"])
        return np.concatenate(chunks)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Which attributes are present (N x M bool): probability >= its ``threshold``."""
        return np.asarray(probs) >= np.asarray(self.threshold)

    def predict(self, images: Sequence[Image], batch_size: int = 32) -> list[list[str]]:
        """Names of the attributes predicted present (probability >= ``threshold``)."""
        present = self.decide(self.predict_proba(images, batch_size))
        return [[self.attributes[j] for j in np.flatnonzero(row)] for row in present]


def load_model(path: str, threshold: str = "0.5") -> ParPredictor:
    """Open a bundle (from :func:`save_bundle`) or a run directory, on the CPU.

    Needs neither Ray nor a data set. A run directory gives its best stage-1 checkpoint,
    its CFAR artefacts when ``fit-cfar`` ran, and ``threshold``'s protocol (one of
    :data:`campar_ray.metrics.THRESHOLD_PROTOCOLS`, 0.5 by default as PAR papers report)
    applied to its val logits; a bundle gives the threshold it stored for the protocol.
    """
    check_protocol(threshold)
    if storage.exists(storage.join(path, MODEL_FILE)):
        return _load_bundle(path, threshold)
    checkpoints = RunDir(path).checkpoints
    if storage.exists(checkpoints):
        return _load_run(path, threshold)
    raise FileNotFoundError(
        f"{path} is neither a model bundle (no {MODEL_FILE}) nor a run directory "
        f"(no {checkpoints}); make a bundle with save_bundle(run_dir, out)"
    )


def save_bundle(run_dir: str, out: str, samples: int = 4) -> str:
    """Write the bundle of a run (best checkpoint, thresholds, CFAR) to ``out``; return ``out``.

    ``out`` may not lie inside the run directory (it would rewrite the run's ``config.yaml``);
    its files appear together once all are written, so a failure (a full disk) leaves none.
    """
    if RunDir(run_dir).contains(out):
        raise ValueError(
            f"--out {out} is inside the run directory {run_dir}, whose config.yaml the bundle "
            "would overwrite; write the bundle elsewhere"
        )
    with storage.staged(out) as folder:
        _write_bundle(run_dir, folder, samples)
    return out


def _write_bundle(run_dir: str, out: str, samples: int) -> None:
    """The bundle's files, written to ``out``.

    ``threshold.json`` holds the run's threshold under every protocol chosen on validation,
    so :func:`load_model` can open the bundle with any protocol.

    ``samples`` resized validation images go into ``samples.npz`` when the run's manifest
    is still readable (0 to leave them out).
    """
    checkpoint = best_checkpoint(run_dir)
    meta = read_meta(checkpoint)
    config = Config().override(meta["config"])
    attributes, evaluated = attribute_names(meta, storage.join(checkpoint, META_FILE))
    weights = storage.join(checkpoint, MODEL_FILE)
    load_network(config.model, len(attributes), weights)  # tensors that fit: checked, then copied
    cfar = load_cfar_if_fitted(run_dir)
    thresholds = {
        protocol: run_threshold(run_dir, config.model.predict_from, cfar, protocol)
        for protocol in VAL_PROTOCOLS
    }
    storage.write_bytes(storage.join(out, MODEL_FILE), read_regular(weights))
    storage.write_bytes(
        storage.join(out, CONFIG_FILE), yaml.safe_dump(config.to_dict(), sort_keys=False).encode()
    )
    names = {"attributes": list(attributes), "eval_attributes": list(evaluated)}
    _write_json(storage.join(out, ATTRIBUTES_FILE), names)
    _write_json(
        storage.join(out, THRESHOLD_FILE),
        {name: {"value": t.value, "source": t.source} for name, t in thresholds.items()},
    )
    if cfar is not None:
        copy_files(RunDir(run_dir).cfar, storage.join(out, CFAR_DIR), CFAR_MODEL_FILES)
    if samples > 0:
        images = sample_images(config, "val", samples)
        if len(images):
            save_arrays(storage.join(out, SAMPLES_FILE), images=images)


def load_samples(path: str) -> np.ndarray | None:
    """The bundle's real sample images (uint8 ``N x H x W x 3``), or None when it has none."""
    samples = storage.join(path, SAMPLES_FILE)
    if not storage.exists(samples):
        return None
    return load_arrays(samples)["images"]


def sample_images(config: Config, split: str, count: int) -> np.ndarray:
    """The first ``count`` decodable images of a split, resized (empty if none can be read).

    The manifest's rows go through the same guard as training's, under the run's
    ``data.allow_outside_root``: a ``meta.json`` naming someone else's manifest reads nothing
    outside that manifest's folder and sends no request anywhere its rows say."""
    empty = np.zeros((0, *config.data.image_size, 3), dtype=np.uint8)
    if not config.data.manifest:
        return empty
    try:
        table, info = read_manifest(config.data.manifest)
    except (FileNotFoundError, ValueError):
        return empty
    rows = table.filter(pc.equal(table.column("split"), split))
    column = "binary" if "binary" in rows.column_names else "image"
    images = []
    for source in rows.column(column).to_pylist():
        if len(images) == count:
            break
        try:
            size = tuple(config.data.image_size)
            limits = ImageLimits.of(config.data)
            images.append(read_image(source, info.root, limits, size=size, stored=info.pixels))
        except (ValueError, OSError):
            continue
    return np.stack(images) if images else empty


def read_thresholds(path: str, attributes: int) -> dict[str, Threshold]:
    """A bundle's ``threshold.json``, checked: protocol -> threshold for ``attributes`` outputs.

    The file maps ``val`` to ``{"value": number, "source": text}`` and ``val-per-attribute``
    to the same with a list of one number per attribute; either may be absent.
    """
    file = storage.join(path, THRESHOLD_FILE)
    payload = load_json(file)
    expected = (
        f'expected {{"val": {{"value": number, "source": text}}, "val-per-attribute": '
        f'{{"value": [{attributes} numbers], "source": text}}}}, numbers in [0, 1]'
    )
    if not isinstance(payload, dict) or not set(payload) <= set(VAL_PROTOCOLS):
        raise ValueError(
            f"{file} is not a threshold file by protocol ({expected}); "
            "re-create the bundle with `campar bundle`"
        )
    thresholds = {}
    for protocol, entry in payload.items():
        value = _threshold_value(entry, attributes if protocol == "val-per-attribute" else None)
        if value is None:
            raise ValueError(f"{file}: bad {protocol!r} entry {entry!r}; {expected}")
        thresholds[protocol] = Threshold(value, entry["source"], protocol)
    return thresholds


def read_attributes(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A bundle's ``attributes.json``, checked: (attribute names, evaluated ones)."""
    file = storage.join(path, ATTRIBUTES_FILE)
    return attribute_names(load_json(file), file)


def attribute_names(payload: Any, file: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``payload["attributes"]`` and ``payload["eval_attributes"]`` of ``file``, checked: lists
    of distinct names, the evaluated ones among the attributes."""
    if isinstance(payload, dict):
        names, evaluated = payload.get("attributes"), payload.get("eval_attributes")
        if _names(names) and _names(evaluated) and set(evaluated) <= set(names):
            return tuple(names), tuple(evaluated)
    raise ValueError(
        f'{file} does not name the attributes (expected {{"attributes": [distinct names], '
        '"eval_attributes": [some of those names]})'
    )


def _names(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(name, str) for name in value)
        and len(set(value)) == len(value)
    )


def _threshold_value(entry: Any, attributes: int | None) -> float | tuple[float, ...] | None:
    """An entry's value, checked: one probability (``attributes`` None) or that many; else None."""
    if not (
        isinstance(entry, dict)
        and set(entry) == {"value", "source"}
        and isinstance(entry["source"], str)
    ):
        return None
    value = entry["value"]
    if attributes is None:
        return float(value) if _is_probability(value) else None
    if isinstance(value, list) and len(value) == attributes and all(map(_is_probability, value)):
        return tuple(float(v) for v in value)
    return None


def _is_probability(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def _load_bundle(path: str, protocol: str) -> ParPredictor:
    config = _read_config(storage.join(path, CONFIG_FILE))
    attributes, evaluated = read_attributes(path)
    stored = read_thresholds(path, len(attributes))
    if protocol == FIXED.protocol:
        threshold = FIXED
    elif protocol in stored:
        threshold = stored[protocol]
    else:
        raise ValueError(
            f"{storage.join(path, THRESHOLD_FILE)} has no {protocol!r} threshold (it holds "
            f"{', '.join(stored) or 'none'}); re-create the bundle with `campar bundle`"
        )
    model = load_network(config.model, len(attributes), storage.join(path, MODEL_FILE))
    return ParPredictor(model, config, attributes, evaluated, threshold, load_cfar_if_fitted(path))


def _read_config(file: str) -> Config:
    """A bundle's ``config.yaml``: a mapping of known keys with values of the right types."""
    try:
        loaded = load_yaml(storage.read_bytes(file), file)
        if not isinstance(loaded, dict):
            raise ConfigError(f"expected a mapping, got {type(loaded).__name__}")
        return Config().override(loaded)
    except BoundedError as error:
        raise ValueError(f"{error}; re-create the bundle with `campar bundle`") from None
    except ConfigError as error:
        message = " ".join(str(error).split())
        raise ValueError(f"{file} is not a campar config: {message}") from None


def _load_run(run_dir: str, protocol: str) -> ParPredictor:
    checkpoint = best_checkpoint(run_dir)
    meta = read_meta(checkpoint)
    config = Config().override(meta["config"])
    attributes, evaluated = attribute_names(meta, storage.join(checkpoint, META_FILE))
    model = load_network(config.model, len(attributes), storage.join(checkpoint, MODEL_FILE))
    cfar = load_cfar_if_fitted(run_dir)
    threshold = run_threshold(run_dir, config.model.predict_from, cfar, protocol)
    return ParPredictor(model, config, attributes, evaluated, threshold, cfar)


def load_cfar_if_fitted(path: str) -> CfarPredictor | None:
    """The CFAR predictor of a run or bundle, or None when ``fit-cfar`` has not run."""
    if storage.exists(storage.join(path, CFAR_DIR, CFAR_MODEL_FILE)):
        return load_cfar(path)
    return None


def _write_json(path: str, payload: dict[str, Any]) -> None:
    storage.write_bytes(path, json.dumps(payload, indent=1).encode())
