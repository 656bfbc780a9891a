"""Shared fixtures of the transfer tests: an MLflow store, synthetic downstream shards, a registered
pretrained model, and the transfer runs the tests inspect (the Ray cluster is the suite's ``ray_cluster``).

A Ray Train run takes tens of seconds on two cores, so the runs many tests inspect are session
fixtures: one frozen run from a registry alias on DW-like tiles, and one warm-up-then-fine-tuned
S1 run from a registry version on DFC2020-like patches. Their test tiles are larger than the
training crop, so the test split is scored on whole tiles, as ``cromss evaluate`` scores them.
The registered pretrained model is a fresh ``build_model`` network logged with the tracking
layer's own function, a real registry entry without a pretraining run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from finetune_helpers import (
    ENCODER,
    FROZEN_RUN_LR_FLOOR,
    PRETRAINED_BANDS,
    PRETRAINED_NAME,
    TEST_TILE,
    TILE,
    Pretrained,
    Shards,
    tiny_config,
)

from cromss_ray.config import PretrainConfig
from cromss_ray.data.synth import synthesize
from cromss_ray.method import build_model
from cromss_ray.tracking.pyfunc import log_pretrained_model
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.train.finetune import FinetuneResult, run_finetune


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh MLflow sqlite store (absolute URI) shared by the session."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _shards(root: Path, kind: str, seed: int) -> Shards:
    synthesize(root / "train", kind, locations=10, size=TILE, seed=seed)
    synthesize(root / "test", kind, locations=3, size=TEST_TILE, seed=seed + 100)
    return Shards(root / "train", root / "test")


@pytest.fixture(scope="session")
def dw_shards(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """SSL4EO-S12@DW-like tiles (9 classes, ignore 255): 10 of 32 px for training, 3 of 64 px for testing."""
    return _shards(tmp_path_factory.mktemp("dw"), "dw", seed=11)


@pytest.fixture(scope="session")
def dfc_shards(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """DFC2020-like patches (8 classes, ignore 255): 10 of 32 px for training, 3 of 64 px for testing."""
    return _shards(tmp_path_factory.mktemp("dfc2020"), "dfc2020", seed=21)


@pytest.fixture(scope="session")
def pretrained(store: str) -> Pretrained:
    """A seeded mid-fusion ResNet-18 on 9 S2 bands, registered as ``cromss-mid-9b`` with alias @best."""
    torch.manual_seed(3)
    model = build_model("mid", ENCODER, s2_bands=PRETRAINED_BANDS).eval()
    config = PretrainConfig.model_validate(
        {"model": {"fusion": "mid", "encoder": ENCODER}, "data": {"s2_bands": PRETRAINED_BANDS}}
    )
    with RunTracker.start(config, tracking_uri=store, experiment="cromss-pretrain", run_name="source") as tracker:
        version = log_pretrained_model(
            model, config, tracker=tracker, registry_name=PRETRAINED_NAME, aliases=["latest", "best"]
        )
    return Pretrained(model, PRETRAINED_NAME, version, tracker.run_id)


@pytest.fixture(scope="session")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ray Train storage for the session's runs."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def frozen_run(ray_cluster, store: str, storage: Path, dw_shards: Shards, pretrained: Pretrained) -> FinetuneResult:
    """U-Net on S2 from ``models:/cromss-mid-9b@best``, encoder frozen with its batch norm fixed, 2 epochs
    on 2 workers (DW-like), with the reference's CE + Dice and a cosine that reaches its floor after
    epoch 1 and holds it."""
    config = tiny_config(
        dw_shards,
        store,
        storage,
        f"model.init=models:/{pretrained.name}@best",
        "model.encoder_mode=frozen",
        "model.frozen_batch_norm=fixed",
        "optim.loss=ce+dice",
        f"optim.lr_floor={FROZEN_RUN_LR_FLOOR}",
        "optim.cosine_epochs=1",
    )
    return run_finetune(config)


@pytest.fixture(scope="session")
def warmup_run(ray_cluster, store: str, storage: Path, dfc_shards: Shards, pretrained: Pretrained) -> FinetuneResult:
    """DeepLabV3+ on S1 from ``models:/cromss-mid-9b/<version>`` on DFC2020-like patches: encoder frozen in
    epoch 1, fine-tuned in epoch 2."""
    config = tiny_config(
        dfc_shards,
        store,
        storage,
        f"model.init=models:/{pretrained.name}/{pretrained.version}",
        "model.branch=s1",
        "model.decoder=DeepLabV3Plus",
        "model.unfreeze_epoch=1",
        "optim.scheduler=step",
    )
    return run_finetune(config)
