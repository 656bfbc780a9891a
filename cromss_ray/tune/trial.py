"""One sweep trial: a Ray Tune driver function that runs one pretraining Ray Train run.

This is the Train V2 pattern for Tune: the trial is a light driver process (it holds no
CPU or GPU of its own) that builds a ``TorchTrainer`` for the sampled config and fits it.
The trainer's workers get the resources of ``scaling`` like any pretraining run; their
per-epoch metrics reach Tune (and so the ASHA scheduler) through
``TuneReportCallback``. When the scheduler stops a trial, Tune ends the driver actor, and
the Train controller and workers it owns end with it.

Each trial's Train run is named after the sweep and the trial id and stored under the
sweep's folder, so a trial that Tune restarts (an interrupted sweep resumed, a driver
that failed) continues its Train run from the latest checkpoint instead of starting over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray.data
import ray.tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback

from cromss_ray.config import PretrainConfig
from cromss_ray.train.checkpoints import latest_checkpoint
from cromss_ray.train.loop import RunLinks
from cromss_ray.train.pretrain import run_pretrain
from cromss_ray.train.probe import ProbeData
from cromss_ray.tune.trial_runs import SWEEP_TAG, TRIAL_TAG, delete_trial_runs, trial_registry_name
from cromss_ray.tune.space import apply_sample

TRAIN_RUNS_DIR = "train"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one sweep shares: the base config and where its runs go.

    ``base`` has absolute data and tracking locations (trials run in their own working
    directories) and the sweep's MLflow experiment, so that each trial's run nests under
    the sweep's parent run; ``train_storage`` is the folder of the trials' Train runs;
    ``probe`` the transfer probe's data when the sweep's objective is 'transfer'.
    """

    sweep_name: str
    base: PretrainConfig
    train_storage: str
    parent_run_id: str
    probe: ProbeData | None = None


def trial_dirname(trial: Trial) -> str:
    """Short trial folder names (Tune's default repeats the whole sampled config)."""
    return f"trial_{trial.trial_id}"


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The Ray Train run name and MLflow run name of one trial."""
    return f"{sweep_name}_{trial_id}"


def trial_config(context: TrialContext, sample: Mapping[str, Any], trial_id: str) -> PretrainConfig:
    """The pretraining config of one trial: the sampled leaves, its own run name and storage, and its own
    registered model (:func:`~cromss_ray.tune.trial_runs.trial_registry_name` of the standalone name)."""
    config = apply_sample(context.base, sample)
    config.run.name = trial_run_name(context.sweep_name, trial_id)
    config.run.storage_path = context.train_storage
    config.tracking.registry_name = trial_registry_name(config.registry_name())
    return config


def run_trial(sample: dict[str, Any], *, context: TrialContext) -> None:
    """Tune function trainable: fit one pretraining run with the sampled config.

    A trial restarted before its first checkpoint starts its Train run over, and so its
    MLflow run: the run of the earlier attempt is deleted first (one run per trial).
    Ray Data progress bars are off in trials: with several trials at once they would
    drown Tune's trial table.
    """
    ray.data.DataContext.get_current().enable_progress_bars = False
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(context, sample, trial_id)
    if latest_checkpoint(config) is None:
        delete_trial_runs(config.tracking.resolved_uri(), config.tracking.experiment, context.sweep_name, trial_id)
    links = RunLinks(
        parent_run_id=context.parent_run_id,
        callbacks=[TuneReportCallback()],
        tags={SWEEP_TAG: context.sweep_name, TRIAL_TAG: trial_id},
    )
    run_pretrain(config, links, context.probe)
