"""End to end, as a platform engineer runs it: `ray job submit` of a tiny pretraining that
reads its shards from object storage and logs to a remote MLflow server, then the
registered model pulled from that server in a fresh process and used to predict.

Everything is real and on 127.0.0.1: a Ray head with token authentication, an
`mlflow server` (sqlite store, proxied artifacts) and moto's S3 server. The tracking URI
reaches the job through its runtime environment, built by clusters/runtime_env_json.py
from clusters/runtime_env.yaml. Distinctive dummy credentials (S3 key, secret and session
token, MLflow user and password) sit where a user keeps them: in the node's own environment
(as an instance profile or a Kubernetes Secret gives them), from which the job reads, and in
the shell that builds the runtime environment and runs `ray job submit`; none of them is
found afterwards in any file of Ray's session (logs, runtime environments, the uploaded
package), the checkpoints, the MLflow store or the job's output. The Ray head and the MLflow
server are the package's shared ones (conftest.py).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from e2e.local_stack import (
    VENV_BIN,
    MlflowServer,
    RayHead,
    S3Server,
    files_holding,
    http_get,
    s3_server,
    service_environment,
    upload_tree,
)

from cromss_ray.config import PretrainConfig, load_config
from cromss_ray.data.synth import synthesize

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = "jobs/configs/pretrain_tiny.yaml"
BUCKET, PREFIX = "cromss-e2e", "noldo-s12"
JOB_TIMEOUT_S = 480
CLIENT_TIMEOUT_S = 300

PREDICT_IN_FRESH_PROCESS = """
import json, sys
import mlflow
import numpy as np
from mlflow import MlflowClient

