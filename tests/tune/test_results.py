"""The sweep's results table, CSV, parallel-coordinates plot and the sizing of a sweep, on values worked out by hand."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.tune.experiment import Trial

from cromss_ray.cli import main
from cromss_ray.config import PretrainConfig, SearchDomain, TuneConfig, build_config
from cromss_ray.tune.results import (
    COMPLETED,
    ERRORED,
    STOPPED_EARLY,
    UNFINISHED,
    TrialRow,
    _axis_values,
    best_row,
    creation_order,
    format_table,
    from_csv,
    plot_parallel_coordinates,
    sampled_log_keys,
    table_columns,
    table_records,
    to_csv,
    trial_status,
)
from cromss_ray.tune.trial_runs import epochs_reported
from cromss_ray.tune.sweep import (
    SWEEP_STATE_FILE,
    SweepStateError,
    default_max_concurrent,
    sweep_fingerprint,
    sweep_report,
    trial_resources,
)

ROWS = [
    TrialRow("a_00000", {"optim.lr": 0.01, "model.fusion": "mid"}, 0.50, 3, COMPLETED),
    TrialRow("a_00001", {"optim.lr": 1e-9, "model.fusion": "late"}, 0.70, 1, STOPPED_EARLY),
    TrialRow("a_00002", {"optim.lr": 0.001, "model.fusion": "late"}, 0.60, 3, COMPLETED),
    TrialRow("a_00003", {"optim.lr": 0.1, "model.fusion": "mid"}, None, 0, ERRORED),
]
KEYS = ["optim.lr", "model.fusion"]


@pytest.mark.parametrize(
    ("status", "run", "planned", "expected"),
    [
        ("TERMINATED", 3, 3, COMPLETED),
        ("TERMINATED", 1, 3, STOPPED_EARLY),
        ("ERROR", 2, 3, ERRORED),
        ("RUNNING", 2, 3, UNFINISHED),
        ("PENDING", 0, 3, UNFINISHED),
    ],
)
def test_trial_status(status, run, planned, expected):
    assert trial_status(status, run, planned) == expected


def test_best_row_counts_completed_trials_only():
    assert best_row(ROWS, "max").trial_id == "a_00002"  # a_00001 is higher but was stopped early
    assert best_row(ROWS, "min").trial_id == "a_00000"
    assert best_row(ROWS, "max", statuses=(COMPLETED, STOPPED_EARLY)).trial_id == "a_00001"
    assert best_row(ROWS[3:], "max") is None


def test_table_by_hand():
    columns = table_columns(KEYS, "val/s2/miou")
    assert columns == ["trial", "optim.lr", "model.fusion", "best val/s2/miou", "epochs", "status"]
    records = table_records(ROWS[:2], KEYS)
    assert records == [
        ["a_00000", "0.01", "mid", "0.5", "3", "completed"],
        ["a_00001", "1e-09", "late", "0.7", "1", "stopped early"],
    ]
    table = format_table(["trial", "x"], [["t1", "10"], ["t22", "3"]], marked="t22")
    assert table.splitlines() == ["  trial  x", "  -----  --", "  t1     10", "* t22    3"]


def test_empty_table_has_its_header():
    assert format_table(["trial", "lr"], []).splitlines() == ["  trial  lr", "  -----  --"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.text(), min_size=3, max_size=3), max_size=5))
def test_csv_round_trip(records):
    columns = ["trial", "a,b", 'quote"d']
    assert from_csv(to_csv(columns, records)) == (columns, records)


def test_from_csv_refuses_empty_text():
    with pytest.raises(ValueError, match="results.csv is empty"):
        from_csv("")


def test_axis_positions_by_hand():
    assert _axis_values([2.0, 4.0, 3.0], log_scale=False) == ([0.0, 1.0, 0.5], [0.0, 1.0], ["2", "4"])
    scaled, ticks, labels = _axis_values([1e-4, 1e-2, 1e-3], log_scale=True)
    assert scaled == pytest.approx([0.0, 1.0, 0.5]) and labels == ["0.0001", "0.01"]
    assert _axis_values(["mid", "late", "mid"], log_scale=False) == ([1.0, 0.0, 1.0], [0.0, 1.0], ["late", "mid"])
    assert _axis_values([0.5, 0.5], log_scale=False) == ([0.0, 0.0], [0.0], ["0.5"])
    assert _axis_values([True, False], log_scale=False)[2] == ["False", "True"]


@pytest.mark.parametrize("rows", [ROWS, ROWS[3:]], ids=["trials", "no-metric-yet"])
def test_parallel_coordinates_png(tmp_path, rows):
    path = plot_parallel_coordinates(rows, KEYS, "val/s2/miou", tmp_path / "plot.png", log_keys=["optim.lr"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampled_log_keys():
    space = {"optim.lr": SearchDomain(loguniform=(1e-4, 1e-2)), "cromss.final_ratio": SearchDomain(uniform=(0.3, 0.9))}
    assert sampled_log_keys(space) == ["optim.lr"]


def test_epochs_reported_counts_completed_epochs():
    assert epochs_reported(None) == 0 and epochs_reported({"time_total_s": 1.0}) == 0
    assert epochs_reported({"epoch": 2, "val/s2/miou": 0.3}) == 2


@pytest.mark.parametrize(
    ("per_trial", "cluster", "expected"),
    [
        ({"CPU": 3.0, "GPU": 2.0}, {"CPU": 64.0, "GPU": 8.0}, 4),  # GPUs decide: 8 // 2
        ({"CPU": 3.0}, {"CPU": 16.0, "GPU": 8.0}, 5),  # a CPU sweep on a GPU cluster
        ({"CPU": 2.0}, {"CPU": 2.0}, 1),
        ({"CPU": 5.0}, {"CPU": 2.0}, 1),  # never below one: the trial waits for the cluster to grow
        ({"CPU": 1.0, "GPU": 0.5}, {"CPU": 8.0, "GPU": 1.0}, 2),
    ],
)
def test_default_max_concurrent(per_trial, cluster, expected):
    assert default_max_concurrent(per_trial, cluster) == expected


def test_trial_resources_are_workers_times_per_worker_plus_a_data_cpu():
    scaling = {"num_workers": 4, "cpus_per_worker": 2, "gpus_per_worker": 0.5}
    config = PretrainConfig.model_validate({"scaling": scaling})
    assert trial_resources(config, use_gpu=True) == {"CPU": 9.0, "GPU": 2.0}
    assert trial_resources(config, use_gpu=False) == {"CPU": 9.0}


def test_fingerprint_ignores_the_tracking_store_and_hides_credentials():
    plain = build_config(TuneConfig, {"tracking": {"uri": "sqlite:///a.db"}, "data": {"uri": "s3://bucket/x"}})
    moved = build_config(TuneConfig, {"tracking": {"uri": "sqlite:////abs/a.db"}, "data": {"uri": "s3://bucket/x"}})
    assert sweep_fingerprint(plain) == sweep_fingerprint(moved)
    assert "tracking.uri" not in sweep_fingerprint(plain)
    other = build_config(TuneConfig, {"data": {"uri": "https://user:secret@host/x"}})
    assert sweep_fingerprint(other)["data.uri"] == "https://host/x"
    changed = build_config(TuneConfig, {"tracking": {"uri": "sqlite:///a.db"}, "data": {"uri": "s3://bucket/y"}})
    assert sweep_fingerprint(changed) != sweep_fingerprint(plain)


def test_unreadable_sweep_state_is_named(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / SWEEP_STATE_FILE).write_text("{not json")
    with pytest.raises(SweepStateError, match=rf"{folder / SWEEP_STATE_FILE}: not a readable sweep state file"):
        sweep_report("broken", storage_path=str(tmp_path))
    assert main(["tune", "report", "broken", "--storage-path", str(tmp_path)]) == 1
    assert f"{folder / SWEEP_STATE_FILE}: not a readable sweep state file" in capsys.readouterr().err


def test_creation_order_follows_the_search_counter():
    def made(trial_id: str, tag: str) -> Trial:
        return Trial("run_trial", config={}, trial_id=trial_id, experiment_tag=tag, stub=True)

    trials = [made("x_00010", "10_lr=0.1"), made("x_00002", "2_lr=0.3"), made("abcd1234", "1"), made("y", "")]
    assert [trial.trial_id for trial in sorted(trials, key=creation_order)] == ["y", "abcd1234", "x_00002", "x_00010"]
