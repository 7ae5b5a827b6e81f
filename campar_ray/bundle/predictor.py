"""A trained network (+ CFAR, + calibration) that turns images into attribute decisions.

:class:`ParPredictor` is what :func:`campar_ray.bundle.load_model` returns for a bundle or a
run directory, so evaluation, prediction and export share one inference path. Everything
after the network's logits is :mod:`campar_ray.decision`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from campar_ray.cfar.fit import CfarPredictor
from campar_ray.config import Config
from campar_ray.data.images import image_pixels, read_image
from campar_ray.data.transforms import resize
from campar_ray.decision import Calibration, Threshold, calibrated_probabilities, final_logits
from campar_ray.model import ParModel, ParOutput, Scorer, resolve_inputs

Image = np.ndarray | PIL.Image.Image | str | os.PathLike
"""One image for :meth:`ParPredictor.predict_proba`: a path or URI, a Pillow image, or an
H x W x 3 uint8 RGB array (``np.asarray`` of an RGB Pillow image)."""
Images = Image | Sequence[Image]
"""One image, a list of them, or an N x H x W x 3 uint8 array."""
ACCEPTED = "a path, a PIL image or an H x W x 3 uint8 RGB array"


class ParPredictor:
    """A trained network (+ CFAR, + calibration) that turns images into attribute probabilities.

    ``predict_proba`` takes paths and URIs, Pillow images and decoded images (``H x W x 3``
    uint8 RGB arrays), of any size, one or a list; they are decoded, resized and normalised
    exactly as in training, so an image gives the same probabilities whichever form it
    comes in. ``score`` is what batch prediction calls on decoded batches, in its actors or
    in process. Both go through the network's
    :class:`~campar_ray.model.Scorer`, as stage 1's logits do. Lower-level pieces (``stage1``
    on a normalised batch, ``probabilities`` of its output) serve evaluation and export,
    which need the CAMs or a traced module. With a ``calibration`` (the ``calibrated``
    protocol) the probabilities are the calibrated ones and the threshold is 0.5.
    """

    def __init__(
        self,
        model: ParModel,
        config: Config,
        attributes: Sequence[str],
        eval_attributes: Sequence[str],
        threshold: Threshold,
        cfar: CfarPredictor | None,
        calibration: Calibration | None = None,
    ):
        self.scorer = Scorer(model)
        self.config = resolve_inputs(config)
        """The run's config, its ``data.interpolation`` the encoder's filter (older runs saved
        ``encoder``)."""
        self.attributes = tuple(attributes)
        self.eval_attributes = tuple(eval_attributes)
        self.decision = threshold
        """The threshold ``decide``/``predict`` apply, with its protocol and source."""
        self.cfar = cfar
        self.calibration = calibration
        """Per-attribute offsets applied to the final logits (``calibrated`` protocol only)."""

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
    def interpolation(self) -> str:
        """The filter images are resized with: the encoder's own (``data.interpolation``)."""
        return self.config.data.interpolation

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
        """Decode (paths, Pillow images) and resize every image: uint8 ``N x H x W x 3`` on
        the CPU. A Pillow image goes through the decoder's own conversion and resize
        (:func:`~campar_ray.data.images.image_pixels`), so it gives its file's pixels."""
        batch = np.zeros((len(images), *self.image_size, 3), dtype=np.uint8)
        for index, image in enumerate(images):
            if isinstance(image, np.ndarray):
                if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                    raise ValueError(
                        f"image {index} must be an H x W x 3 uint8 array, got "
                        f"{image.dtype} {image.shape} (a PIL image's .convert('RGB') gives one)"
                    )
                batch[index] = resize(image, self.image_size, self.interpolation)
            elif isinstance(image, PIL.Image.Image):
                batch[index] = image_pixels(
                    image, size=self.image_size, interpolation=self.interpolation
                )
            elif isinstance(image, str | os.PathLike):
                batch[index] = read_image(
                    os.fspath(image), "", size=self.image_size, interpolation=self.interpolation
                )
            else:
                raise TypeError(f"image {index} must be {ACCEPTED}, got {type(image).__name__}")
        return torch.from_numpy(batch)

    def stage1(self, x: Tensor, return_cams: bool = False) -> ParOutput:
        """The network on a normalised ``N x 3 x H x W`` batch (eval mode, no gradients)."""
        return self.scorer.forward(x, return_cams=return_cams)

    def probabilities(self, output: ParOutput) -> np.ndarray:
        """Final probabilities (N x M float32): stage 1 + CFAR when present, else stage 1;
        calibrated when the predictor has a calibration."""
        return calibrated_probabilities(
            final_logits(output, self.predict_from, self.cfar), self.calibration
        )

    def score(self, pixels: Tensor) -> dict[str, np.ndarray]:
        """Final probabilities (``probs``, N x M) of a decoded, resized uint8 batch."""
        return {"probs": self.probabilities(self.scorer(pixels))}

    def predict_proba(self, images: Images, batch_size: int = 32) -> np.ndarray:
        """Probabilities of every attribute (N x M, in ``attributes`` order) of one image
        (N = 1) or a list of them (:data:`Image`), or of an N x H x W x 3 uint8 array."""
        listed = as_image_list(images)
        chunks = [np.zeros((0, len(self.attributes)), dtype=np.float32)]
        for start in range(0, len(listed), batch_size):
            chunks.append(self.score(self.prepare(listed[start : start + batch_size]))["probs"])
        return np.concatenate(chunks)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Which attributes are present (N x M bool): probability >= its ``threshold``."""
        return np.asarray(probs) >= np.asarray(self.threshold)

    def predict(self, images: Images, batch_size: int = 32) -> list[list[str]]:
        """Names of the attributes predicted present (probability >= ``threshold``)."""
        present = self.decide(self.predict_proba(images, batch_size))
        return [[self.attributes[j] for j in np.flatnonzero(row)] for row in present]


def as_image_list(images: Images) -> list[Image]:
    """``images`` as a list of single images: one image becomes a list of one, an
    N x H x W x 3 array a list of N; a type that is none of these is refused in one line."""
    if isinstance(images, str | os.PathLike | PIL.Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Sequence):
        return list(images)
    raise TypeError(f"images must be {ACCEPTED}, or a list of them, got {type(images).__name__}")
