"""Export a trained model (stage 1, plus CFAR when present) as one TorchScript or ONNX file.

The exported module takes a *normalised* image batch (``N x 3 x H x W`` float32, ImageNet
mean/std, the bundle's input size; the batch axis is dynamic) and returns the final
probabilities (``N x M``). Stage 2 is rebuilt from its arrays as tensor operations:

- ``dictionary`` lookup: nearest of K keys by squared distance to ``r = sigmoid(l)``, then
  ``r_hat`` is a row of the precomputed K x M table ``values @ Y^T``;
- ``fold-in``: ``x = (Y^T C Y + lam I)^-1 Y^T C p`` per image with ``torch.linalg.solve`` in
  float64 (as the NumPy reference solves it), then ``r_hat = x @ Y^T``. TorchScript only: ONNX
  has no linear-solve operator, so an ONNX export of a fold-in model is refused;
- ``fc2`` on ``concat(r_hat, l)``;
- the calibration's per-attribute offsets subtracted (when the model has one), then sigmoid.

This is a torch re-implementation of :mod:`campar_ray.decision` (which logits, the CFAR
refinement, the calibration), written as tensor operations so that it traces; every export is
checked against that reference, through the predictor, on random inputs and on real images
(given by the caller, else the bundle's ``samples.npz``); the largest absolute difference is
printed and must not exceed the tolerance. A model with a calibration (every bundle made
since calibration exists, every run) is exported calibrated: its outputs are read at 0.5.
The file (a local path) carries its own description (attributes, threshold, calibration,
input size, normalisation) as TorchScript extra files or ONNX metadata. ONNX needs the
optional extra ``campar-ray[onnx]``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from campar_ray.bundle import Image, ParPredictor, has_calibration, load_model, load_samples
from campar_ray.cfar.fit import CfarPredictor
from campar_ray.config import EXPORT_FORMATS
from campar_ray.decision import CALIBRATED, FIXED, Calibration, cfar_logits, prediction_logits
from campar_ray.model import ParModel
from campar_ray.model.inputs import normalize

FORMATS = EXPORT_FORMATS
TOLERANCE = 1e-4
METADATA_NAME = "campar.json"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_EXTRA = "pip install -e '.[onnx]' in the checkout (onnx, onnxscript, onnxruntime)"


class ExportError(RuntimeError):
    """An export that cannot be made, or whose output disagrees with PyTorch."""


@dataclass(frozen=True)
class ExportReport:
    path: str
    format: str
    max_abs_diff: dict[str, float]
    """Input kind (``random``, ``real``) -> largest |exported - PyTorch| probability."""

    def summary(self) -> str:
        """What ``campar export`` prints: the file and its parity with PyTorch."""
        diffs = ", ".join(f"{kind} inputs {diff:.1e}" for kind, diff in self.max_abs_diff.items())
        return (
            f"exported {self.format} to {self.path}; largest difference from PyTorch's "
            f"probabilities: {diffs} (tolerance {TOLERANCE:g})"
        )


class CfarModule(nn.Module):
    """CFAR (dictionary or fold-in lookup, then fc2) on stage-1 prediction logits, in torch."""

    def __init__(self, cfar: CfarPredictor):
        super().__init__()
        estimator = cfar.estimator
        self.lookup = estimator.lookup
        self.alpha = float(estimator.als.alpha)
        self.p_t = float(estimator.als.threshold)
        self.lam = float(estimator.als.lam)
        y = np.asarray(estimator.Y, dtype=np.float64)
        self.register_buffer(
            "keys", torch.as_tensor(estimator.dictionary.keys, dtype=torch.float32)
        )
        table = np.asarray(estimator.dictionary.values, dtype=np.float64) @ y.T
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))
        self.register_buffer("Y", torch.as_tensor(y))
        self.fc2 = nn.Linear(2 * y.shape[0], y.shape[0])
        self.fc2.load_state_dict(cfar.head.linear.state_dict())

    def reconstruct(self, r: Tensor) -> Tensor:
        """r_hat (N x M) for confidences r (N x M)."""
        if self.lookup == "dictionary":
            distance = (r.unsqueeze(1) - self.keys.unsqueeze(0)).pow(2).sum(-1)  # N x K
            return self.table[distance.argmin(dim=1)]
        r64 = r.double()
        p = (r >= self.p_t).double()
        c = 1.0 + self.alpha * r64
        eye = torch.eye(self.Y.shape[1], dtype=torch.float64, device=r.device)
        lhs = torch.einsum("nm,md,me->nde", c, self.Y, self.Y) + self.lam * eye
        rhs = (c * p) @ self.Y
        factors = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1)
        return (factors @ self.Y.T).float()

    def forward(self, logits: Tensor) -> Tensor:
        """The final logits fc2(concat(r_hat, l)) (``decision.refine``)."""
        r_hat = self.reconstruct(torch.sigmoid(logits))
        return self.fc2(torch.cat([r_hat, logits], dim=1))


class ExportedPredictor(nn.Module):
    """Normalised images in, final probabilities out: the whole predictor as one module."""

    def __init__(
        self,
        model: ParModel,
        predict_from: str,
        cfar: CfarPredictor | None,
        calibration: Calibration | None = None,
    ):
        super().__init__()
        self.model = model
        self.predict_from = predict_from
        self.cfar = None if cfar is None else CfarModule(cfar)
        offsets = np.zeros(0) if calibration is None else calibration.array
        self.calibrated = calibration is not None
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.float32))

    def forward(self, images: Tensor) -> Tensor:
        output = self.model(images)
        if self.cfar is None:
            logits = prediction_logits(output, self.predict_from)
        else:
            logits = self.cfar(cfar_logits(output))
        if self.calibrated:
            logits = logits - self.offsets
        return torch.sigmoid(logits)


def export_model(
    model: str,
    format: str,
    out: str,
    *,
    images: Sequence[Image] | np.ndarray | None = None,
    tolerance: float = TOLERANCE,
    progress: bool = True,
) -> ExportReport:
    """Export the bundle or run at ``model`` to the file ``out`` and check its parity.

    ``images`` (uint8 ``H x W x 3`` arrays of any size, or image paths) are the real inputs
    of the check; by default the bundle's own ``samples.npz`` serves. Raises
    :class:`ExportError` when the exported output differs from PyTorch by more than
    ``tolerance``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    predictor = load_predictor(model)
    if format == "onnx":
        _require_onnx(predictor)
    module = ExportedPredictor(
        predictor.model, predictor.predict_from, predictor.cfar, predictor.calibration
    ).eval()
    height, width = predictor.image_size
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    metadata = describe(predictor)
    if format == "torchscript":
        run = _export_torchscript(module, example, out, metadata)
    else:
        run = _export_onnx(module, example, out, metadata)
    inputs = _check_inputs(predictor, model, images)
    diffs = {name: parity(run, predictor, x) for name, x in inputs.items()}
    if progress:
        for name, diff in diffs.items():
            print(f"[export] {format} parity on {name} inputs: max abs diff {diff:.2e}", flush=True)
    worst = max(diffs.values())
    if not worst <= tolerance:
        raise ExportError(
            f"{format} export {out} differs from PyTorch by {worst:.3e} (> {tolerance:g})"
        )
    return ExportReport(out, format, diffs)


