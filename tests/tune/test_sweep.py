"""A real CPU sweep: 2 tiny pretraining trials under ASHA, interrupted after the first and resumed.

The search space makes the ASHA decision certain: the sweep metric is ``train/loss``
(minimised) and the trials differ only in the consistency weight, 0 and 8. Both trials
start from the same seeded network on the same data, and the consistency term is
non-negative (about the prediction entropy, ln 9 for an untrained network), so after one
epoch the second trial's loss is above the first one's: with ``grace_period`` 1 and a
reduction factor of 2, the first rung is at epoch 1 and the first trial's loss is the only
one recorded there, so ASHA lets the first trial (weight 0) run its 2 epochs and stops the
second after its first. The interrupt comes after the first trial, so the second trial's
stop needs the rungs recorded before it: the resumed sweep proves that ASHA's state
survives. Trials run one at a time, in grid order (2 CPUs: a worker plus one CPU for the
data pipeline per trial), and checkpoint only after their last epoch.

The worker asks for a fifth of a CPU: a trial that is stopped (by ASHA or the interrupt)
ends its Train controller with it, and Ray Train returns that run's reservation through
its placement-group cleaner, which needs the Ray dashboard; a test cluster without one
keeps the reservation until the session ends, and the small share keeps a CPU free for
the data pipeline of the trials that follow.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.tune
import torch

from cromss_ray.cli import main
from cromss_ray.config import ConfigError, TuneConfig, build_config, load_config, to_yaml
from cromss_ray.tracking.model_uris import registry_client
from cromss_ray.tracking.registry import load_pretrained
from cromss_ray.tune.results import COMPLETED, STOPPED_EARLY, UNFINISHED
from cromss_ray.tune.trial_runs import SWEEP_TAG, TRIAL_TAG, trial_registry_name
from cromss_ray.tune.space import param_space
from cromss_ray.tune.sweep import (
    ASHA_STATE_FILE,
    PLOT_PNG,
    RESULTS_CSV,
    SWEEP_STATE_FILE,
    SweepResult,
    build_search_alg,
    run_sweep,
    sweep_metric,
    sweep_report,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TUNE_TINY = REPO / "jobs" / "configs" / "tune_tiny.yaml"
WEIGHTS = [0.0, 8.0]
EPOCHS = 2


class InterruptAfterFirstTrial(ray.tune.Callback):
    """Sends the sweep SIGUSR1 (Tune's graceful stop, like Ctrl+C) once the first trial has ended.

    Tune pickles callbacks with the sweep and restores them on resume; the marker file
    keeps the restored copy from interrupting again.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if not self.marker.exists():
            self.marker.write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


def sweep_config(locations: Path, tracking_uri: str, storage: Path, name: str) -> TuneConfig:
    """``jobs/configs/tune_tiny.yaml`` with the deterministic space of the module docstring."""
    return load_config(
        TuneConfig,
        TUNE_TINY,
        [
            f"run.name={name}",
            f"run.storage_path={storage}",
            "run.validation_figures=0",
            f"run.checkpoint_frequency={EPOCHS}",
            "scaling.cpus_per_worker=0.2",
            f"optim.epochs={EPOCHS}",
            "optim.lr=0.0001",
            "data.crop=32",
            "tune.search_alg=grid",
            "tune.metric=train/loss",
            "tune.mode=min",
            "tune.num_samples=1",
            "tune.reduction_factor=2",
            f"tune.search_space={{cromss.consistency_weight: {{grid: {WEIGHTS}}}}}",
        ],
        data=str(locations),
        tracking_uri=tracking_uri,
    )


@dataclass(frozen=True)
class Sweep:
    """The sweep run twice: interrupted after its first trial, then resumed by the same call."""

    config: TuneConfig
    first: SweepResult
    parent_status_after_first: str
    second: SweepResult
    first_trial: str


@pytest.fixture(scope="module")
def sweep(ray_cluster, sweep_locations, tracking_uri, tmp_path_factory, request) -> Iterator[Sweep]:
    """An interrupted sweep and its restart; their checkpoints (~300 MB) are removed after the module's tests pass."""
    storage = tmp_path_factory.mktemp("sweeps")
    config = sweep_config(sweep_locations, tracking_uri, storage, "consistency")
    marker = storage / "interrupted"
    first = run_sweep(config, callbacks=[InterruptAfterFirstTrial(marker)])
    status = registry_client(tracking_uri).get_run(first.parent_run_id).info.status
    second = run_sweep(config)
    yield Sweep(config, first, status, second, marker.read_text())
    if request.session.testsfailed == 0:
        shutil.rmtree(storage)


def test_interrupted_sweep_stops_after_the_first_trial(sweep):
    first = sweep.first
    assert first.interrupted and sweep.parent_status_after_first == "KILLED"
    assert first.rows[0].trial_id == sweep.first_trial and first.rows[0].status == COMPLETED
    # Tune may have created the second trial before the stop took effect; it did not get to an end.
    assert all(row.status == UNFINISHED for row in first.rows[1:])


def test_resumed_sweep_finishes_with_asha_stopping_the_worse_trials(sweep):
    first, second, first_trial = sweep.first, sweep.second, sweep.first_trial
    assert not second.interrupted and second.parent_run_id == first.parent_run_id
    assert [row.sampled["cromss.consistency_weight"] for row in second.rows] == WEIGHTS
    assert [(row.status, row.epochs) for row in second.rows] == [(COMPLETED, EPOCHS)] + [(STOPPED_EARLY, 1)] * (len(WEIGHTS) - 1)
    assert second.rows[0].trial_id == first_trial
    assert second.best == second.rows[0]
    assert second.table.splitlines()[2].startswith(f"* {first_trial}")


def test_parent_and_child_runs_in_mlflow(sweep, tracking_uri):
    config, second = sweep.config, sweep.second
    client = registry_client(tracking_uri)
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[SWEEP_TAG] == config.run.name
    assert parent.data.tags["best_trial"] == second.best.trial_id
    assert {artifact.path for artifact in client.list_artifacts(parent.info.run_id)} >= {RESULTS_CSV, PLOT_PNG}
    experiment = client.get_experiment_by_name("cromss-tune")
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{second.parent_run_id}'"
    )
    by_trial = {run.data.tags[TRIAL_TAG]: run for run in children}
    assert sorted(by_trial) == sorted(row.trial_id for row in second.rows)  # one run per trial
    for row in second.rows:
        run = by_trial[row.trial_id]
        stopped = row.status == STOPPED_EARLY
        assert run.data.params["cromss.consistency_weight"] == str(row.sampled["cromss.consistency_weight"])
        assert run.data.tags["stopped_early"] == run.data.params["stopped_early"] == str(stopped).lower()
        assert run.info.status == ("KILLED" if stopped else "FINISHED")
        steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(1, len(steps) + 1))
        if stopped:
            # ASHA's stop reaches the trial while it trains on: MLflow may hold epochs
            # the sweep never saw (up to all of them), never fewer.
            assert row.epochs <= len(steps) <= config.optim.epochs
        else:
            assert len(steps) == row.epochs == config.optim.epochs


