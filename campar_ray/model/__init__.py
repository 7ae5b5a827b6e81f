"""Stage-1 model: encoders with three taps, feature fusion, CAM-PAR/baseline heads, losses."""

from campar_ray.model.angles import feature_weight_angles
from campar_ray.model.backbone import (
    Backbone,
    TimmBackbone,
    build_backbone,
    check_backbone,
    encoder_interpolation,
    resolve_inputs,
    torchvision_backbones,
)
from campar_ray.model.campar import (
    HEADS,
    PREDICT_FROM,
    BaselineHead,
    CamParHead,
    ParModel,
    ParOutput,
    build_model,
    build_top,
    class_activation_maps,
)
from campar_ray.model.fusion import MultiLevelFusion
from campar_ray.model.losses import (
    attribute_weights,
    bce,
    init_bias_from_prior,
    positive_ratio,
    stage1_loss,
)
from campar_ray.model.pretrained import (
    PACKAGED_WEIGHTS,
    WeightsError,
    load_weights,
    read_state_dict,
)
from campar_ray.model.scoring import (
    Scorer,
    WeightsMismatch,
    autocast,
    load_network,
    rebuild_network,
)

__all__ = [
    "HEADS",
    "PACKAGED_WEIGHTS",
    "PREDICT_FROM",
    "Backbone",
    "BaselineHead",
    "CamParHead",
    "MultiLevelFusion",
    "ParModel",
    "ParOutput",
    "Scorer",
    "TimmBackbone",
    "WeightsError",
    "WeightsMismatch",
    "attribute_weights",
    "autocast",
    "bce",
    "build_backbone",
    "build_model",
    "build_top",
    "check_backbone",
    "class_activation_maps",
    "encoder_interpolation",
    "feature_weight_angles",
    "init_bias_from_prior",
    "load_network",
    "load_weights",
    "positive_ratio",
    "read_state_dict",
    "rebuild_network",
    "resolve_inputs",
    "stage1_loss",
    "torchvision_backbones",
]
