"""Encoders that return their last three stages, for any torchvision ResNet/ConvNeXt or timm model.

Feature fusion needs three levels (strides 8, 16, 32 on ResNet-50: layer2..4), the head needs
the deepest. Widths are read from the network itself (a dummy forward for torchvision,
``feature_info`` for timm), never from a table keyed by model name, so a new depth or width of
a supported family works without code changes.

Weights: ``none`` never downloads; a torchvision weights name (``IMAGENET1K_V2``, ``DEFAULT``)
downloads because the user asked for it; anything else is a local file or URI holding a state
dict in the encoder's own key space (the classifier's keys, e.g. ``fc.*``, are ignored).
A state dict is accepted only if it initialises every parameter of the encoder exactly.
"""

from __future__ import annotations

import inspect
import io
import pickle
from collections.abc import Iterable, Mapping

import torch
import torchvision
from torch import Tensor, nn

from campar_ray import storage

TIMM_PREFIX = "timm:"
LEVELS = 3
_PROBE_SIZE = 64
"""Side of the dummy image used to read torchvision widths: 2 x 2 at stride 32."""


class WeightsError(ValueError):
    """A weights value or file that cannot be applied to the chosen backbone."""


class Backbone(nn.Module):
    """Base: ``forward(x)`` returns the last three stage outputs, shallow to deep, NCHW."""

    channels: tuple[int, ...]
    """Widths of the three levels, read from the network."""


class TorchvisionBackbone(Backbone):
    """A torchvision classifier without its head, run stage by stage with three taps.

    The kept modules keep their torchvision names, so this module's state dict is the
    classifier's state dict minus the head: torchvision weight files load unchanged.
    """

    def __init__(self, network: nn.Module, order: tuple[str, ...], taps: tuple[str, ...]):
        super().__init__()
        for name in dict.fromkeys(path.split(".")[0] for path in order):
            self.add_module(name, network.get_submodule(name))
        self._order = order
        self._taps = frozenset(taps)
        self.channels = _probe_channels(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = []
        for path in self._order:
            x = self.get_submodule(path)(x)
            if path in self._taps:
                levels.append(x)
        return levels


class TimmBackbone(Backbone):
    """A timm ``features_only`` model tapped at its last three feature levels."""

    def __init__(self, name: str):
        super().__init__()
        import timm

        try:
            self.body = timm.create_model(
                name, pretrained=False, features_only=True, out_indices=tuple(range(-LEVELS, 0))
            )
        except Exception as error:  # timm raises several types; all mean "cannot tap this model"
            raise ValueError(
                f"timm model {name!r} cannot give {LEVELS} feature levels "
                f"(features_only=True): {error}. List models with timm.list_models()."
            ) from error
        # Some timm families (e.g. MambaOut) emit channels-last NHWC maps; the head wants NCHW.
        self._nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        self.channels = tuple(self.body.feature_info.channels())
        _check_spatial(self, name, getattr(self.body, "pretrained_cfg", {}).get("input_size"))

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = self.body(x)
        return [level.permute(0, 3, 1, 2) for level in levels] if self._nhwc else list(levels)


def build_backbone(name: str, weights: str = "none") -> Backbone:
    """The encoder called ``name`` (torchvision name or ``timm:<name>``) with ``weights``."""
    if name.startswith(TIMM_PREFIX):
        backbone = TimmBackbone(name[len(TIMM_PREFIX) :])
        if weights.lower() != "none":
            load_weights(backbone.body, read_state_dict(_existing_file(weights, name, ())))
        return backbone
    family = _torchvision_family(name)
    weight_names = tuple(torchvision.models.get_model_weights(name).__members__)
    named = weights in weight_names
    network = torchvision.models.get_model(name, weights=weights if named else None)
    backbone = TorchvisionBackbone(network, *_STAGE_PLANS[family](network))
    if not named and weights.lower() != "none":
        load_weights(backbone, read_state_dict(_existing_file(weights, name, weight_names)))
    return backbone


def torchvision_backbones() -> list[str]:
    """Every torchvision model name this module can tap (its family has a stage plan)."""
    return [name for name in _torchvision_models() if _family_of(name) in _STAGE_PLANS]


def read_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from a file or URI: plain, or under ``state_dict`` / ``model``."""
    try:
        loaded = torch.load(
            io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise WeightsError(f"cannot read weights file {path}: {error}") from error
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


def _resnet_plan(network: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    order = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return order, order[-3:]


def _convnext_plan(network: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # features = [stem, stage, downsample, stage, downsample, stage, downsample, stage]
    order = tuple(f"features.{i}" for i in range(len(network.features)))
    return order, order[-5::2]


_STAGE_PLANS = {
    torchvision.models.ResNet: _resnet_plan,
    torchvision.models.ConvNeXt: _convnext_plan,
}


def _torchvision_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _family_of(name: str) -> type:
    return inspect.signature(torchvision.models.get_model_builder(name)).return_annotation


def _torchvision_family(name: str) -> type:
    if name not in _torchvision_models():
        raise ValueError(
            f"unknown backbone {name!r}; valid: {', '.join(torchvision_backbones())}, "
            f"or {TIMM_PREFIX}<name> for a timm model"
        )
    family = _family_of(name)
    if family not in _STAGE_PLANS:
        raise ValueError(
            f"backbone {name!r} ({family.__name__}) has no stage taps here; valid: "
            f"{', '.join(torchvision_backbones())}, or {TIMM_PREFIX}<name> for a timm model"
        )
    return family


def _existing_file(weights: str, backbone: str, weight_names: tuple[str, ...]) -> str:
    if storage.exists(weights):
        return weights
    names = f"a weights name ({', '.join(weight_names)}), " if weight_names else ""
    raise WeightsError(
        f"weights {weights!r} for backbone {backbone!r}: expected 'none', {names}"
        "or an existing file/URI with a state dict"
    )


@torch.no_grad()
def _probe_channels(backbone: nn.Module) -> tuple[int, ...]:
    """Widths from one tiny forward in eval mode (training mode would move BN statistics)."""
    backbone.eval()
    levels = backbone(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE))
    backbone.train()
    return tuple(level.shape[1] for level in levels)


@torch.no_grad()
def _check_spatial(backbone: TimmBackbone, name: str, input_size: tuple[int, ...] | None) -> None:
    """Refuse a timm model whose features are not B x C x H x W maps of the declared widths."""
    size = tuple(input_size[-2:]) if input_size else (_PROBE_SIZE, _PROBE_SIZE)
    backbone.eval()
    levels = backbone(torch.zeros(1, 3, *size))
    backbone.train()
    shapes = [tuple(level.shape) for level in levels]
    if len(levels) != LEVELS or any(
        len(shape) != 4 or shape[1] != width
        for shape, width in zip(shapes, backbone.channels, strict=False)
    ):
        raise ValueError(
            f"timm model {name!r} gives features of shapes {shapes}, not {LEVELS} spatial "
            f"B x C x H x W maps with widths {backbone.channels}; CAM-PAR needs spatial features"
        )


def _listing(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return f"{shown}, ... ({len(items) - limit} more)" if len(items) > limit else shown or "none"
