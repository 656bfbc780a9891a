"""MLflow tracking for cromss-ray: runs, figures, the pyfunc models and the registry.

This is the only package that imports MLflow. The URI helpers load eagerly; everything
else loads on first access (``from cromss_ray.tracking import RunTracker``), so that the
``cromss`` CLI, which imports :mod:`cromss_ray.tracking.cli`, starts without MLflow and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from cromss_ray.tracking.uris import absolute_tracking_uri, redact_uri

_LAZY_EXPORTS = {
    "RunTracker": "cromss_ray.tracking.runs",
    "CromSSPyfunc": "cromss_ray.tracking.pyfunc",
    "log_pretrained_model": "cromss_ray.tracking.pyfunc",
    "ModelNotFoundError": "cromss_ray.tracking.model_uris",
    "load_pretrained": "cromss_ray.tracking.registry",
    "set_alias": "cromss_ray.tracking.registry",
}

__all__ = ["absolute_tracking_uri", "redact_uri", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
