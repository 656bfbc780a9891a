"""Smoke test of ``bench/ray_overhead.py`` at its tiniest size: the report's rows, never its timings.

The smoke run's two runs share one local Ray instance (the benchmark starts a fresh one
per run only when none is running): the report's rows are the same, for one Ray start
instead of two.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import ray

from bench import ray_overhead
from cromss_ray.train.cluster import start_local_ray


EPOCH_ROWS = {
    "runs",
    "plain_epoch_s",
    "plain_epoch_spread",
    "plain_first_epochs_s",
    "ray_epoch_s",
    "ray_epoch_spread",
    "plain_samples_per_s",
    "ray_samples_per_s",
    "overhead_pct",
    "overhead_pct_range",
    "ray_run_wall_s",
    "ray_startup_first_epoch_finish_s",
}


CPU_ROWS = {
    *(f"{group}_cpu_s" for group in (*ray_overhead.PROCESS_GROUPS, "driver")),
    *(f"{group}_cpu_s_per_timed_epoch" for group in ray_overhead.PROCESS_GROUPS),
    "ray_run_cores_busy",
    "plain_epoch_cpu_s",
    "ray_epoch_cpu_s",
    "cpu_overhead_pct",
    "cpu_overhead_pct_range",
    "load_average_1min_at_starts",
}


@pytest.fixture
def shared_ray() -> Iterator[None]:
    """A local Ray instance as the benchmark starts one, for the smoke run's two runs (a running one is used).

    Stopped after the test, not kept for the session: the CPU accounting test below needs
    a process tree without Ray's processes.
    """
    started = not ray.is_initialized()
    if started:
        start_local_ray(include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_quick_report_compares_both_paths_over_two_runs(shared_ray, tmp_path, capsys):
    report_path = tmp_path / "ray.json"
    assert ray_overhead.main(["--quick", "--runs", "2", "--json", str(report_path)]) == 0

    report = json.loads(report_path.read_text())
    sections = report["sections"]
    assert list(sections) == ["machine", "setup", "per_epoch", "ray_run_cpu"]
    assert set(sections["per_epoch"]) == EPOCH_ROWS
    assert set(sections["ray_run_cpu"]) == CPU_ROWS
    # Two epochs per run: one timed epoch per plain run (before and after), one MLflow gap for Ray; two runs.
    assert sections["per_epoch"]["runs"] == 2
    assert sections["per_epoch"]["plain_epoch_spread"].endswith("over 4 epochs")
    assert sections["per_epoch"]["ray_epoch_spread"].endswith("over 2 gaps")
    assert sections["per_epoch"]["overhead_pct_range"].endswith("over 2 runs")
    assert sections["setup"]["plain_loop_threads"] == 1
    assert report["complete"] is True and len(report["runs"]) == 2
    for run in report["runs"]:
        assert len(run["ray_gaps_s"]) == 1 and len(run["plain_before_s"]) == 2
        # The Ray run's processes did work: the training worker and Ray's daemons used CPU time.
        assert run["ray_process_cpu_s"]["train_worker"] > 0 and run["ray_process_cpu_s"]["ray_daemons"] > 0
    printed = capsys.readouterr().out
    assert "[per_epoch]" in printed and "  overhead_pct " in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "1"], "--epochs 1: need at least 2"),
        (["--runs", "0"], "--runs 0: must be at least 1"),
        (["--size", "100"], "--size 100: must be a positive multiple of 32"),
        (["--locations", "4", "--batch", "8"], r"--locations 4: need at least one batch per worker \(1 x 8\)"),
    ],
)
def test_bad_sizes_are_rejected_before_any_work(flags, message):
    with pytest.raises(SystemExit, match=message):
        ray_overhead.main(flags)


@pytest.mark.parametrize(
    ("command", "group"),
    [
        ("ray::RayTrainWorker.run_train_fn", "train_worker"),
        ("ray::MapBatches(CutSamples)", "other_ray_workers"),
        ("ray::IDLE", "other_ray_workers"),
        ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node-id=x", "ray_daemons"),
    ],
)
def test_ray_processes_are_grouped_by_their_title(command, group):
    assert ray_overhead.process_group(command) == group


def test_process_tree_counts_the_cpu_time_of_a_child_process():
    with ray_overhead.ProcessTreeCpu(interval=0.05) as tree:
        started = time.time()
        busy = subprocess.run([sys.executable, "-c", "sum(range(30_000_000))"], check=True)
        ended = time.time()
    assert busy.returncode == 0
    seconds = tree.seconds()
    assert seconds["ray_daemons"] > 0.1 and seconds["train_worker"] == seconds["other_ray_workers"] == 0.0
    assert 0.0 < tree.seconds_between(started, ended)["ray_daemons"] <= seconds["ray_daemons"]
