"""Shared fixtures of the sweep tests: a local Ray cluster, tiny synthetic shards, an MLflow store.

Everything is real: a 2-CPU Ray cluster on 127.0.0.1, Parquet shards written by the
synthesizer, an MLflow sqlite store (with its registry) in a temporary folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from local_ray import start_test_ray

from cromss_ray.data.synth import synthesize

LOCATIONS = 8
SIZE = 40


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local 2-CPU Ray cluster for the session (one already running is reused and left running).

    Ray's out-of-memory killer is off: it weighs the whole machine's memory, so on a
    shared test machine it would end these trials for other processes' use.
    """
    started = not ray.is_initialized()
    if started:
        start_test_ray(num_cpus=2, include_dashboard=False, _system_config={"memory_monitor_refresh_ms": 0})
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def sweep_locations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic 4-season locations of 40 x 40 px with noisy and clean labels."""
    out = tmp_path_factory.mktemp("sweep-locations")
    synthesize(out, "pretrain", locations=LOCATIONS, size=SIZE, seed=5)
    return out


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow sqlite store (with its registry) for the session."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
