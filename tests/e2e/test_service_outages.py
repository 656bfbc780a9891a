"""A pretraining run outlives a restart of its tracking server and of its object store.

One tiny run on the session's Ray cluster reads its shards from moto's S3 server and logs
to a real `mlflow server` (sqlite store), both on 127.0.0.1. A fault thread stops the
MLflow server once the run has opened its MLflow run and starts it again only after the
last epoch's checkpoint, so the epochs after the first end while the server is away (the
first may end while the server is still stopping, on a loaded machine); it stops the S3
server as epoch 1's checkpoint lands, as epoch 2 starts reading, for a few seconds. The
run must finish with no worker restart and every epoch's metrics in MLflow.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
from e2e.local_stack import free_port, mlflow_server, s3_server, upload_tree
from mlflow import MlflowClient

from cromss_ray.config import PretrainConfig, load_config
from cromss_ray.data.synth import synthesize
from cromss_ray.train.pretrain import run_pretrain

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "jobs" / "configs" / "pretrain_tiny.yaml"
BUCKET = "cromss-outage"
EPOCHS = 3
S3_DOWN_S = 3.0
MAX_BACKOFF_S = 0.5
"""The run tries the tracking server again at least this often, so it finds the restarted server at once."""
WAIT_S = 900.0


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)


class Faults(threading.Thread):
    """The two servers, stopped and started again at the moments the module docstring names; ``moments``
    lists what happened in order, ``checkpointed_before_the_outage`` whether epoch 2 ended before it."""

    def __init__(self, root: Path, run_folder: Path) -> None:
        super().__init__(daemon=True)
        self.mlflow_root, self.run_folder = root / "mlflow", run_folder
        self.mlflow_root.mkdir()
        self.mlflow_port, self.s3_port = free_port(), free_port()
        self.mlflow_service, self.s3_service = ExitStack(), ExitStack()
        self.mlflow = self.mlflow_service.enter_context(mlflow_server(self.mlflow_root, self.mlflow_port))
        self.s3 = self.s3_service.enter_context(s3_server(self.s3_port))
        self.moments: list[str] = []
        self.checkpointed_before_the_outage = False
        self.error: BaseException | None = None

    def _checkpointed(self, epoch: int) -> bool:
        return (self.run_folder / f"checkpoint_epoch_{epoch:04d}").is_dir()

    def _run_opened(self) -> bool:
        """Whether the run has written what it writes when it opens (its tags come last)."""
        client = MlflowClient(self.mlflow.url)
        runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
        return any("ray.train.run_name" in run.data.tags for run in runs)

    def run(self) -> None:
        try:
            _wait_for(self._run_opened, "the MLflow run to open")
            self.mlflow_service.close()
            self.checkpointed_before_the_outage = self._checkpointed(2)
            self.moments.append("mlflow stopped")
            _wait_for(lambda: self._checkpointed(1), "epoch 1's checkpoint")
            self.s3_service.close()
            self.moments.append("epoch 1 checkpointed, s3 stopped")
            time.sleep(S3_DOWN_S)
            self.s3_service.enter_context(s3_server(self.s3_port))
            self.moments.append("s3 started")
            _wait_for(lambda: self._checkpointed(EPOCHS), "the last epoch's checkpoint")
            self.moments.append("last epoch checkpointed")
            self.mlflow_service.enter_context(mlflow_server(self.mlflow_root, self.mlflow_port))
            self.moments.append("mlflow started")
        except BaseException as error:
            self.error = error

    def close(self) -> None:
        self.mlflow_service.close()
        self.s3_service.close()


def test_a_run_finishes_with_every_epoch_logged_through_mlflow_and_s3_restarts(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = {"AWS_ACCESS_KEY_ID": "cromss-e2e-key", "AWS_SECRET_ACCESS_KEY": "cromss-e2e-secret"}
    for name, value in {**credentials, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    shards = tmp_path / "shards"
    synthesize(shards, "pretrain", locations=8, size=64, seed=5)
    storage = tmp_path / "runs"
    faults = Faults(tmp_path, storage / "outage")
    try:
        upload_tree(faults.s3, shards, BUCKET, "noldo")
        config = load_config(
            PretrainConfig,
            TINY_CONFIG,
            [
                "run.name=outage",
                f"run.storage_path={storage}",
                f"data.s3_endpoint={faults.s3.endpoint_url}",
                f"optim.epochs={EPOCHS}",
                "scaling.num_workers=1",
                "run.validation_figures=0",
                "tracking.log_model=false",
                "tracking.flush_timeout_s=180",
                f"tracking.max_backoff_s={MAX_BACKOFF_S}",
            ],
            data=f"s3://{BUCKET}/noldo",
            tracking_uri=faults.mlflow.url,
        )
        faults.start()
        outcome = run_pretrain(config)
        faults.join(timeout=WAIT_S)
        assert faults.error is None, f"the fault thread failed: {faults.error!r}"
        assert faults.moments == [
            "mlflow stopped",
            "epoch 1 checkpointed, s3 stopped",
            "s3 started",
            "last epoch checkpointed",
            "mlflow started",
        ]
        assert not faults.checkpointed_before_the_outage, "epochs 2 and 3 must end while the tracking server is away"
        assert outcome.start_epoch == 0, "no worker restart: the outages were absorbed, not retried"
        assert outcome.result.metrics["epoch"] == EPOCHS

        client = MlflowClient(faults.mlflow.url)
        assert client.get_run(outcome.run_id).info.status == "FINISHED"
        for key in ("train/loss", "train/lr", "val/loss", "val/s2/miou"):
            history = client.get_metric_history(outcome.run_id, key)
            assert sorted(metric.step for metric in history) == list(range(1, EPOCHS + 1)), key
        epochs = sorted((metric.step, metric.value) for metric in client.get_metric_history(outcome.run_id, "epoch"))
        assert epochs == [(epoch, float(epoch)) for epoch in range(1, EPOCHS + 1)]
        assert {artifact.path for artifact in client.list_artifacts(outcome.run_id)} >= {"config.yaml", "confusion"}
    finally:
        faults.close()
