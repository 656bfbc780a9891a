"""Helpers shared by the tracking tests (imported by name; conftest modules are not importable)."""

from __future__ import annotations

import uuid

from cromss_ray.config import PretrainConfig, build_config

ENCODER = "resnet18"
S2_BANDS = 13


def tiny_config(**sections: dict) -> PretrainConfig:
    """A resnet18 pretraining config (13 S2 bands) with ``sections`` merged in."""
    tree = {"model": {"encoder": ENCODER}, "data": {"s2_bands": S2_BANDS}}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return build_config(PretrainConfig, tree)


def unique(prefix: str) -> str:
    """``prefix`` with a random suffix, for experiments and registered models of one test."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
