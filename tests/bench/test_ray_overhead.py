"""Smoke test of ``bench/ray_overhead.py`` at its tiniest size: the report's rows, never its timings.

The smoke run is one run of the comparison end to end; how the report summarises
repeated runs (median and range) is checked on hand-made runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench import ray_overhead


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


@pytest.mark.ray
@pytest.mark.slow
def test_quick_report_compares_both_paths(tmp_path, capsys):
    report_path = tmp_path / "ray.json"
    assert ray_overhead.main(["--quick", "--json", str(report_path)]) == 0

    report = json.loads(report_path.read_text())
    sections = report["sections"]
    assert list(sections) == ["machine", "setup", "per_epoch", "ray_run_cpu"]
    assert set(sections["per_epoch"]) == EPOCH_ROWS
    assert set(sections["ray_run_cpu"]) == CPU_ROWS
    # Two epochs: one timed epoch per plain run (before and after), one MLflow gap for Ray; one run.
    assert sections["per_epoch"]["runs"] == 1
    assert sections["per_epoch"]["plain_epoch_spread"].endswith("over 2 epochs")
    assert sections["per_epoch"]["ray_epoch_spread"].endswith("over 1 gaps")
    assert sections["setup"]["plain_loop_threads"] == 1
    assert report["complete"] is True and len(report["runs"]) == 1
    (run,) = report["runs"]
    assert len(run["ray_gaps_s"]) == 1 and len(run["plain_before_s"]) == 2
    # The Ray run's processes did work: the training worker and Ray's daemons used CPU time.
    assert run["ray_process_cpu_s"]["train_worker"] > 0 and run["ray_process_cpu_s"]["ray_daemons"] > 0
    printed = capsys.readouterr().out
    assert "[per_epoch]" in printed and "  overhead_pct " in printed


def hand_made_run(scale: float, load: float) -> ray_overhead.Run:
    """A run whose plain epochs take 2 s (after a 5 s warm-up) and whose Ray epochs take ``2 * scale`` s."""
    cpu = {"train_worker": 4.0 * scale, "other_ray_workers": 1.0 * scale, "ray_daemons": 1.0 * scale}
    return ray_overhead.Run(
        load_average_1min=load,
        plain_before_s=[5.0, 2.0, 2.0],
        plain_after_s=[5.0, 2.0, 2.0],
        plain_cpu_s=[2.0, 2.0, 2.0, 2.0],
        ray_gaps_s=[2.0 * scale, 2.0 * scale],
        ray_wall_s=10.0 * scale,
        ray_process_cpu_s={group: 2 * seconds for group, seconds in cpu.items()},
        ray_timed_epochs_cpu_s=cpu,
        driver_cpu_s=1.0,
    )


def test_runs_are_summarised_by_their_median_and_range():
    """Three runs 10 %, 50 % and 20 % slower through Ray: the report gives the median run (20 %) and the range."""
    runs = [hand_made_run(1.1, 0.5), hand_made_run(1.5, 1.5), hand_made_run(1.2, 1.0)]
    epochs = ray_overhead.comparison_section(runs, samples=8)
    assert epochs["runs"] == 3
    assert epochs["plain_epoch_s"] == 2.0 and epochs["ray_epoch_s"] == pytest.approx(2.4)
    assert epochs["overhead_pct"] == pytest.approx(20.0)
    assert epochs["overhead_pct_range"] == "10.00 .. 50.00 % over 3 runs"
    assert epochs["plain_samples_per_s"] == 4.0 and epochs["ray_samples_per_s"] == pytest.approx(8 / 2.4)
    assert epochs["ray_epoch_spread"] == "2.20 .. 3.00 s over 6 gaps"
    assert epochs["plain_first_epochs_s"] == "5.00, 5.00, 5.00, 5.00, 5.00, 5.00"
    # Wall 12 s, of which 4.8 s are the two timed gaps.
    assert epochs["ray_run_wall_s"] == pytest.approx(12.0)
    assert epochs["ray_startup_first_epoch_finish_s"] == pytest.approx(7.2)

    cpu = ray_overhead.cpu_section(runs)
    # Per timed epoch: (4 + 1 + 1) x 1.2 / 2 gaps = 3.6 CPU-s against the plain loop's 2: 80 %.
    assert cpu["train_worker_cpu_s_per_timed_epoch"] == pytest.approx(2.4)
    assert cpu["ray_epoch_cpu_s"] == pytest.approx(3.6)
    assert cpu["cpu_overhead_pct"] == pytest.approx(80.0)
    assert cpu["cpu_overhead_pct_range"] == "65.00 .. 125.00 % over 3 runs"
    # Whole run: 12 x 1.2 CPU-s of Ray processes plus 1 of the driver over 12 s of wall time.
    assert cpu["ray_run_cores_busy"] == pytest.approx((12 * 1.2 + 1) / 12)
    assert cpu["load_average_1min_at_starts"] == "0.50, 1.50, 1.00"


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


def test_a_worker_changing_group_between_samples_moves_no_cpu_time_between_groups(monkeypatch):
    """A pooled Ray worker that takes on the Train worker's title mid-span: the span's CPU time is its own
    growth (4 s), all of it the training worker's, none negative in the group it left."""
    root = os.getpid()
    tables = iter(
        [
            {101: (root, 2.0, "ray::IDLE"), 102: (root, 1.0, "gcs_server")},
            {101: (root, 5.0, "ray::IDLE"), 102: (root, 1.5, "gcs_server")},
            {101: (root, 7.0, "ray::RayTrainWorker.__init__"), 102: (root, 2.0, "gcs_server")},
            {101: (root, 9.0, "ray::RayTrainWorker.train_fn"), 102: (root, 2.5, "gcs_server")},
        ]
    )
    monkeypatch.setattr(ray_overhead, "process_table", lambda: next(tables))
    tree = ray_overhead.ProcessTreeCpu(interval=3600.0)
    tree.sample()
    tree.baseline = dict(tree.cpu)
    for moment in (10.0, 20.0, 30.0):
        monkeypatch.setattr(ray_overhead.time, "time", lambda moment=moment: moment)
        tree.sample()
    assert tree.seconds_between(10.0, 30.0) == {"train_worker": 4.0, "other_ray_workers": 0.0, "ray_daemons": 1.0}
    assert tree.seconds() == {"train_worker": 7.0, "other_ray_workers": 0.0, "ray_daemons": 1.5}
