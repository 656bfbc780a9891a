"""``cromss pretrain`` and ``jobs/pretrain.py`` reject bad configs before starting anything (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cromss_ray.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "jobs" / "configs" / "pretrain_tiny.yaml")


def pretrain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["pretrain", "--config", TINY_CONFIG, *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.learning_rate=0.1", "optim.learning_rate: unknown key"),
        ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
        ("model.fusion=early", "model.fusion: Input should be 'mid', 'late' or 'single'"),
        ("scaling.precision=fp8", "scaling.precision"),
        ("run.checkpoints_to_keep=0", "run.checkpoints_to_keep: Input should be greater than or equal to 1"),
        ("data.crop=48", "data.crop: 48 is not a multiple of 32"),
        ("optim.max_nonfinite_steps=-1", "optim.max_nonfinite_steps: Input should be greater than or equal to 0"),
        ("tracking.max_backoff_s=0", "tracking.max_backoff_s: Input should be greater than 0"),
    ],
)
def test_an_invalid_override_exits_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], override: str, named: str
) -> None:
    code, err = pretrain(capsys, "--set", override)
    assert code == 2
    assert named in err


def test_an_unknown_key_in_the_file_is_named_with_the_file(capsys, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  fusion: mid\n  encodr: resnet18\n")
    code = main(["pretrain", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{config}: " in err and "model.encodr: unknown key" in err


def test_a_missing_config_file_is_named(capsys, tmp_path: Path) -> None:
    code = main(["pretrain", "--config", str(tmp_path / "nowhere.yaml")])
    assert code == 2
    assert "nowhere.yaml: no such config file" in capsys.readouterr().err


def test_the_job_entry_point_is_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "jobs/pretrain.py", "--config", TINY_CONFIG, "--set", "cromss.ramp=cosine"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "cromss.ramp: Input should be 'exp', 'linear' or 'none'" in done.stderr
    help_text = subprocess.run(
        [sys.executable, "jobs/pretrain.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    ).stdout
    assert "--tracking-uri" in help_text and "--set KEY=VALUE" in help_text