def load_predictor(model: str) -> ParPredictor:
    """The predictor an export is made of: calibrated when the model has a calibration (a run,
    or a bundle with ``calibration.json``), else raw with the 0.5 threshold."""
    return load_model(model, CALIBRATED if has_calibration(model) else FIXED.protocol)


def describe(predictor: ParPredictor) -> dict[str, Any]:
    """What a consumer of the exported file needs to feed it and read its output."""
    return {
        "attributes": list(predictor.attributes),
        "eval_attributes": list(predictor.eval_attributes),
        "threshold": predictor.threshold,
        "threshold_source": predictor.threshold_source,
        "calibration": None
        if predictor.calibration is None
        else {
            "offsets": list(predictor.calibration.offsets),
            "source": predictor.calibration.source,
            "applied": "inside the exported module: sigmoid(final logits - offsets)",
        },
        "input": "float32 N x 3 x H x W: RGB resized to image_size with interpolation (Pillow's "
        "filter of that name, antialiased), scaled to [0, 1], minus mean, divided by std",
        "image_size": list(predictor.image_size),
        "interpolation": predictor.interpolation,
        "mean": list(predictor.model.backbone.mean),
        "std": list(predictor.model.backbone.std),
        "output": "float32 N x M probabilities, attributes in the order above",
        "cfar": None if predictor.cfar is None else predictor.cfar.estimator.lookup,
        "predict_from": predictor.predict_from,
    }


def parity(run: Callable[[Tensor], np.ndarray], predictor: ParPredictor, x: Tensor) -> float:
    """Largest absolute difference between an exported module and the PyTorch predictor."""
    expected = predictor.probabilities(predictor.stage1(x))
    return float(np.max(np.abs(run(x) - expected)))


def _check_inputs(
    predictor: ParPredictor, model: str, images: Sequence[Image] | np.ndarray | None
) -> dict[str, Tensor]:
    """A random batch (3 images: not the traced batch size) and real images when available."""
    height, width = predictor.image_size
    generator = torch.Generator().manual_seed(1)
    inputs = {"random": torch.randn(3, 3, height, width, generator=generator)}
    real = load_samples(model) if images is None else images
    if real is not None and len(real):
        encoder = predictor.model.backbone
        inputs["real"] = normalize(
            predictor.prepare(list(real)), mean=encoder.mean, std=encoder.std
        )
    return inputs


def _export_torchscript(
    module: nn.Module, example: Tensor, out: str, metadata: dict[str, Any]
) -> Callable[[Tensor], np.ndarray]:
    with warnings.catch_warnings():
        # PyTorch marks TorchScript deprecated in favour of torch.export; the format is still
        # what libtorch (C++) and most serving stacks load, and the one asked for here.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        # Tracing freezes the Python branches on H x W (fusion's resizing): the exported file
        # takes the bundle's input size only, as documented; the batch axis stays dynamic.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, out, _extra_files={METADATA_NAME: json.dumps(metadata)})
        loaded = torch.jit.load(out, map_location="cpu")

    def run(x: Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(x).numpy()

    return run


def _require_onnx(predictor: ParPredictor) -> None:
    if predictor.cfar is not None and predictor.cfar.estimator.lookup == "fold-in":
        raise ExportError(
            "ONNX has no linear-solve operator, so CFAR fold-in cannot be exported to ONNX; "
            "export with format 'torchscript', or fit CFAR with cfar.lookup=dictionary"
        )
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: {ONNX_EXTRA}")


def _export_onnx(
    module: nn.Module, example: Tensor, out: str, metadata: dict[str, Any]
) -> Callable[[Tensor], np.ndarray]:
    import onnx
    import onnxruntime

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        module,
        (example,),
        out,
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes={"images": {0: batch}},
        dynamo=True,
        external_data=False,
    )
    proto = onnx.load(out)
    onnx.helper.set_model_props(proto, {METADATA_NAME: json.dumps(metadata)})
    onnx.save(proto, out)
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> np.ndarray:
        return session.run(None, {"images": x.numpy()})[0]

    return run
