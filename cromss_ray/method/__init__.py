"""The CromSS method in pure PyTorch: networks, smoothing, confidences, selection, losses, metrics, noise diagnostics.

Section numbers in docstrings refer to ``docs/cromss-method.md``. This package imports
only torch, segmentation-models-pytorch, numpy and scipy.

The networks and the checkpoint helpers that build them load on first access
(``from cromss_ray.method import build_model``): segmentation-models-pytorch brings timm,
torchvision and torch's compiler, seconds of start-up that the data pipeline's Ray
processes and the Train controller, which need at most the smoothing prior, should not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cromss_ray.method.confidence import entangle, label_confidence, prediction_confidence
from cromss_ray.method.diagnostics import NoiseDiagnostics
from cromss_ray.method.losses import (
    CromSSLoss,
    SelectionMaps,
    SingleModalityLoss,
    consistency_loss,
    segmentation_loss,
    weighted_cross_entropy,
    weighted_dice,
    weighted_focal,
)
from cromss_ray.method.metrics import ConfusionMatrix
from cromss_ray.method.schedules import ramp, selection_ratio
from cromss_ray.method.selection import consistency_weights, selection_weights
from cromss_ray.method.smoothing import smoothed_target, smoothing_prior

if TYPE_CHECKING:
    from cromss_ray.method.checkpoints import encoder_state_dict, load_encoder_state, load_reference_checkpoint
    from cromss_ray.method.networks import (
        CromSSNet,
        LateFusionNet,
        MidFusionNet,
        PretrainNet,
        SingleModalityNet,
        build_model,
        build_segmentation_model,
        build_single_model,
        fused_probabilities,
    )

_LAZY_MODULES = {
    "cromss_ray.method.checkpoints": ["encoder_state_dict", "load_encoder_state", "load_reference_checkpoint"],
    "cromss_ray.method.networks": [
        "CromSSNet",
        "LateFusionNet",
        "MidFusionNet",
        "PretrainNet",
        "SingleModalityNet",
        "build_model",
        "build_segmentation_model",
        "build_single_model",
        "fused_probabilities",
    ],
}
_LAZY_EXPORTS = {name: module for module, names in _LAZY_MODULES.items() for name in names}

__all__ = [
    "ConfusionMatrix",
    "CromSSLoss",
    "CromSSNet",
    "LateFusionNet",
    "MidFusionNet",
    "NoiseDiagnostics",
    "PretrainNet",
    "SelectionMaps",
    "SingleModalityLoss",
    "SingleModalityNet",
    "build_model",
    "build_segmentation_model",
    "build_single_model",
    "consistency_loss",
    "consistency_weights",
    "encoder_state_dict",
    "entangle",
    "fused_probabilities",
    "label_confidence",
    "load_encoder_state",
    "load_reference_checkpoint",
    "prediction_confidence",
    "ramp",
    "selection_ratio",
    "segmentation_loss",
    "selection_weights",
    "smoothed_target",
    "smoothing_prior",
    "weighted_cross_entropy",
    "weighted_dice",
    "weighted_focal",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