name, bands, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = mlflow.pyfunc.load_model(f"models:/{name}@latest", dst_path=folder)
rng = np.random.default_rng(0)
batch = {
    "s1": rng.random((2, 2, 48, 40), dtype=np.float32),
    "s2": rng.random((2, bands, 48, 40), dtype=np.float32),
}
prediction = model.predict(batch)
client = MlflowClient()
run = client.get_run(client.get_model_version_by_alias(name, "latest").run_id)
print(json.dumps({
    "classes_shape": list(prediction["classes"].shape),
    "classes_kind": prediction["classes"].dtype.kind,
    "classes_range": [int(prediction["classes"].min()), int(prediction["classes"].max())],
    "probabilities_shape": list(prediction["probabilities"].shape),
    "probability_sums": [float(s) for s in prediction["probabilities"].sum(axis=1).reshape(-1)[[0, -1]]],
    "experiment": client.get_experiment(run.info.experiment_id).name,
    "status": run.info.status,
    "artifact_uri": run.info.artifact_uri,
    "metrics": sorted(run.data.metrics),
    "params": run.data.params,
    "tags": run.data.tags,
}))
"""


def runtime_env_json(mlflow: MlflowServer, credentials: dict[str, str]) -> str:
    """What a platform engineer passes to --runtime-env-json: the committed file plus the tracking
    URI, from a shell that holds the credentials too (the script must leave them out)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "clusters" / "runtime_env_json.py")],
        env=service_environment({"MLFLOW_TRACKING_URI": mlflow.url, **credentials}),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def ray_cli(
    head: RayHead, *args: str, shell: dict[str, str] | None = None, timeout: float = CLIENT_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """The Ray CLI against ``head``, from a shell that also holds ``shell`` (credentials it must not pass on)."""
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args],
        cwd=REPO,
        env={**head.client_environment(), **(shell or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def submit_tiny_pretraining(
    head: RayHead, mlflow: MlflowServer, s3: S3Server, credentials: dict[str, str], storage: Path, submission_id: str
) -> subprocess.CompletedProcess[str]:
    """``ray job submit`` from the repository root, from a shell holding ``credentials``; waits for the job and
    returns its output. The smallest run that logs every metric: 1 epoch, 1 worker, 32 px crops, no figures."""
    try:
        return ray_cli(
            head,
            "job", "submit", "--submission-id", submission_id, "--working-dir", ".",
            "--runtime-env-json", runtime_env_json(mlflow, credentials),
            "--",
            "python", "jobs/pretrain.py", "--config", TINY_CONFIG,
            "--data", f"s3://{BUCKET}/{PREFIX}",
            "--set", f"data.s3_endpoint={s3.endpoint_url}",
            "--set", f"run.storage_path={storage}",
            "--set", "optim.epochs=1",
            "--set", "scaling.num_workers=1",
            "--set", "data.crop=32",
            "--set", "run.validation_figures=0",
            shell=credentials,
            timeout=JOB_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        ray_cli(head, "job", "stop", submission_id)
        logs = ray_cli(head, "job", "logs", submission_id).stdout
        pytest.fail(f"job {submission_id} still running after {JOB_TIMEOUT_S} s; its log:\n{logs[-6000:]}")


def predict_in_fresh_process(mlflow: MlflowServer, registry_name: str, bands: int, folder: Path) -> dict:
    """Load ``models:/NAME@latest`` from the server into ``folder`` in a new interpreter without any AWS credentials."""
    result = subprocess.run(
        [sys.executable, "-c", PREDICT_IN_FRESH_PROCESS, registry_name, str(bands), str(folder)],
        env=service_environment({"MLFLOW_TRACKING_URI": mlflow.url}),
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_ray_job_submit_pretrains_from_s3_and_registers_a_model_served_by_mlflow(
    shared_ray_head: RayHead, shared_mlflow_server: MlflowServer, node_credentials: dict[str, str], tmp_path: Path
) -> None:
    config = load_config(PretrainConfig, REPO / TINY_CONFIG)
    shards = tmp_path / "shards"
    synthesize(shards, kind="pretrain", locations=8, size=64, seed=0)
    submission_id = f"cromss-e2e-{secrets.token_hex(4)}"
    head, mlflow, credentials = shared_ray_head, shared_mlflow_server, node_credentials

    with ExitStack() as services:
        s3 = services.enter_context(s3_server())
        upload_tree(s3, shards, BUCKET, PREFIX)

        storage = tmp_path / "runs"
        job = submit_tiny_pretraining(head, mlflow, s3, credentials, storage, submission_id)
        assert job.returncode == 0, f"job failed:\n{job.stdout[-8000:]}\n{job.stderr[-4000:]}"
        status, body = http_get(f"{head.dashboard_url}/api/jobs/{submission_id}", head.auth_header())
        assert status == 200 and json.loads(body)["status"] == "SUCCEEDED"

        (tmp_path / "model").mkdir()
        found = predict_in_fresh_process(mlflow, config.registry_name(), config.data.s2_bands, tmp_path / "model")
    artifact_files = [path for path in mlflow.artifacts_dir.rglob("*") if path.is_file()]
    secret_values = [value for name, value in credentials.items() if name != "AWS_DEFAULT_REGION"]
    # Ray's session files (every log, the runtime environments, the uploaded package), the
    # checkpoints and Ray Train's state under the storage path, the MLflow database and artifacts.
    leaks = files_holding(secret_values, head.temp_dir, tmp_path, mlflow.root)
    searched = {
        "the runtime-env agent's log": any(head.temp_dir.glob("session_*/logs/runtime_env_agent*.log")),
        "the job driver's log": any(head.temp_dir.glob(f"session_*/logs/job-driver-{submission_id}.log")),
        "a checkpoint's config.yaml": any(storage.glob("*/checkpoint_*/config.yaml")),
        "the MLflow database": (mlflow.root / "mlflow.db").is_file(),
        "the run's config.yaml artifact": any(path.name == "config.yaml" for path in artifact_files),
    }
    job_output = job.stdout + job.stderr

    assert all(searched.values()), f"the searched places hold none of {[k for k, v in searched.items() if not v]}"
    assert leaks == {}, f"credentials found in {leaks}"
    assert not [value for value in secret_values if value in job_output]

    classes = config.model.classes
    assert found["classes_shape"] == [2, 48, 40]
    assert found["classes_kind"] == "i"
    assert 0 <= found["classes_range"][0] <= found["classes_range"][1] < classes
    assert found["probabilities_shape"] == [2, classes, 48, 40]
    assert found["probability_sums"] == pytest.approx([1.0, 1.0], abs=1e-4)

    assert found["experiment"] == config.tracking.experiment
    assert found["status"] == "FINISHED"
    assert found["artifact_uri"].startswith("mlflow-artifacts:"), "artifacts must go through the server"
    assert any(path.name == "MLmodel" for path in artifact_files)
    assert {"epoch", "train/loss", "val/s2/miou", "val_clean/s2/miou"} <= set(found["metrics"])

    logged = json.dumps([found["params"], found["tags"]])
    assert s3.secret_access_key not in logged and s3.access_key_id not in logged, "credentials were logged"
