"""Helpers the transfer tests import: data classes of the session fixtures and config builders."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from cromss_ray.config import FinetuneConfig, load_config
from cromss_ray.method import CromSSNet

TINY_CONFIG = Path(__file__).parents[2] / "jobs" / "configs" / "finetune_tiny.yaml"
ENCODER = "resnet18"
PRETRAINED_BANDS = 9
PRETRAINED_NAME = "cromss-mid-9b"
TILE = 32
"""Side of the training tiles, and the crop (validation: centre crops of it)."""
TEST_TILE = 64
"""Side of the test tiles, which the test split scores whole."""
FROZEN_RUN_LR_FLOOR = 2e-4
"""The learning-rate floor of the session's frozen run, reached after its first epoch and held."""
_names = itertools.count()


@dataclass(frozen=True)
class Shards:
    """A downstream shard set: training tiles and a separate test split."""

    train: Path
    test: Path


@dataclass(frozen=True)
class Pretrained:
    """The registered pretrained model the transfer runs start from."""

    model: CromSSNet
    name: str
    version: int
    run_id: str


@dataclass(frozen=True)
class ResumedRun:
    """A transfer run whose first attempt failed after its first checkpoint and which ``cromss finetune``
    resumed: what the first attempt left behind, what the command printed, and the finished run."""

    config: FinetuneConfig
    """The first attempt's config; the command was given the same options."""
    failure: BaseException | None
    """What the first attempt raised (None if it finished)."""
    interrupted_checkpoint: str | None
    """The latest checkpoint in Ray's run folder after the first attempt."""
    interrupted_run_id: str
    interrupted_steps: list[int]
    """The epochs whose ``train/loss`` the first attempt logged."""
    registered_by_the_interrupted_run: list[str]
    """The model versions registered from the MLflow run before the command resumed it."""
    exit_code: int
    output: str
    """What the command printed."""
    run_id: str
    registry_name: str
    version: int
    test_metrics: dict[str, float]
    """The ``test/`` metrics logged in the MLflow run."""


def unique_name(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def tiny_config(shards: Shards, store: str, storage: Path, *overrides: str) -> FinetuneConfig:
    """``jobs/configs/finetune_tiny.yaml`` on ``shards`` (whole 32 px training tiles, batches of 2) with
    a test split, a fresh run name and ``overrides``."""
    return load_config(
        FinetuneConfig,
        TINY_CONFIG,
        [
            f"data.test_uri={shards.test}",
            f"data.crop={TILE}",
            "optim.batch_size=2",
            f"run.storage_path={storage}",
            f"run.name={unique_name('finetune')}",
            *overrides,
        ],
        data=str(shards.train),
        tracking_uri=store,
    )
