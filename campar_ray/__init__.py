"""campar-ray: pedestrian attribute recognition with CAM-PAR + CFAR, from a laptop to a Ray cluster.

The pipeline, one function per step (each also a ``campar`` sub-command)::

    prepare -> train_stage1 -> fit_cfar -> evaluate      (+ run_search, predict, export)

Imports are lazy so that ``import campar_ray`` stays cheap and Ray-free until a step that
needs Ray is called.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "campar_ray.config",
    "load_config": "campar_ray.config",
    "read_manifest": "campar_ray.data",
    "prepare": "campar_ray.data.converters",
    "generate_synthetic": "campar_ray.data.synthetic",
    "build_model": "campar_ray.model",
    "par_metrics": "campar_ray.metrics",
    "train_stage1": "campar_ray.train.stage1",
    "fit_cfar": "campar_ray.cfar.fit",
    "load_cfar": "campar_ray.cfar.fit",
    "run_search": "campar_ray.tune",
    "evaluate": "campar_ray.evaluate",
    "compare_runs": "campar_ray.evaluate",
    "load_model": "campar_ray.bundle",
    "save_bundle": "campar_ray.bundle",
    "predict": "campar_ray.predict",
    "export_model": "campar_ray.export",
    "run_demo": "campar_ray.demo",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'campar_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