def test_best_model_is_registered_and_loads(sweep, tracking_uri):
    config, second = sweep.config, sweep.second
    name = config.registry_name()
    assert second.best_model == f"models:/{name}@best"
    client = registry_client(tracking_uri)
    version = client.get_model_version_by_alias(name, "best")
    assert version.tags[TRIAL_TAG] == second.best.trial_id
    trial_versions = client.search_model_versions(f"name = '{trial_registry_name(name)}'")
    assert version.run_id in {trial_version.run_id for trial_version in trial_versions}
    pulled = load_pretrained(second.best_model, tracking_uri=tracking_uri)
    assert pulled.version == int(version.version) and pulled.config.cromss.consistency_weight == 0.0
    with torch.no_grad():
        z1, z2 = pulled.model(torch.zeros(1, 2, 32, 32), torch.zeros(1, 13, 32, 32))
    assert z1.shape == z2.shape == (1, config.model.classes, 32, 32)


def test_results_kept_in_the_sweep_folder_and_reported_again(sweep, tracking_uri, tmp_path, capsys):
    config, second = sweep.config, sweep.second
    folder = Path(second.path)
    assert {SWEEP_STATE_FILE, ASHA_STATE_FILE, RESULTS_CSV, PLOT_PNG} <= {path.name for path in folder.iterdir()}
    assert (folder / RESULTS_CSV).read_bytes().decode().splitlines()[0] == (
        "trial,cromss.consistency_weight,best train/loss,epochs,status"
    )
    from_folder = sweep_report(config.run.name, storage_path=config.run.storage_path)
    from_mlflow = sweep_report(config.run.name, storage_path=str(tmp_path), tracking_uri=tracking_uri)
    for report in (from_folder, from_mlflow):
        assert second.table in report
    assert main(["tune", "report", config.run.name, "--storage-path", config.run.storage_path]) == 0
    assert second.table in capsys.readouterr().out
    missing = ["tune", "report", "no-such-sweep", "--storage-path", str(tmp_path), "--tracking-uri", tracking_uri]
    assert main(missing) == 1
    assert "no sweep 'no-such-sweep'" in capsys.readouterr().err


