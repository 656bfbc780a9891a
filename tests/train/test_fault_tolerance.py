"""A training worker killed mid-run is replaced and the run continues from its last checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray.train
from mlflow import MlflowClient

from cromss_ray.config import PretrainConfig
from cromss_ray.train.pretrain import run_pretrain

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TRAIN_WORKER_TITLE = "ray::RayTrainWorker"
KILL_DEADLINE_S = 600


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


def kill_a_worker_after_the_first_checkpoint(run_folder: Path, killed: list[int]) -> None:
    """Wait until Ray Train has registered a checkpoint of the run, then SIGKILL one training worker."""
    deadline = time.monotonic() + KILL_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            registered = ray.train.Result.from_path(str(run_folder)).checkpoint is not None
        except (RuntimeError, ValueError, OSError):
            registered = False
        workers = train_worker_pids() if registered else []
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])
            return
        time.sleep(0.1)


def test_a_killed_worker_is_replaced_and_the_run_finishes_its_epochs(
    ray_cluster: None, tiny_config, tracking_uri: str
) -> None:
    config: PretrainConfig = tiny_config(
        "cromss-test-killed-worker", "run.max_failures=1", "run.validation_figures=0", "tracking.log_model=false"
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_a_worker_after_the_first_checkpoint,
        args=(Path(config.run.storage_path) / config.run.name, killed),
        daemon=True,
    )
    killer.start()
    outcome = run_pretrain(config)
    killer.join(timeout=5)

    assert killed, "no training worker was killed: the run ended before its first checkpoint was registered"
    assert outcome.start_epoch == 1, "the replacement workers must resume from the epoch-1 checkpoint"
    assert outcome.result.metrics["epoch"] == config.optim.epochs == 2
    client = MlflowClient(tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert {metric.step for metric in client.get_metric_history(outcome.run_id, "val/s2/miou")} == {1, 2}
    runs = client.search_runs([run.info.experiment_id], f"attributes.run_name = '{config.run.name}'")
    assert [found.info.run_id for found in runs] == [outcome.run_id], "one MLflow run across the restart"
