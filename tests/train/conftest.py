"""Shared fixtures of the pretraining tests: synthetic shards (with and without clean labels) and tiny configs.

Everything is real: Parquet shards written by the synthesizer, an MLflow sqlite store in a
temporary folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cromss_ray.config import PretrainConfig, load_config
from cromss_ray.data.shards import ShardWriter, iter_rows, open_shard
from cromss_ray.data.synth import synthesize

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "jobs" / "configs" / "pretrain_tiny.yaml"
LOCATIONS = 16
SIZE = 64


@pytest.fixture(scope="session")
def pretrain_locations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic 4-season locations of 64 x 64 px with noisy and clean labels."""
    out = tmp_path_factory.mktemp("pretrain-locations")
    synthesize(out, "pretrain", locations=LOCATIONS, size=SIZE, seed=3)
    return out


@pytest.fixture(scope="session")
def noisy_only_locations(pretrain_locations: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same locations stored without their clean labels (as real pretraining data come)."""
    out = tmp_path_factory.mktemp("noisy-only-locations")
    shards = sorted(str(path) for path in pretrain_locations.glob("*.parquet"))
    _, meta = open_shard(shards[0])
    with ShardWriter(out, meta.model_copy(update={"has_clean_label": False})) as writer:
        for shard in shards:
            for row in iter_rows(shard):
                writer.write({name: value for name, value in row.items() if name != "clean_label"})
    return out


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow sqlite store (with its registry) for the session."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def tiny_config(
    pretrain_locations: Path, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., PretrainConfig]:
    """``tiny_config(name, *overrides, data=...)``: ``jobs/configs/pretrain_tiny.yaml`` on the synthetic shards
    (or the shards in ``data``), tracked in the session's store, stored in the session's run folder,
    registered under ``name``."""
    storage = tmp_path_factory.mktemp("runs")

    def make(name: str, *overrides: str, data: Path = pretrain_locations) -> PretrainConfig:
        return load_config(
            PretrainConfig,
            TINY_CONFIG,
            [
                f"run.name={name}",
                f"run.storage_path={storage}",
                f"tracking.registry_name={name}",
                "run.validation_figures=2",
                "data.val_fraction=0.5",  # 7 of the 16 locations: an odd count split over 2 workers
                *overrides,
            ],
            data=str(data),
            tracking_uri=tracking_uri,
        )

    return make
