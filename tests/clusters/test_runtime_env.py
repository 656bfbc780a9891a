"""clusters/runtime_env.yaml is a valid Ray runtime environment that ships a small source
tree, and clusters/runtime_env_json.py adds the non-secret service variables that are set and
never a credential (Ray's runtime-env agent logs env_vars on every node)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from ray._private.runtime_env.packaging import _zip_files
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "clusters" / "runtime_env.yaml"
RUNTIME_ENV_JSON = REPO / "clusters" / "runtime_env_json.py"


def runtime_env_fields() -> dict:
    return yaml.safe_load(RUNTIME_ENV.read_text())


def run_runtime_env_json(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNTIME_ENV_JSON), *args],
        env={"PATH": os.environ["PATH"], **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_runtime_env_is_accepted_by_ray() -> None:
    fields = runtime_env_fields()
    assert set(fields) <= RuntimeEnv.known_fields, f"unknown fields {set(fields) - RuntimeEnv.known_fields}"
    runtime_env = RuntimeEnv(**fields)
    assert runtime_env["working_dir"] == "."
    assert runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_runtime_env_holds_no_credentials() -> None:
    env_vars = runtime_env_fields()["env_vars"]
    secret_markers = ("KEY", "SECRET", "PASSWORD", "TOKEN")
    assert not [name for name in env_vars if any(marker in name for marker in secret_markers)]


def test_working_dir_package_keeps_source_and_drops_local_state(tmp_path: Path) -> None:
    """Zip the repository as Ray does for ``working_dir``, honouring only the runtime_env excludes."""
    package = tmp_path / "working_dir.zip"
    _zip_files(str(REPO), runtime_env_fields()["excludes"], str(package), include_gitignore=False)
    names = zipfile.ZipFile(package).namelist()
    top_levels = {name.split("/", 1)[0] for name in names}
    assert {"cromss_ray/config.py", "cromss_ray/data/schema.py", "clusters/runtime_env.yaml"} <= set(names)
    assert not top_levels & {".git", ".venv", "data", "runs", "outputs", "mlruns", "mlartifacts", "mlflow.db"}
    assert not [name for name in names if "__pycache__" in name or ".egg-info" in name]
    assert package.stat().st_size < 16 * 2**20, "working_dir upload is larger than 16 MiB"


def test_runtime_env_json_adds_set_service_variables_and_never_credentials() -> None:
    environ = {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-central-1",
        "AWS_REGION": "",
        "AWS_ACCESS_KEY_ID": "testing-key-4e1b",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-4e1b",
        "AWS_SESSION_TOKEN": "testing-token-4e1b",
        "MLFLOW_TRACKING_PASSWORD": "testing-password-4e1b",
        "UNRELATED_SECRET": "must-not-travel",
    }
    result = run_runtime_env_json(environ)
    assert result.returncode == 0, result.stderr
    runtime_env = json.loads(result.stdout)
    assert runtime_env["env_vars"] == {
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-central-1",
    }
    assert runtime_env["excludes"] == runtime_env_fields()["excludes"]
    RuntimeEnv(**runtime_env)
    left_out = "MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN"
    assert f"left out of the runtime environment (Ray logs its env_vars on every node): {left_out}" in result.stderr
    assert "4e1b" not in result.stdout + result.stderr


def test_runtime_env_json_refuses_a_tracking_uri_with_credentials() -> None:
    result = run_runtime_env_json({"MLFLOW_TRACKING_URI": "https://alice:pw-4e1b@mlflow.example.org"})
    assert result.returncode != 0 and result.stdout == ""
    assert "MLFLOW_TRACKING_URI: holds user:password@" in result.stderr and "pw-4e1b" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such runtime environment file"),
        ("working_dir: [", "not valid YAML"),
        ("- a list", "must be a mapping"),
        ("env_vars: {AWS_SECRET_ACCESS_KEY: x}", "env_vars must not hold credentials: AWS_SECRET_ACCESS_KEY"),
    ],
    ids=["missing", "bad-yaml", "not-a-mapping", "committed-credential"],
)
def test_runtime_env_json_names_the_bad_file(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "runtime_env.yaml"
    if content is not None:
        path.write_text(content)
    result = run_runtime_env_json({}, str(path))
    assert result.returncode != 0
    assert str(path) in result.stderr and message in result.stderr
    assert result.stdout == ""
