"""One Ray head with token authentication for the end-to-end tests that need a cluster of
their own (the job submission and the local stack's head checks): a head takes ~20 s to
start, so they share it, and it stops after the package's last test. Likewise one
``mlflow server`` (~10 s to start) for the job submission and the local stack's server checks.

The head's node environment holds dummy S3 and MLflow credentials, as an instance profile
or a Kubernetes Secret gives them; every job and worker on it inherits them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.local_stack import MlflowServer, RayHead, dummy_credential, http_get, mlflow_server, ray_head, session_alive


@pytest.fixture(scope="package")
def node_credentials() -> dict[str, str]:
    """The shared head's credentials: distinctive values no file holds before the session."""
    return {
        "AWS_ACCESS_KEY_ID": dummy_credential("key"),
        "AWS_SECRET_ACCESS_KEY": dummy_credential("secret"),
        "AWS_SESSION_TOKEN": dummy_credential("session"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_USERNAME": dummy_credential("mlflow-user"),
        "MLFLOW_TRACKING_PASSWORD": dummy_credential("mlflow-password"),
    }


@pytest.fixture(scope="package")
def shared_ray_head(tmp_path_factory: pytest.TempPathFactory, node_credentials: dict[str, str]) -> Iterator[RayHead]:
    """The package's Ray head; on exit its whole process session has stopped and its temporary directory is gone."""
    log_dir: Path = tmp_path_factory.mktemp("ray-head")
    with ray_head(log_dir, token=secrets.token_hex(32), node_environment=node_credentials) as head:
        yield head
        process, temp_dir = head.process, head.temp_dir
    assert not session_alive(process), "a process of the Ray head outlived its stop"
    assert not temp_dir.exists(), f"the Ray head's temporary directory {temp_dir} was left behind"


@pytest.fixture(scope="package")
def shared_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The package's MLflow server; on exit its whole process session has stopped and its port refuses connections."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server
        process = server.process
    assert not session_alive(process), "a process of the MLflow server outlived its stop"
    with pytest.raises(OSError):
        http_get(f"{server.url}/health", timeout=2.0)
