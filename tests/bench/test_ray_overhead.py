"""Smoke test of ``bench/ray_overhead.py`` at its tiniest size: the report's rows, never its timings."""

from __future__ import annotations

import json

import pytest

from bench import ray_overhead

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCH_ROWS = {
    "plain_epoch_s",
    "plain_epoch_spread",
    "plain_first_epochs_s",
    "ray_epoch_s",
    "ray_epoch_spread",
    "plain_samples_per_s",
    "ray_samples_per_s",
    "overhead_pct",
    "ray_run_wall_s",
    "ray_startup_first_epoch_finish_s",
}


def test_quick_report_compares_both_paths(tmp_path, capsys):
    report_path = tmp_path / "ray.json"
    assert ray_overhead.main(["--quick", "--json", str(report_path)]) == 0

    sections = json.loads(report_path.read_text())["sections"]
    assert list(sections) == ["machine", "setup", "per_epoch"]
    assert set(sections["per_epoch"]) == EPOCH_ROWS
    # Two epochs per run: one timed epoch per plain run (before and after), one MLflow gap for Ray.
    assert sections["per_epoch"]["plain_epoch_spread"].endswith("over 2")
    assert sections["per_epoch"]["ray_epoch_spread"].endswith("over 1 gaps")
    assert sections["setup"]["plain_loop_threads"] == 1
    printed = capsys.readouterr().out
    assert "[per_epoch]" in printed and "  overhead_pct " in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "1"], "--epochs 1: need at least 2"),
        (["--size", "100"], "--size 100: must be a positive multiple of 32"),
        (["--locations", "4", "--batch", "8"], r"--locations 4: need at least one batch per worker \(1 x 8\)"),
    ],
)
def test_bad_sizes_are_rejected_before_any_work(flags, message):
    with pytest.raises(SystemExit, match=message):
        ray_overhead.main(flags)
