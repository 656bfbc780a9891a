"""A 2-worker CPU pretraining run on synthetic shards: tracked, checkpointed, registered, resumed, and
carried on by a replacement worker after one is killed.

One run of the tiny config (ResNet-18, 64 px, 2 epochs) is shared by the tests of this
module. The last three tests share its resumption (:func:`resumed_run`): two more epochs on
the same locations stored without their clean labels, in which a training worker is
SIGKILLed once epoch 3's checkpoint is registered; they stay last.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import ray.train
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


TRAIN_WORKER_TITLE = "ray::RayTrainWorker"
KILL_DEADLINE_S = 600
RESUMED_EPOCHS = 4
KILL_AFTER_EPOCH = 3
CLEAN_LABEL_SCORES = "val_clean/"
CONFIG_CHANGES = ("cromss.consistency_weight=0.5", "run.allow_config_change=true")
"""The resumption's change beyond its data, recorded; the epoch count and the figures change freely."""

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


def test_ray_trains_controller_unpickles_no_module_of_the_model_stack(ray_cluster, tiny_config) -> None:
    """Ray Train's controller unpickles the trainer's run context (``train_loop_config`` included) before
    any worker starts: every cromss-ray module it names must import without torch's model stack or MLflow."""
    trainer = build_trainer(tiny_config("cromss-test-controller-imports", NO_ROTATION))
    pickled = ray.cloudpickle.dumps(trainer.train_run_context).decode("latin-1")
    modules = sorted(set(re.findall(r"cromss_ray(?:\.\w+)+", pickled)))
    assert modules, "the run context names no cromss-ray module; the check would prove nothing"
    heavy = ("segmentation_models_pytorch", "mlflow", "matplotlib")
    probe = f"import sys; {'; '.join(f'import {m}' for m in modules)}; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"{modules} import {loaded.strip()}"


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def train_worker_pids() -> list[int]:
    """Ray Train workers of this test's own cluster: children of the raylet this process started.

    Other Ray clusters on the machine have other raylets, so their workers are never picked.
    """
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    own_services = {pid for pid in pids if _parent(pid) == os.getpid()}
    return sorted(pid for pid in pids if _parent(pid) in own_services and _title(pid).startswith(TRAIN_WORKER_TITLE))


def kill_a_worker_after_the_checkpoint_of(epoch: int, run_folder: Path, killed: list[int]) -> None:
    """Wait until Ray Train has registered the run's checkpoint of ``epoch``, then SIGKILL one training worker."""
    name = f"checkpoint_epoch_{epoch:04d}"
    deadline = time.monotonic() + KILL_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            checkpoint = ray.train.Result.from_path(str(run_folder)).checkpoint
        except (RuntimeError, ValueError, OSError):
            checkpoint = None
        workers = train_worker_pids() if checkpoint is not None and Path(checkpoint.path).name == name else []
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])
            return
        time.sleep(0.1)


@dataclass(frozen=True)
class ResumedRun:
    """The first run rerun under its name to 4 epochs on the noisy-only shards, one training worker SIGKILLed
    (its pid in ``killed``) once epoch 3's checkpoint was registered; ``outcome`` is what the rerun returned."""

    config: PretrainConfig
    outcome: PretrainResult
    killed: list[int]


@pytest.fixture(scope="module")
def resumed_run(first_run, tiny_config, noisy_only_locations: Path) -> ResumedRun:
    """One Ray Train run serves three claims: a rerun resumes from the latest checkpoint, a killed worker is
    replaced from the run's own newer checkpoint, and epochs on shards without clean labels log no noise
    diagnostics. The noisy-only shards hold the same locations, so the split and the network stay."""
    config = tiny_config(
        RUN_NAME,
        NO_ROTATION,
        f"optim.epochs={RESUMED_EPOCHS}",
        "run.max_failures=1",
        "run.validation_figures=0",
        *CONFIG_CHANGES,
        data=noisy_only_locations,
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_a_worker_after_the_checkpoint_of,
        args=(KILL_AFTER_EPOCH, Path(config.run.storage_path) / config.run.name, killed),
        daemon=True,
    )
    killer.start()
    outcome = run_pretrain(config)
    killer.join(timeout=5)
    return ResumedRun(config, outcome, killed)


