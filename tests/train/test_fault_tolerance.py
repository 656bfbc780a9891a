"""A training worker killed mid-run is replaced and the run continues from its last checkpoint.

The run is the session's :func:`~conftest.killed_worker_run` (on noisy-only shards, which
``test_pretrain.py`` also checks for the absence of noise diagnostics).
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_killed_worker_is_replaced_and_the_run_finishes_its_epochs(killed_worker_run, tracking_uri: str) -> None:
    config, outcome, killed = killed_worker_run.config, killed_worker_run.outcome, killed_worker_run.killed
    assert killed, "no training worker was killed: the run ended before its first checkpoint was registered"
    assert outcome.start_epoch == 1, "the replacement workers must resume from the epoch-1 checkpoint"
    assert outcome.result.metrics["epoch"] == config.optim.epochs == 2
    client = MlflowClient(tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert {metric.step for metric in client.get_metric_history(outcome.run_id, "val/s2/miou")} == {1, 2}
    runs = client.search_runs([run.info.experiment_id], f"attributes.run_name = '{config.run.name}'")
    assert [found.info.run_id for found in runs] == [outcome.run_id], "one MLflow run across the restart"
