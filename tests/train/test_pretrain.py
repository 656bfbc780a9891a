"""A 2-worker CPU pretraining run on synthetic shards: tracked, checkpointed, registered, resumed.

One run of the tiny config (ResNet-18, 64 px, 2 epochs) is shared by the tests of this
module; the last test resumes it to 3 epochs, so it stays last. The run without clean labels
is the session's run of the noisy-only shards (``killed_worker_run`` in conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from cromss_ray.cli import main
from cromss_ray.config import ConfigError, PretrainConfig, to_yaml
from cromss_ray.data.shards import iter_rows
from cromss_ray.data.storage import scan_shards
from cromss_ray.data.transforms import HashSplit, sample_rng, stable_hash
from cromss_ray.method import build_model
from cromss_ray.method.losses import MODALITIES
from cromss_ray.train.pretrain import NOISE_METRICS, PretrainResult, build_trainer, run_pretrain

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RUN_NAME = "cromss-test-pretrain"
EPOCH_KEYS = (
    "epoch",
    "train/loss",
    "train/loss/ce/s1",
    "train/loss/dice/s2",
    "train/loss/consistency",
    "train/s1/selected_share",
    "train/s2/selected_share",
    "train/s1/confidence_pred",
    "train/lr",
    "val/loss",
    "val/s1/miou",
    "val/s2/oa",
    "val/fused/miou",
    "val_clean/s1/oa",
    "val_clean/s2/miou",
    "val_clean/fused/mf1",
    "train/nonfinite_steps",
    "data/skipped_rows",
)

PREDICT_IN_FRESH_PROCESS = """
import json, sys
import mlflow
import numpy as np

