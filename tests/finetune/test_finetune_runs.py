"""Transfer runs on a real local Ray cluster and MLflow store (spec 11)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from finetune_helpers import ENCODER, FROZEN_RUN_LR_FLOOR, PRETRAINED_BANDS, Pretrained, ResumedRun
from mlflow import MlflowClient

from cromss_ray.config import FinetuneConfig, build_config
from cromss_ray.data.schema import DFC2020_CLASSES, DW_CLASSES, S2_BAND_NAMES, s2_subset_names
from cromss_ray.method import build_model, encoder_state_dict, load_encoder_state
from cromss_ray.models.stored import FinetunedModel, transfer_network
from cromss_ray.tracking.registry import load_cromss_model
from cromss_ray.train.finetune import FinetuneResult, effective_config, metric_slug, resolve_init

pytestmark = pytest.mark.ray


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _registered(result: FinetuneResult | ResumedRun, store: str) -> FinetunedModel:
    loaded = load_cromss_model(f"models:/{result.registry_name}/{result.version}", tracking_uri=store)
    assert isinstance(loaded, FinetunedModel)
    return loaded


def test_frozen_encoder_weights_and_batchnorm_buffers_are_unchanged(
    frozen_run: FinetuneResult, store: str, pretrained: Pretrained
):
    tuned = _registered(frozen_run, store)
    source_encoder = encoder_state_dict(pretrained.model, "s2")
    assert any("running_mean" in key for key in source_encoder)
    _assert_same_state(tuned.model.encoder.state_dict(), source_encoder)


def test_frozen_run_takes_encoder_and_bands_from_the_source(frozen_run: FinetuneResult, store: str):
    tuned = _registered(frozen_run, store)
    assert tuned.config.model.encoder == ENCODER
    assert tuned.config.data.s2_bands == PRETRAINED_BANDS
    assert tuned.model.encoder.conv1.weight.shape[1] == PRETRAINED_BANDS
    assert tuned.meta.classes == DW_CLASSES and tuned.meta.nodata == 255
    assert frozen_run.registry_name == "cromss-ft-dw-unet"


def test_frozen_run_logs_its_recipe_validation_per_epoch_and_test_at_the_end(
    frozen_run: FinetuneResult, store: str, tmp_path: Path
):
    client = MlflowClient(store)
    rates = client.get_metric_history(frozen_run.run_id, "train/lr")
    assert [m.step for m in rates] == [1, 2]
    assert [m.value for m in rates] == pytest.approx([1e-3, FROZEN_RUN_LR_FLOOR]), "cosine to the floor, then held"
    params = client.get_run(frozen_run.run_id).data.params
    assert params["optim.loss"] == "ce+dice" and params["model.frozen_batch_norm"] == "fixed"
    assert all(math.isfinite(m.value) for m in client.get_metric_history(frozen_run.run_id, "train/loss"))
    history = client.get_metric_history(frozen_run.run_id, "val/s2/miou")
    assert [point.step for point in history] == [1, 2]
    assert all(0.0 <= point.value <= 1.0 for point in history)
    metrics = client.get_run(frozen_run.run_id).data.metrics
    for key in ("test/s2/oa", "test/s2/miou", "test/s2/mf1", "val/s2/oa", "val/s2/mf1", "train/loss", "epoch"):
        assert key in metrics, key
    assert frozen_run.test_metrics["test/s2/miou"] == pytest.approx(metrics["test/s2/miou"])
    per_class = [key for key in metrics if key.startswith("test/s2/iou/")]
    assert per_class and {key.rsplit("/", 1)[1] for key in per_class} <= {metric_slug(name) for name in DW_CLASSES}
    artifacts = {item.path for item in client.list_artifacts(frozen_run.run_id, "confusion/test")}
    assert {"confusion/test/s2.json", "confusion/test/s2.png"} <= artifacts
    stored = json.loads(
        Path(client.download_artifacts(frozen_run.run_id, "confusion/test/s2.json", str(tmp_path))).read_text()
    )
    assert stored["class_names"] == list(DW_CLASSES)
    assert stored["miou"] == pytest.approx(metrics["test/s2/miou"])


def test_registered_version_names_its_source(frozen_run: FinetuneResult, store: str, pretrained: Pretrained):
    client = MlflowClient(store, registry_uri=store)
    version = client.get_model_version(frozen_run.registry_name, str(frozen_run.version))
    assert f"{pretrained.name}/{pretrained.version}" in version.description
    assert "frozen" in version.description and "SSL4EO-S12@DW" in version.description
    assert version.tags["cromss.source_model"] == pretrained.name
    assert version.tags["cromss.source_version"] == str(pretrained.version)
    assert version.tags["cromss.source_run_id"] == pretrained.run_id
    assert version.tags["cromss.init_uri"] == f"models:/{pretrained.name}@best"
    run_tags = client.get_run(frozen_run.run_id).data.tags
    assert run_tags["cromss.source_model"] == pretrained.name
    assert run_tags["cromss.encoder_mode"] == "frozen" and run_tags["cromss.dataset"] == "dw"


def test_warmup_then_unfreezing_trains_the_s1_encoder(warmup_run: ResumedRun, store: str, pretrained: Pretrained):
    tuned = _registered(warmup_run, store)
    assert warmup_run.registry_name == "cromss-ft-dfc2020-deeplabv3plus"
    assert tuned.config.model.branch == "s1" and tuned.meta.classes == DFC2020_CLASSES
    source = encoder_state_dict(pretrained.model, "s1")
    trained = tuned.model.encoder.state_dict()
    assert not torch.equal(trained["conv1.weight"], source["conv1.weight"])
    assert not torch.equal(trained["bn1.running_mean"], source["bn1.running_mean"])
    assert math.isfinite(warmup_run.test_metrics["test/s1/miou"])
    tags = MlflowClient(store).get_run(warmup_run.run_id).data.tags
    assert tags["cromss.encoder_mode"] == "fine-tuned after a 1-epoch frozen warm-up"


def test_paper_checkpoint_initialises_the_encoder(tmp_path: Path):
    """The checkpoint path differs from a registry source only until the encoder state is resolved."""
    torch.manual_seed(5)
    released = build_model("late", ENCODER, s2_bands=13).eval()
    checkpoint = tmp_path / "cromss-late.ckpt"
    torch.save({"state_dict": {f"net.{key}": value for key, value in released.state_dict().items()}}, checkpoint)
    config = build_config(
        FinetuneConfig,
        {"model": {"init": str(checkpoint), "init_fusion": "late", "encoder": ENCODER, "decoder": "PSPNet"}},
    )
    initialisation = resolve_init(config)
    assert initialisation.source.kind == "checkpoint" and initialisation.source.fusion == "late"
    assert initialisation.source.label == "checkpoint cromss-late.ckpt"
    effective = effective_config(config, initialisation.source)
    assert effective.data.s2_bands == 13
    network = transfer_network(effective, classes=8)
    load_encoder_state(network, initialisation.encoder_state)
    _assert_same_state(network.encoder.state_dict(), encoder_state_dict(released, "s2"))


def test_registered_model_loads_as_an_mlflow_pyfunc(
    frozen_run: FinetuneResult, store: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store)
    model = mlflow.pyfunc.load_model(f"models:/{frozen_run.registry_name}/{frozen_run.version}", dst_path=str(tmp_path))
    images = np.random.default_rng(0).uniform(0, 0.3, size=(2, PRETRAINED_BANDS, 40, 70)).astype(np.float32)
    outputs = model.predict({"s2": images}, params={"tile": 64, "overlap": 16})
    assert outputs["classes"].shape == (2, 40, 70) and outputs["probabilities"].shape == (2, len(DW_CLASSES), 40, 70)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(outputs["classes"], outputs["probabilities"].argmax(axis=1))
    l2a_names = [name for name in S2_BAND_NAMES if name != "B10"]
    l2a = np.zeros((2, len(l2a_names), 40, 70), np.float32)
    l2a[:, [l2a_names.index(name) for name in s2_subset_names(PRETRAINED_BANDS)]] = images
    named = model.predict({"s2": l2a}, params={"tile": 64, "overlap": 16, "s2_bands": l2a_names})
    np.testing.assert_allclose(named["probabilities"], outputs["probabilities"], atol=1e-6)
