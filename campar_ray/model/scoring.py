"""A trained network back from its weights, and scored the one way every consumer scores it.

:func:`rebuild_network` is the only place a network is rebuilt from saved weights (stage-1
checkpoints, bundles, resume checks; :func:`load_network` reads them from a file first).
:class:`Scorer` is the only place uint8 images become stage-1 outputs: stage 1's logits,
batch prediction and the bundle's :class:`~campar_ray.bundle.ParPredictor` all score through
it, so they agree bit for bit on the same pixels. :class:`ScoringActor` is the Ray Data
actor class both stage 1's logits writing and batch prediction run it in (the class needs no
Ray itself, so prediction reaches it without importing the trainer). Plain PyTorch: no Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from campar_ray.artifacts import ArtifactError, load_tensors
from campar_ray.config import ModelConfig
from campar_ray.model.campar import ParModel, ParOutput, build_model
from campar_ray.model.inputs import normalize


class WeightsMismatch(ValueError):
    """Saved weights that are not the state dict of the network a config builds."""


def rebuild_network(config: ModelConfig, attributes: int, state: Any) -> ParModel:
    """The network ``config`` builds for ``attributes`` outputs, holding the trained ``state``
    (CPU, eval mode).

    Pretrained encoder weights are never loaded (``state`` replaces them, so nothing is
    downloaded). Raises :class:`WeightsMismatch` naming what does not fit: missing,
    unexpected and other-shaped keys, or an object that is no state dict at all.
    """
    if not isinstance(state, Mapping):
        raise WeightsMismatch(f"it holds a {type(state).__name__}, not a state dict")
    network = build_model(dataclasses.replace(config, weights="none"), attributes)
    expected = network.state_dict()
    problems = {
        "missing": [key for key in expected if key not in state],
        "unexpected": [key for key in state if key not in expected],
        "other shape": [
            key
            for key, value in state.items()
            if key in expected and getattr(value, "shape", None) != expected[key].shape
        ],
    }
    summary = "; ".join(
        f"{len(keys)} {kind}, e.g. {keys[0]}" for kind, keys in problems.items() if keys
    )
    if summary:
        raise WeightsMismatch(summary)
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise WeightsMismatch(str(error).splitlines()[0]) from None
    return network.eval()


def load_network(config: ModelConfig, attributes: int, weights: str) -> ParModel:
    """:func:`rebuild_network` with the state dict of a weights file (path or URI).

    The file is loaded as tensors only (:func:`~campar_ray.artifacts.load_tensors` refuses
    a pickle that runs code); weights of another network raise one
    :class:`~campar_ray.artifacts.ArtifactError` naming the file and what does not fit.
    """
    try:
        return rebuild_network(config, attributes, load_tensors(weights))
    except WeightsMismatch as mismatch:
        raise ArtifactError(
            f"{weights} does not hold the weights of a {config.backbone} network with "
            f"{attributes} attributes: {textwrap.shorten(str(mismatch), 200, placeholder=' ...')}"
        ) from None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (no scaler needed), fp16 on GPU (paired with a GradScaler)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


class Scorer:
    """A network in eval mode on one device: uint8 ``N x H x W x 3`` images in, outputs out.

    Images are normalised where they are scored (on the GPU when there is one), optionally
    in the channels-last layout and under autocast (``amp``), as in training.
    """

    def __init__(
        self,
        network: ParModel,
        *,
        device: str | torch.device = "cpu",
        amp: bool = False,
        channels_last: bool = False,
    ):
        self.network = network.eval()
        self.amp = amp
        self.channels_last = channels_last
        self.to(device)

    def to(self, device: str | torch.device) -> Scorer:
        self.device = torch.device(device)
        self.network.to(self.device)
        return self

    def __call__(self, pixels: Tensor, return_cams: bool = False) -> ParOutput:
        """The network's outputs on a uint8 batch, in inference mode (bf16 CPU kernels under
        ``amp`` differ between inference mode and ``no_grad``: stage 1's logits use this)."""
        with torch.inference_mode(), autocast(self.device, self.amp):
            x = normalize(
                pixels.to(self.device),
                channels_last=self.channels_last,
                mean=self.network.backbone.mean,
                std=self.network.backbone.std,
            )
            return self.network(x, return_cams=return_cams)

    def forward(self, x: Tensor, return_cams: bool = False) -> ParOutput:
        """The network's outputs on an already normalised ``N x 3 x H x W`` batch (no
        gradients; ordinary tensors, which evaluation and export may use further)."""
        with torch.no_grad(), autocast(self.device, self.amp):
            return self.network(x.to(self.device), return_cams=return_cams)

    def score(self, pixels: Tensor) -> dict[str, np.ndarray]:
        """Stage-1 logits of a uint8 batch as float32 arrays: ``shared`` and, for a CAM-PAR
        head, ``specific`` (the columns of a logits file)."""
        output = self(pixels)
        columns = {"shared": output.shared, "specific": output.specific}
        return {name: v.float().cpu().numpy() for name, v in columns.items() if v is not None}


PASSED_ON = ("row", "valid", "error")
"""Decoded-batch columns a :class:`ScoringActor` hands on beside its scores."""


class ScoringActor:
    """A Ray Data actor: loads a scorer once, then scores decoded batches.

    ``load`` returns a :class:`~campar_ray.model.Scorer` (stage-1 logits) or anything with
    its ``to(device)`` and ``score(uint8 pixels) -> {name: N x K array}``, such as the
    bundle's :class:`~campar_ray.bundle.ParPredictor` (probabilities). Each named score
    comes back as a float32 column, NaN on the rows whose image could not be decoded.
    """

    def __init__(self, load: Callable[[], Any], *, use_gpu: bool):
        self.scorer = load().to(torch.device("cuda" if use_gpu else "cpu"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        valid = np.asarray(batch["valid"], dtype=bool)
        pixels = torch.from_numpy(np.ascontiguousarray(batch["image"][valid]))
        out = {name: batch[name] for name in PASSED_ON if name in batch}
        for name, scores in self.scorer.score(pixels).items():
            out[name] = np.full((len(valid), scores.shape[1]), np.nan, dtype=np.float32)
            out[name][valid] = scores
        return out