model = mlflow.pyfunc.load_model(f"models:/{sys.argv[1]}@latest", dst_path=sys.argv[3])
rng = np.random.default_rng(0)
out = model.predict({
    "s1": rng.random((2, 2, 40, 36), dtype=np.float32),
    "s2": rng.random((2, int(sys.argv[2]), 40, 36), dtype=np.float32),
})
example = model.input_example
from_example = model.predict(example)
print(json.dumps({
    "classes": list(out["classes"].shape),
    "range": [int(out["classes"].min()), int(out["classes"].max())],
    "probabilities": list(out["probabilities"].shape),
    "example": {key: [list(value.shape), float(value.min()), float(value.max())] for key, value in example.items()},
    "example_classes": list(from_example["classes"].shape),
}))
"""


NO_ROTATION = "data.rotation_probability=0"
"""Flips keep a tile's label counts, a rotation by any angle resamples them: this module's runs
leave rotations out so that the training base rate can be counted exactly from the shards."""


@pytest.fixture(scope="module")
def first_run(ray_cluster: None, tiny_config) -> tuple[PretrainConfig, PretrainResult]:
    config = tiny_config(RUN_NAME, NO_ROTATION)
    return config, run_pretrain(config)


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, folder: str = "") -> set[str]:
    paths = set()
    for entry in client.list_artifacts(run_id, folder or None):
        paths |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return paths


def held_out_locations(config: PretrainConfig) -> int:
    ids = scan_shards(config.data.uri).read_ids()
    split = HashSplit.for_ids(ids, config.data.val_fraction)
    return sum(split.is_val(row_id) for row_id in ids)


def test_every_epoch_is_reported_and_logged_with_its_epoch(first_run, tracking_uri: str) -> None:
    config, outcome = first_run
    client = MlflowClient(tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cromss-pretrain"
    assert run.data.params["model.encoder"] == "resnet18"
    assert run.data.params["scaling.num_workers"] == "2"
    for key in EPOCH_KEYS:
        assert steps(client, outcome.run_id, key) == [1, 2], key
    assert [m.value for m in client.get_metric_history(outcome.run_id, "epoch")] == [1.0, 2.0]
    assert outcome.result.metrics["epoch"] == 2
    assert set(EPOCH_KEYS) <= set(outcome.result.metrics)
    assert outcome.start_epoch == 0
    assert 0.0 <= outcome.metrics["train/s1/selected_share"] <= 1.0
    assert outcome.metrics["train/selection/ratio"] < 1.0, "the 2-epoch ramp must have started selecting"
    for key in ("train/nonfinite_steps", "data/skipped_rows"):
        assert [m.value for m in client.get_metric_history(outcome.run_id, key)] == [0.0, 0.0], key


def right_labels(config: PretrainConfig, season_of: Callable[[str], int]) -> dict[str, tuple[int, int]]:
    """Per location: (right noisy labels, labelled pixels) of the season ``season_of(id)`` picks, whole tile."""
    counts = {}
    for shard in sorted(Path(config.data.uri).glob("*.parquet")):
        for row in iter_rows(str(shard)):
            season = season_of(row["id"])
            noisy, clean = row["label"][season], row["clean_label"][season]
            valid = (noisy < config.model.classes) & (clean < config.model.classes)
            counts[row["id"]] = (int(np.sum(valid & (noisy == clean))), int(np.sum(valid)))
    return counts


def test_noise_diagnostics_of_both_branches_are_logged_every_epoch(first_run, tracking_uri: str) -> None:
    config, outcome = first_run
    client = MlflowClient(tracking_uri)
    history = {
        f"{split}/{branch}/{name}": client.get_metric_history(outcome.run_id, f"{split}/{branch}/{name}")
        for split in ("train", "val")
        for branch in MODALITIES
        for name in NOISE_METRICS
    }
    for key, metrics in history.items():
        assert sorted(metric.step for metric in metrics) == [1, 2], key
        assert all(0.0 <= metric.value <= 1.0 for metric in metrics), key
    split = HashSplit.for_ids(scan_shards(config.data.uri).read_ids(), config.data.val_fraction)
    # Validation: every held-out 64 px tile once, in the season its id fixes.
    held_out = right_labels(config, lambda row_id: stable_hash(row_id, "val-season") % 4)
    right, labelled = np.sum([counts for row_id, counts in held_out.items() if split.is_val(row_id)], axis=0)
    for branch in MODALITIES:
        for metric in history[f"val/{branch}/base_rate"]:
            assert metric.value == pytest.approx(right / labelled, rel=1e-12)
    # Training: whole tiles in the season drawn from (seed, epoch, id), flipped (which keeps the counts); the equal split over 2 workers leaves one of the 9 training locations out of each epoch.
    for epoch in (0, 1):
        drawn = right_labels(config, lambda row_id: int(sample_rng(config.run.seed, epoch, row_id).integers(4)))
        training = [counts for row_id, counts in drawn.items() if not split.is_val(row_id)]
        right, labelled = np.sum(training, axis=0)
        possible = [(right - left_right) / (labelled - left_labelled) for left_right, left_labelled in training]
        for branch in MODALITIES:
            value = next(metric.value for metric in history[f"train/{branch}/base_rate"] if metric.step == epoch + 1)
            assert value == pytest.approx(min(possible, key=lambda share: abs(share - value)), rel=1e-12), epoch


def test_a_run_without_clean_labels_logs_no_noise_diagnostics(killed_worker_run, tracking_uri: str) -> None:
    """The session's run of the noisy-only shards (the one whose worker test_fault_tolerance.py kills)."""
    outcome = killed_worker_run.outcome
    logged = MlflowClient(tracking_uri).get_run(outcome.run_id).data.metrics
    assert "train/loss" in logged and "val/s2/miou" in logged and "val_clean/s2/miou" not in logged
    assert not [key for key in (*logged, *outcome.result.metrics) if key.endswith(NOISE_METRICS)]


def test_final_confusion_matrices_cover_every_held_out_pixel_once(first_run, tracking_uri: str, tmp_path: Path) -> None:
    config, outcome = first_run
    client = MlflowClient(tracking_uri)
    paths = artifact_paths(client, outcome.run_id)
    for kind in ("val", "val_clean"):
        for branch in ("s1", "s2", "fused"):
            assert {f"confusion/{kind}/{branch}.json", f"confusion/{kind}/{branch}.png"} <= paths
    assert {"config.yaml", "samples/epoch_0002/sample_00.png", "samples/epoch_0002/sample_01.png"} <= paths
    local = Path(client.download_artifacts(outcome.run_id, "confusion/val/s2.json", str(tmp_path)))
    result = json.loads(local.read_text())
    # Two workers score their shares of the held-out locations; summed, each 64 x 64 crop counts once.
    assert torch.tensor(result["matrix"]).sum().item() == held_out_locations(config) * 64 * 64
    assert result["miou"] == pytest.approx(outcome.metrics["val/s2/miou"])


