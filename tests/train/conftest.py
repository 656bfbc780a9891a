"""Shared fixtures of the pretraining tests: synthetic shards, tiny configs, and the one run of noisy-only
shards in which a training worker is killed.

Everything is real: a 2-CPU Ray cluster on 127.0.0.1, Parquet shards written by the
synthesizer, an MLflow sqlite store in a temporary folder, a SIGKILL to a Ray Train worker.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.train

from cromss_ray.config import PretrainConfig, load_config
from cromss_ray.data.shards import ShardWriter, iter_rows, open_shard
from cromss_ray.data.synth import synthesize
from cromss_ray.train.pretrain import PretrainResult, run_pretrain

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "jobs" / "configs" / "pretrain_tiny.yaml"
LOCATIONS = 16
SIZE = 64
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"
KILL_DEADLINE_S = 600


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


@dataclass(frozen=True)
class KilledWorkerRun:
    """A 2-epoch run of the noisy-only shards in which one training worker was SIGKILLed (its pid in
    ``killed``) after the first checkpoint; ``outcome`` is what the run returned."""

    config: PretrainConfig
    outcome: PretrainResult
    killed: list[int]


@pytest.fixture(scope="session")
def killed_worker_run(ray_cluster: None, tiny_config, noisy_only_locations: Path) -> KilledWorkerRun:
    """One Ray Train run serves two claims: a killed worker is replaced (tests/train/test_fault_tolerance.py),
    and shards without clean labels log no noise diagnostics (tests/train/test_pretrain.py)."""
    config: PretrainConfig = tiny_config(
        "cromss-test-killed-worker",
        "run.max_failures=1",
        "run.validation_figures=0",
        "tracking.log_model=false",
        data=noisy_only_locations,
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
    return KilledWorkerRun(config, outcome, killed)
