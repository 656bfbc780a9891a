"""scripts/demo.sh parses, refuses unknown arguments without touching anything, and its
``stop`` is safe when no demo cluster runs. (The demo itself runs for minutes; it is
exercised by running it, not here.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cromss_ray.train.reporting import progress_line

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.sh"


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "CROMSS_DEMO_DIR": str(tmp_path / "demo"), "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(DEMO), *args], env=environ, capture_output=True, text=True, timeout=60)


def test_demo_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(DEMO)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_unknown_argument_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--fast")
    assert result.returncode == 1
    assert "usage: scripts/demo.sh [stop]" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_stop_without_a_running_demo_cluster_says_so(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "stop")
    assert result.returncode == 0
    assert "no demo Ray cluster is running" in result.stdout
    assert not (tmp_path / "demo").exists()


def console_lines(log: str) -> list[str]:
    """What the demo's console shows of a step's log (the filter ``step`` applies)."""
    result = subprocess.run(
        ["sed", "-nE", "-f", str(REPO / "scripts" / "demo_console.sed")],
        input=log,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def test_the_console_shows_cromss_progress_and_summaries_and_leaves_ray_and_mlflow_lines_in_the_log() -> None:
    metrics = {"train/loss": 11.5, "val/fused/miou": 0.01467}
    progress = progress_line("pretrain", "demo-cromss-mid", 1, 2, metrics, list(metrics), 4.2)
    log = "\n".join(
        [
            "2026-12-01 09:19:07,463\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
            "2026-12-01 09:19:14,865\tINFO worker.py:2029 -- Started a local Ray instance.",
            "\x1b[36m(TrainController pid=11187)\x1b[0m Requesting resources: {'CPU': 0.5} * 2",
            "\x1b[36m(RayTrainWorker pid=11469)\x1b[0m 2026/12/01 09:20:22 INFO mlflow.store.db.utils: Updating database tables",
            f"\x1b[36m(RayTrainWorker pid=11469)\x1b[0m {progress}",
            "\x1b[36m(RayTrainWorker pid=11439)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, metrics={})",
            "MLflow run 24ceb7153a15448b855f53e662b574da (cromss-pretrain)",
            "registered model cromss-mid-13b version 1 @latest",
            "latest checkpoint /tmp/runs/probe/checkpoint_epoch_0001",
            "test/miou 0.1234  test/miou_ref 0.2345",
        ]
    )
    assert console_lines(log) == [
        "  [cromss pretrain] demo-cromss-mid epoch 1/2  train/loss 11.5  val/fused/miou 0.01467  (4.2 s)",
        "  MLflow run 24ceb7153a15448b855f53e662b574da (cromss-pretrain)",
        "  registered model cromss-mid-13b version 1 @latest",
        "  test/miou 0.1234  test/miou_ref 0.2345",
    ]
