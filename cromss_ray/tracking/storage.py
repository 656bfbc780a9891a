"""The stored form of a pretrained network: ``model.pt`` (state dict) and ``config.yaml``.

The pyfunc model keeps these two files as its artifacts; :func:`load_network` rebuilds
the network from them with :func:`cromss_ray.method.build_model`, so no module is
pickled and nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from cromss_ray.config import ConfigError, PretrainConfig, build_config
from cromss_ray.method import CromSSNet, build_model

MODEL_NAME = "model"
"""The name a run logs its pyfunc model under (``runs:/<run id>/model``)."""
WEIGHTS_ARTIFACT = "weights"
CONFIG_ARTIFACT = "config"
SHARDS_ARTIFACT = "shard_metadata"
"""The artifact only fine-tuned models have: their training shards' metadata (:mod:`cromss_ray.tracking.finetuned`)."""
S1_BANDS = 2
"""Sentinel-1 VV and VH (spec 1); the config records only the S2 band count."""


def pretrain_part(config: PretrainConfig) -> PretrainConfig:
    """The :class:`PretrainConfig` fields of ``config`` (a Tune trial's config drops its sweep)."""
    dump = config.model_dump()
    return PretrainConfig.model_validate({key: dump[key] for key in PretrainConfig.model_fields})


def read_config(path: Path) -> PretrainConfig:
    """A stored ``config.yaml`` as a :class:`PretrainConfig`; errors name the file and key."""
    try:
        return build_config(PretrainConfig, yaml.safe_load(path.read_text()) or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def network_from_config(config: PretrainConfig) -> CromSSNet:
    """An untrained network with the architecture ``config`` describes (spec 1)."""
    return build_model(
        config.model.fusion,
        encoder=config.model.encoder,
        s1_bands=S1_BANDS,
        s2_bands=config.data.s2_bands,
        classes=config.model.classes,
    )


def load_network(weights: Path, config_file: Path) -> tuple[CromSSNet, PretrainConfig]:
    """The network stored as ``model.pt`` + ``config.yaml``, on the CPU, in eval mode."""
    config = read_config(config_file)
    network = network_from_config(config)
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.eval(), config


def check_matches_config(model: CromSSNet, config: PretrainConfig) -> None:
    """Raise a ValueError unless ``config`` rebuilds ``model``'s architecture."""
    stored = {
        "model.fusion": config.model.fusion,
        "model.encoder": config.model.encoder,
        "S1 bands": S1_BANDS,
        "data.s2_bands": config.data.s2_bands,
        "model.classes": config.model.classes,
    }
    actual = {
        "model.fusion": model.fusion,
        "model.encoder": model.encoder_name,
        "S1 bands": model.s1_bands,
        "data.s2_bands": model.s2_bands,
        "model.classes": model.classes,
    }
    differing = [
        f"{key}: config {stored[key]!r}, model {actual[key]!r}" for key in stored if stored[key] != actual[key]
    ]
    if differing:
        raise ValueError("the model does not match its config: " + "; ".join(differing))
