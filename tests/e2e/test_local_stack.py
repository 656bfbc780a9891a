"""The local service stand-ins start on 127.0.0.1, answer, enforce the Ray token, run Ray
jobs with the virtual env's Python, and leave no process behind, also after a failure."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from e2e.local_stack import (
    HOST,
    VENV_BIN,
    MlflowServer,
    RayHead,
    http_get,
    listening_addresses,
    s3_server,
    session_alive,
    session_members,
    session_process,
    upload_tree,
    wait_until_serving,
)

JOB_TIMEOUT_S = 180


def test_s3_server_serves_an_uploaded_tree(tmp_path: Path) -> None:
    (tmp_path / "shards" / "part").mkdir(parents=True)
    (tmp_path / "shards" / "manifest.json").write_text('{"rows": 2}')
    (tmp_path / "shards" / "part" / "shard-00000.parquet").write_bytes(b"PAR1 body PAR1")
    with s3_server() as s3:
        assert s3.endpoint_url.startswith(f"http://{HOST}:")
        keys = upload_tree(s3, tmp_path / "shards", "bucket", "noldo")
        assert keys == ["noldo/manifest.json", "noldo/part/shard-00000.parquet"]
        listed = s3.client().list_objects_v2(Bucket="bucket", Prefix="noldo/")
        assert sorted(item["Key"] for item in listed["Contents"]) == keys
        body = s3.client().get_object(Bucket="bucket", Key=keys[1])["Body"].read()
        assert body == b"PAR1 body PAR1"


def test_mlflow_server_answers_and_stops(shared_mlflow_server: MlflowServer) -> None:
    """On the package's shared server, whose fixture checks at the end that it stopped whole and refuses connections."""
    server = shared_mlflow_server
    assert server.url.startswith(f"http://{HOST}:")
    status, body = http_get(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1000")
    assert status == 200
    answered = [experiment["name"] for experiment in json.loads(body)["experiments"]]
    with closing(sqlite3.connect(server.backend_store_uri.removeprefix("sqlite:///"))) as store:
        stored = [name for (name,) in store.execute("SELECT name FROM experiments WHERE lifecycle_stage = 'active'")]
    assert "Default" in answered
    assert sorted(answered) == sorted(stored), "the server answers from its own store"
    assert listening_addresses(server.process) == {HOST}


def test_a_failing_body_still_stops_the_service_and_its_children(tmp_path: Path) -> None:
    sleeper = "import time; time.sleep(600)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); {sleeper}"
    with pytest.raises(RuntimeError, match="test body failed"):
        with session_process([sys.executable, "-c", parent], tmp_path / "parent.log", {}) as process:
            deadline = time.monotonic() + 60
            while len(session_members(process.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(session_members(process.pid)) == 2, "the child did not start its own child"
            raise RuntimeError("test body failed")
    assert not session_alive(process)


def test_wait_until_serving_reports_a_process_that_exited(tmp_path: Path) -> None:
    log = tmp_path / "crash.log"
    command = [sys.executable, "-c", "import sys; print('cannot bind'); sys.exit(3)"]
    with session_process(command, log, {}) as process:
        with pytest.raises(RuntimeError, match=r"exited with 3:\ncannot bind"):
            wait_until_serving(f"http://{HOST}:9/", process, log)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_head_enforces_the_token_and_runs_jobs_with_the_venv_python(shared_ray_head: RayHead) -> None:
    """On the package's shared head, whose fixture checks at the end that it stopped whole and left no files."""
    head = shared_ray_head
    jobs_api = f"{head.dashboard_url}/api/jobs/"
    assert http_get(jobs_api)[0] == 401
    assert http_get(jobs_api, {"Authorization": "Bearer wrong-token"})[0] == 403
    assert http_get(jobs_api, head.auth_header())[0] == 200

    print_python = "import sys; print('JOB_PYTHON', sys.executable)"
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--", "python", "-c", print_python],
        env=head.client_environment(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        check=False,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    printed = next(line for line in submit.stdout.splitlines() if line.startswith("JOB_PYTHON "))
    assert Path(printed.split(" ", 1)[1]).parent == VENV_BIN
    assert listening_addresses(head.process) == {HOST}