def needs_clean_labels(key: str) -> bool:
    """A noise diagnostic or a score against the clean labels."""
    return key.endswith(NOISE_METRICS) or key.startswith(CLEAN_LABEL_SCORES)


def config_change_tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    tags = client.get_run(run_id).data.tags
    return {key: value for key, value in tags.items() if key.startswith("cromss.config_change.")}


def test_rerunning_the_same_name_resumes_from_the_latest_checkpoint(
    first_run, resumed_run, tracking_uri, pretrain_locations: Path, noisy_only_locations: Path
) -> None:
    _, outcome = first_run
    resumed = resumed_run.outcome
    assert resumed.run_id == outcome.run_id, "the resumed run must keep writing to the same MLflow run"
    assert resumed.result.metrics["epoch"] == RESUMED_EPOCHS
    assert resumed.version == 2
    client = MlflowClient(tracking_uri)
    assert steps(client, outcome.run_id, "val/s2/miou") == [1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(outcome.run_id, "epoch")] == [1.0, 2.0, 3.0, 4.0]
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert int(client.get_model_version_by_alias(RUN_NAME, "latest").version) == 2
    # Rank 0 records the changes from the checkpoint it restores, at that checkpoint's epoch: the rerun started
    # from epoch 2 (the kill's replacement restored epoch 3's checkpoint, written with this config: no change).
    changes = config_change_tags(client, outcome.run_id)
    assert list(changes) == ["cromss.config_change.epoch_2"]
    assert set(changes["cromss.config_change.epoch_2"].split("; ")) == {
        "cromss.consistency_weight: 1.0 -> 0.5",
        f"data.uri: {str(pretrain_locations)!r} -> {str(noisy_only_locations)!r}",
    }, "epochs change freely"


def test_a_killed_worker_is_replaced_and_the_run_finishes_its_epochs(resumed_run, tracking_uri: str) -> None:
    config, outcome, killed = resumed_run.config, resumed_run.outcome, resumed_run.killed
    assert killed, "no training worker was killed: the run ended before epoch 3's checkpoint was registered"
    assert outcome.start_epoch == KILL_AFTER_EPOCH, "the replacement workers must resume from the epoch-3 checkpoint"
    assert outcome.result.metrics["epoch"] == config.optim.epochs == RESUMED_EPOCHS
    client = MlflowClient(tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert steps(client, outcome.run_id, "val/s2/miou") == [1, 2, 3, 4]
    runs = client.search_runs([run.info.experiment_id], f"attributes.run_name = '{config.run.name}'")
    assert [found.info.run_id for found in runs] == [outcome.run_id], "one MLflow run across the restart"


def test_epochs_on_shards_without_clean_labels_log_no_noise_diagnostics(resumed_run, tracking_uri: str) -> None:
    """Epochs 3 and 4 train and validate on the locations stored without clean labels: they log no noise
    diagnostics and no clean-label scores, which epochs 1 and 2 (with clean labels) log."""
    outcome = resumed_run.outcome
    client = MlflowClient(tracking_uri)
    logged = client.get_run(outcome.run_id).data.metrics
    for key in ("train/loss", "val/s2/miou"):
        assert steps(client, outcome.run_id, key) == [1, 2, 3, 4], key
    of_clean_labels = [key for key in logged if needs_clean_labels(key)]
    noise = {
        f"{split}/{branch}/{name}" for split in ("train", "val") for branch in MODALITIES for name in NOISE_METRICS
    }
    assert noise <= set(of_clean_labels) and "val_clean/s2/miou" in of_clean_labels
    for key in of_clean_labels:
        assert steps(client, outcome.run_id, key) == [1, 2], key
    final = (*outcome.result.metrics, *outcome.metrics)
    assert "train/loss" in final and "val/s2/miou" in final
    assert not [key for key in final if needs_clean_labels(key)]
