"""The sweep's MLflow runs: find a trial's run, close it when Tune ends the trial, promote the winner.

A trial's run is opened by the trial's rank 0 (it is a pretraining run) and tagged with
the sweep name and trial id; the sweep finds it by those tags. All store access goes
through the tracking layer's client (:func:`cromss_ray.tracking.model_uris.registry_client`).
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import ray.tune
from ray.tune.experiment import Trial

from cromss_ray.tracking.model_uris import registry_client
from cromss_ray.tracking.registry import (
    filter_literal,
    logged_model_id,
    register_model_version,
    set_alias,
    using_tracking_uri,
)

SWEEP_TAG = "cromss.sweep"
TRIAL_TAG = "cromss.trial_id"
STOPPED_EARLY = "stopped_early"
PARENT_TAG = "mlflow.parentRunId"
RUNNING = "RUNNING"
TRIAL_REGISTRY_SUFFIX = "-trials"
"""Trials register their models as ``<standalone name>-trials``, so that they never move the aliases
(``@latest`` included) of the standalone models; only the winner is promoted to the standalone name."""


def trial_registry_name(standalone: str) -> str:
    """The registered model the trials of models named ``standalone`` register under."""
    return f"{standalone}{TRIAL_REGISTRY_SUFFIX}"


def find_runs(tracking_uri: str, experiment: str, tags: dict[str, str]) -> list[Any]:
    """Runs of ``experiment`` carrying all ``tags``, newest first (empty when the experiment is missing)."""
    client = registry_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(f"tags.`{key}` = {filter_literal(value)}" for key, value in tags.items())
    return client.search_runs([found.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])


def find_trial_run(tracking_uri: str, experiment: str, sweep_name: str, trial_id: str) -> str | None:
    """The run id of one trial of a sweep, or None when the trial never opened a run."""
    found = find_runs(tracking_uri, experiment, {SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id})
    return found[0].info.run_id if found else None


def find_sweep_run(tracking_uri: str, experiment: str, sweep_name: str) -> Any | None:
    """The parent run (an MLflow ``Run``) of the newest sweep called ``sweep_name``, or None."""
    found = find_runs(tracking_uri, experiment, {SWEEP_TAG: sweep_name})
    parents = [run for run in found if PARENT_TAG not in run.data.tags]
    return parents[0] if parents else None


def delete_trial_runs(tracking_uri: str, experiment: str, sweep_name: str, trial_id: str) -> list[str]:
    """Delete the runs a trial left behind; the ids deleted.

    Called when a trial starts over from scratch (it was interrupted before its first
    checkpoint): its earlier run holds a partial epoch that is being redone, and would
    otherwise stay RUNNING beside the new one.
    """
    client = registry_client(tracking_uri)
    found = find_runs(tracking_uri, experiment, {SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id})
    stale = [run.info.run_id for run in found]
    for run_id in stale:
        client.delete_run(run_id)
    return stale


def read_artifact_text(tracking_uri: str, run_id: str, path: str) -> str:
    """The text of artifact ``path`` of run ``run_id``."""
    client = registry_client(tracking_uri)
    with TemporaryDirectory(prefix="cromss-artifact-") as folder:
        return Path(client.download_artifacts(run_id, path, folder)).read_text()


def close_trial_run(tracking_uri: str, run_id: str, *, stopped_early: bool, errored: bool) -> None:
    """Tag a trial's run ``stopped_early`` (tag and param) and end it if its workers could not.

    A trial the scheduler stopped was ended with its workers: its run is set KILLED; a
    failed trial's run FAILED; a completed trial's run was already finished by rank 0.
    """
    client = registry_client(tracking_uri)
    flag = str(stopped_early).lower()
    client.set_tag(run_id, STOPPED_EARLY, flag)
    client.log_param(run_id, STOPPED_EARLY, flag)
    if client.get_run(run_id).info.status == RUNNING:
        client.set_terminated(run_id, "FAILED" if errored else "KILLED")


def epochs_reported(result: dict[str, Any] | None) -> int:
    """The epoch count of a trial's last result (epochs are counted from 1), 0 before any."""
    if not result or "epoch" not in result:
        return 0
    return int(result["epoch"])


class TrialRunCloser(ray.tune.Callback):
    """Closes each trial's MLflow run as soon as Tune ends the trial (completed, stopped or failed).

    Runs on the sweep's driver; it is pickled with the Tuner, so it holds plain values only.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, sweep_name: str, epochs: int) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.epochs = epochs

    def _close(self, trial: Trial, errored: bool) -> None:
        run_id = find_trial_run(self.tracking_uri, self.experiment, self.sweep_name, trial.trial_id)
        if run_id is None:
            return
        planned = int(trial.config.get("optim.epochs", self.epochs))
        stopped_early = not errored and epochs_reported(trial.last_result) < planned
        close_trial_run(self.tracking_uri, run_id, stopped_early=stopped_early, errored=errored)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._close(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._close(trial, errored=True)


def promote_trial_model(tracking_uri: str, experiment: str, sweep_name: str, trial_id: str, alias: str) -> str | None:
    """Register the trial's model as a version of the standalone name and point ``@alias`` there; its
    ``models:/`` URI, or None when the trial registered no model.

    The trial registered its model under :func:`trial_registry_name` at the end of training
    (found by run id); the promoted version is the same logged model, with the trial's
    tags, the sweep and the trial id. Promoting again (a finished sweep run again) finds
    the version promoted before instead of registering another.
    """
    run_id = find_trial_run(tracking_uri, experiment, sweep_name, trial_id)
    if run_id is None:
        return None
    client = registry_client(tracking_uri)
    versions = client.search_model_versions(f"run_id = {filter_literal(run_id)}")
    registered = [version for version in versions if version.name.endswith(TRIAL_REGISTRY_SUFFIX)]
    if not registered:
        return None
    trial_version = max(registered, key=lambda version: int(version.version))
    standalone = trial_version.name.removesuffix(TRIAL_REGISTRY_SUFFIX)
    promoted = [int(version.version) for version in versions if version.name == standalone]
    if promoted:
        number = max(promoted)
    else:
        with using_tracking_uri(tracking_uri):
            number = register_model_version(
                client,
                standalone,
                logged_model_id(trial_version),
                trial_version.description or "",
                run_id=run_id,
                tags={**trial_version.tags, SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id},
            )
    set_alias(standalone, alias, number, tracking_uri=tracking_uri)
    return f"models:/{standalone}@{alias}"
