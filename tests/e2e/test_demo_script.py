"""scripts/demo.sh parses, refuses unknown arguments without touching anything, and its
``stop`` is safe when no demo cluster runs. (The demo itself runs for minutes; it is
exercised by running it, not here.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