def test_the_same_command_on_a_finished_sweep_reprints_it(sweep, tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(to_yaml(sweep.config))
    assert main(["tune", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert sweep.second.table in out and f"best trial {sweep.first_trial}" in out


def test_resuming_with_another_config_is_refused(sweep):
    changed = sweep.config.model_copy(deep=True)
    changed.tune.num_samples = 2
    with pytest.raises(ConfigError, match=r"was started with another config \(differs in tune\.num_samples\)"):
        run_sweep(changed)
    assert Path(sweep.second.path, RESULTS_CSV).exists()


def test_invalid_space_is_refused_before_anything_is_written(ray_cluster, sweep_locations, tracking_uri, tmp_path):
    config = sweep_config(sweep_locations, tracking_uri, tmp_path, "bad-space")
    config.tune.search_alg = "optuna"
    with pytest.raises(ConfigError, match=r"tune\.search_space\.cromss\.consistency_weight: grid domains need"):
        run_sweep(config)
    assert not any(tmp_path.iterdir())


def test_default_metric_is_clean_s2_miou_where_the_data_has_clean_labels(sweep_locations, tracking_uri, tmp_path):
    config = sweep_config(sweep_locations, tracking_uri, tmp_path, "metric")
    config.tune.metric = None
    assert sweep_metric(config) == "val_clean/s2/miou"


def test_optuna_tpe_suggests_from_the_config_space():
    config = build_config(
        TuneConfig,
        {
            "tune": {
                "search_alg": "optuna",
                "search_space": {"model.fusion": {"choice": ["mid", "late"]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}},
            }
        },
    )
    searcher = build_search_alg(config, max_concurrent=2)
    assert isinstance(searcher, ray.tune.search.ConcurrencyLimiter) and searcher.max_concurrent == 2
    assert searcher.set_search_properties("val/s2/miou", "max", param_space(config.tune.search_space, "optuna"))
    suggestions = [searcher.suggest(f"t{index}") for index in range(3)]
    assert suggestions[2] is None  # the limiter holds a third trial back
    for suggestion in suggestions[:2]:
        assert suggestion["model.fusion"] in ("mid", "late") and 1e-4 <= suggestion["optim.lr"] <= 1e-2


def test_tune_tiny_config_is_valid_and_translates():
    config = load_config(TuneConfig, TUNE_TINY)
    assert config.tune.num_samples == 4 and config.scaling.use_gpu is False
    space = param_space(config.tune.search_space, config.tune.search_alg)
    assert set(space) == set(config.tune.search_space)


def test_tune_without_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tune"])
    assert exit_info.value.code == 2 and "--config is required" in capsys.readouterr().err