def test_the_last_checkpoint_holds_model_optimiser_config_and_meta(first_run) -> None:
    config, outcome = first_run
    run_folder = Path(config.run.storage_path) / config.run.name
    assert sorted(p.name for p in run_folder.glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_0001",
        "checkpoint_epoch_0002",
    ]
    with outcome.result.checkpoint.as_directory() as directory:
        folder = Path(directory)
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "meta.json", "model.pt", "optim.pt"]
        meta = json.loads((folder / "meta.json").read_text())
        saved = PretrainConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
        network = build_model("mid", "resnet18", s1_bands=2, s2_bands=13, classes=9)
        network.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        optim = torch.load(folder / "optim.pt", weights_only=True)
    assert meta["epoch"] == 2
    assert meta["mlflow_run_id"] == outcome.run_id
    assert meta["metrics"]["val/s2/miou"] == pytest.approx(outcome.metrics["val/s2/miou"])
    assert {"torch", "ray", "cromss-ray"} <= set(meta["versions"])
    assert saved == config
    assert set(optim) == {"optimizer", "scheduler", "scaler"}
    assert optim["scheduler"]["patience"] == config.optim.plateau_patience


def test_the_registered_model_predicts_in_a_fresh_process(first_run, tracking_uri: str, tmp_path: Path) -> None:
    config, outcome = first_run
    assert outcome.version == 1
    client = MlflowClient(tracking_uri)
    assert client.get_model_version_by_alias(RUN_NAME, "latest").run_id == outcome.run_id
    done = subprocess.run(
        [sys.executable, "-c", PREDICT_IN_FRESH_PROCESS, RUN_NAME, str(config.data.s2_bands), str(tmp_path)],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["classes"] == [2, 40, 36]
    assert 0 <= found["range"][0] <= found["range"][1] < 9
    assert found["probabilities"] == [2, 9, 40, 36]
    # the stored example is a validation sample as the pyfunc takes it: raw products (S1 in dB, S2 digital
    # numbers), not the network inputs in [0, 1]; it round-trips through the loaded model
    s1_shape, s1_low, s1_high = found["example"]["s1"]
    s2_shape, s2_low, s2_high = found["example"]["s2"]
    assert s1_shape == [1, 2, 32, 32] and s2_shape == [1, config.data.s2_bands, 32, 32]
    assert -40 < s1_low < s1_high < 10 and s1_low < -5
    assert -200 < s2_low < s2_high < 20000 and s2_high > 100
    assert found["example_classes"] == [1, 32, 32]


def test_a_run_with_another_network_does_not_resume_the_checkpoint(first_run, tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"of another network: model\.encoder: 'resnet18' -> 'resnet34'"):
        build_trainer(tiny_config(RUN_NAME, NO_ROTATION, "model.encoder=resnet34"))


def test_the_cli_refuses_to_resume_with_another_learning_rate_before_training(
    first_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = first_run
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(config))
    code = main(["pretrain", "--config", str(saved), "--set", "optim.lr=0.002"])
    error = capsys.readouterr().err
    assert code == 2
    assert "optim.lr: 0.001 -> 0.002" in error and "--allow-config-change" in error


def test_rerunning_the_same_name_resumes_from_the_latest_checkpoint(first_run, tiny_config, tracking_uri) -> None:
    _, outcome = first_run
    changed = ("cromss.consistency_weight=0.5", "run.allow_config_change=true")
    # the resumed epoch's figures prove nothing here (the first run's are checked above); a free change
    resumed = run_pretrain(tiny_config(RUN_NAME, NO_ROTATION, "optim.epochs=3", "run.validation_figures=0", *changed))
    assert resumed.start_epoch == 2
    assert resumed.run_id == outcome.run_id, "the resumed run must keep writing to the same MLflow run"
    assert resumed.result.metrics["epoch"] == 3
    assert resumed.version == 2
    client = MlflowClient(tracking_uri)
    assert steps(client, outcome.run_id, "val/s2/miou") == [1, 2, 3]
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert int(client.get_model_version_by_alias(RUN_NAME, "latest").version) == 2
    tags = client.get_run(outcome.run_id).data.tags
    assert tags["cromss.config_change.epoch_2"] == "cromss.consistency_weight: 1.0 -> 0.5", "epochs change freely"
