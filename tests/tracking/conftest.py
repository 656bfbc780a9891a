"""Shared fixtures of the tracking tests: one real MLflow sqlite store and one registered model.

Creating a sqlite store (schema migrations) and logging a model take seconds each, so
the tests share one store and one registered mid-fusion model, and keep their own
experiments and registered names apart with unique suffixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tracking_helpers import ENCODER, S2_BANDS, tiny_config, unique

from cromss_ray.config import PretrainConfig
from cromss_ray.method import CromSSNet, build_model
from cromss_ray.models.segmenter import product_input
from cromss_ray.tracking.pyfunc import log_pretrained_model
from cromss_ray.tracking.runs import RunTracker


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An absolute ``sqlite:////.../mlflow.db`` URI of a fresh store shared by the session."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@dataclass(frozen=True)
class Registered:
    """The model the session registered once, and where it went."""

    model: CromSSNet
    config: PretrainConfig
    name: str
    version: int
    run_id: str
    store: str
    example_codes: dict[str, np.ndarray]
    """The input example it was logged with: released v8 codes (1, bands, 64, 64), as a run on them gives it."""


@pytest.fixture(scope="session")
def registered(store: str) -> Registered:
    """A seeded mid-fusion resnet18 (13 S2 bands) logged in a finished run, registered as @best; its pyfunc
    takes the raw products, its input example is given in v8 codes (the storage of the released data)."""
    torch.manual_seed(0)
    model = build_model("mid", ENCODER, s2_bands=S2_BANDS).eval()
    config = tiny_config()
    rng = np.random.default_rng(9)
    codes = {"s1": rng.integers(0, 256, (1, 2, 64, 64)), "s2": rng.integers(0, 256, (1, S2_BANDS, 64, 64))}
    codes = {modality: image.astype(np.uint8) for modality, image in codes.items()}
    name = unique("cromss-mid-13b")
    with RunTracker.start(config, tracking_uri=store, experiment=unique("pretrain"), run_name="registered") as tracker:
        tracker.log_metrics({"val/s2/miou": 0.25}, epoch=1)
        version = log_pretrained_model(
            model,
            config,
            tracker=tracker,
            registry_name=name,
            aliases=["latest", "best"],
            input_example=codes,
            example_storage={modality: product_input(modality, "v8") for modality in codes},
            epoch=1,
            version_tags={"val/s2/miou": 0.25},
        )
    return Registered(model, config, name, version, tracker.run_id, store, codes)


@pytest.fixture
def artifact_root(store: str) -> Path:
    """The folder beside the store's database where experiments keep their artifacts."""
    return Path(store.removeprefix("sqlite:///")).parent / "mlartifacts"
