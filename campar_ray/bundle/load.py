"""Writing a run's bundle, and loading a bundle or a run directory as one :class:`ParPredictor`.

:func:`load_model` opens either, so evaluation, prediction and export share one inference
path; the decision (thresholds by protocol, the calibration) comes from
:mod:`campar_ray.decision`, fitted on the run's validation logits when a run is opened and
read from the files :func:`save_bundle` wrote when a bundle is.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow.compute as pc
import yaml

from campar_ray import storage
from campar_ray.artifacts import copy_files, read_regular, save_arrays
from campar_ray.bundle.files import (
    ATTRIBUTES_FILE,
    SAMPLES_FILE,
    THRESHOLD_FILE,
    attribute_names,
    read_attributes,
    read_config,
    read_thresholds,
)
from campar_ray.bundle.predictor import ParPredictor
from campar_ray.cfar.fit import load_cfar_if_fitted
from campar_ray.cfar.model import MODEL_FILES as CFAR_MODEL_FILES
from campar_ray.config import Config
from campar_ray.data.images import ImageLimits, read_image
from campar_ray.data.manifest import read_manifest
from campar_ray.decision import (
    CALIBRATED,
    FIXED,
    VAL_PROTOCOLS,
    Calibration,
    check_decision,
    read_calibration,
    run_calibration,
    run_threshold,
    save_calibration,
)
from campar_ray.model import load_network, resolve_inputs
from campar_ray.run.checkpoints import META_FILE, MODEL_FILE, best_checkpoint, read_meta
from campar_ray.run.layout import CALIBRATION_FILE, CFAR_DIR, CONFIG_FILE, RunDir


def load_model(path: str, threshold: str = "0.5") -> ParPredictor:
    """Open a bundle (from :func:`save_bundle`) or a run directory, on the CPU.

    Needs neither Ray nor a data set. A run directory gives its best stage-1 checkpoint,
    its CFAR artefacts when ``fit-cfar`` ran, and ``threshold``'s protocol (one of
    :data:`campar_ray.metrics.DECISION_PROTOCOLS`, 0.5 by default as PAR papers report)
    applied to its val logits; a bundle gives the threshold (or calibration) it stored.
    ``calibrated`` gives a predictor whose probabilities are calibrated, decided at 0.5.
    """
    check_decision(threshold)
    if storage.exists(storage.join(path, MODEL_FILE)):
        return _load_bundle(path, threshold)
    checkpoints = RunDir(path).checkpoints
    if storage.exists(checkpoints):
        return _load_run(path, threshold)
    raise FileNotFoundError(
        f"{path} is neither a model bundle (no {MODEL_FILE}) nor a run directory "
        f"(no {checkpoints}); make a bundle with save_bundle(run_dir, out)"
    )


def has_calibration(path: str) -> bool:
    """Whether ``path`` can be opened with the ``calibrated`` protocol: a run directory (its
    calibration is saved or fitted from its val logits) or a bundle holding one."""
    if storage.exists(storage.join(path, MODEL_FILE)):
        return storage.exists(storage.join(path, CALIBRATION_FILE))
    return storage.exists(RunDir(path).checkpoints)


def save_bundle(run_dir: str, out: str, samples: int = 4) -> str:
    """Write the bundle of a run (best checkpoint, thresholds, calibration, CFAR) to ``out``;
    return ``out``.

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
    and ``calibration.json`` its calibration, so :func:`load_model` can open the bundle with
    any protocol.

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
    predict_from = config.model.predict_from
    thresholds = {
        protocol: run_threshold(run_dir, predict_from, cfar, protocol) for protocol in VAL_PROTOCOLS
    }
    storage.write_bytes(storage.join(out, MODEL_FILE), read_regular(weights))
    storage.write_bytes(
        storage.join(out, CONFIG_FILE), yaml.safe_dump(config.to_dict(), sort_keys=False).encode()
    )
    names = {"attributes": list(attributes), "eval_attributes": list(evaluated)}
    storage.write_json(storage.join(out, ATTRIBUTES_FILE), names)
    storage.write_json(
        storage.join(out, THRESHOLD_FILE),
        {name: {"value": t.value, "source": t.source} for name, t in thresholds.items()},
    )
    save_calibration(
        storage.join(out, CALIBRATION_FILE), run_calibration(run_dir, predict_from, cfar)
    )
    if cfar is not None:
        copy_files(RunDir(run_dir).cfar, storage.join(out, CFAR_DIR), CFAR_MODEL_FILES)
    if samples > 0:
        images = sample_images(config, "val", samples)
        if len(images):
            save_arrays(storage.join(out, SAMPLES_FILE), images=images)


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
    data = resolve_inputs(config).data  # resized as the run's encoder wants
    read = functools.partial(
        read_image, root=info.root, limits=ImageLimits.of(data), size=tuple(data.image_size),
        stored=info.pixels, interpolation=data.interpolation,
    )  # fmt: skip
    for source in rows.column(column).to_pylist():
        if len(images) == count:
            break
        try:
            images.append(read(source))
        except (ValueError, OSError):
            continue
    return np.stack(images) if images else empty


def _load_bundle(path: str, protocol: str) -> ParPredictor:
    config = read_config(storage.join(path, CONFIG_FILE))
    attributes, evaluated = read_attributes(path)
    cfar = load_cfar_if_fitted(path)
    model = load_network(config.model, len(attributes), storage.join(path, MODEL_FILE))
    if protocol == CALIBRATED:
        calibration = _bundle_calibration(path, len(attributes))
        threshold = calibration.threshold
        return ParPredictor(model, config, attributes, evaluated, threshold, cfar, calibration)
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
    return ParPredictor(model, config, attributes, evaluated, threshold, cfar)


def _bundle_calibration(path: str, attributes: int) -> Calibration:
    file = storage.join(path, CALIBRATION_FILE)
    if not storage.exists(file):
        raise ValueError(
            f"{path} has no {CALIBRATION_FILE} (a bundle from before calibration); "
            "re-create the bundle with `campar bundle`"
        )
    return read_calibration(file, attributes)


def _load_run(run_dir: str, protocol: str) -> ParPredictor:
    checkpoint = best_checkpoint(run_dir)
    meta = read_meta(checkpoint)
    config = Config().override(meta["config"])
    attributes, evaluated = attribute_names(meta, storage.join(checkpoint, META_FILE))
    model = load_network(config.model, len(attributes), storage.join(checkpoint, MODEL_FILE))
    cfar = load_cfar_if_fitted(run_dir)
    predict_from = config.model.predict_from
    if protocol == CALIBRATED:
        calibration = run_calibration(run_dir, predict_from, cfar)
        threshold = calibration.threshold
        return ParPredictor(model, config, attributes, evaluated, threshold, cfar, calibration)
    threshold = run_threshold(run_dir, predict_from, cfar, protocol)
    return ParPredictor(model, config, attributes, evaluated, threshold, cfar)
