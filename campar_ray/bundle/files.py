"""The files of a bundle beside the weights, each read back checked (a bundle may come from
anyone): ``config.yaml``, ``attributes.json``, ``threshold.json``, ``samples.npz``.

``model.pt``, ``config.yaml``, ``calibration.json`` and ``cfar/`` keep the names they have in
a run directory (:mod:`campar_ray.run`); the rest are the bundle's own and spelled here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from campar_ray import storage
from campar_ray.artifacts import load_arrays, load_json
from campar_ray.bounded import BoundedError, load_yaml
from campar_ray.config import Config, ConfigError
from campar_ray.decision import VAL_PROTOCOLS, Threshold

ATTRIBUTES_FILE = "attributes.json"
THRESHOLD_FILE = "threshold.json"
SAMPLES_FILE = "samples.npz"


def load_samples(path: str) -> np.ndarray | None:
    """The bundle's real sample images (uint8 ``N x H x W x 3``), or None when it has none."""
    samples = storage.join(path, SAMPLES_FILE)
    if not storage.exists(samples):
        return None
    return load_arrays(samples)["images"]


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


def read_config(file: str) -> Config:
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
