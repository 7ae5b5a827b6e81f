"""A trained model as one directory that plain Python can load: no Ray, no run directory.

A bundle holds what inference needs and nothing else:

- ``model.pt``: the stage-1 state dict (``torch.save``, loaded with ``weights_only=True``);
- ``config.yaml``: the resolved config of the checkpoint (backbone, head, input size, ...);
- ``attributes.json``: attribute names and the evaluated ones;
- ``threshold.json``: the thresholds chosen on validation data, by protocol (``val``: one
  value, ``val-per-attribute``: one per attribute), each with where it came from; the
  ``0.5`` protocol needs none;
- ``calibration.json``: the per-attribute logit offsets of the ``calibrated`` protocol
  (:mod:`campar_ray.decision.calibration`), as the run directory holds them;
- ``cfar/``: the run's stage-2 artefacts (``.npz`` + ``cfar.json``), when it has them;
- ``samples.npz``: a few resized validation images (uint8), so that export can check
  parity on real inputs without the data set.

One job per module: :mod:`.predictor` (the :class:`ParPredictor` every consumer gets),
:mod:`.files` (the bundle's own files, read back checked) and :mod:`.load` (writing a bundle,
loading a bundle or a run directory). Everything is read through :mod:`campar_ray.storage`,
so bundles and runs may live in object stores.
"""

from campar_ray.bundle.files import load_samples, read_attributes, read_thresholds
from campar_ray.bundle.load import has_calibration, load_model, sample_images, save_bundle
from campar_ray.bundle.predictor import Image, ParPredictor

__all__ = [
    "Image",
    "ParPredictor",
    "has_calibration",
    "load_model",
    "load_samples",
    "read_attributes",
    "read_thresholds",
    "sample_images",
    "save_bundle",
]
