"""The one training-loop skeleton: driver set-up, the ``TorchTrainer``, and the per-worker epoch loop.

Pretraining (:mod:`cromss_ray.train.pretrain`) and fine-tuning
(:mod:`cromss_ray.train.finetune`) supply only what differs, as a :class:`Task`: the
network and its restoring, one epoch of training, one of validation, and what rank 0
does at the end. Everything else is written here once:

* the driver checks that an existing checkpoint holds the same network, hands every
  worker a typed :class:`WorkerInput` and builds the trainer (:func:`torch_trainer`);
* every worker restores from the checkpoint Ray Train hands it (a re-run of the same
  run, or a restart after a failure), and rank 0 opens the MLflow run (the one the
  checkpoint names when resuming);
* each epoch: rank 0 advances the pipeline's epoch clock, the task trains and
  validates, the learning-rate schedule steps (on the validation loss for the plateau
  schedule), every rank reports the epoch to Ray Train, with a checkpoint every
  ``run.checkpoint_frequency`` epochs and after the last one, and only then rank 0 logs
  the metrics: MLflow writes are queued and sent when the server answers, so a
  tracking-server outage neither stops the training nor costs an epoch;
* at the end rank 0 delivers what is queued (waiting at most ``tracking.flush_timeout_s``),
  the task finishes (on every rank, so it may run collectives) and rank 0 returns the run
  summary.

Per-epoch additions that every task needs (diagnostics, guards on the loss, metric
buffering) belong in :func:`run_worker`; what one task needs, in its :class:`Task`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from cromss_ray.config import FinetuneConfig, PretrainConfig
from cromss_ray.data.pipeline import set_epoch
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.tracking.uris import absolute_tracking_uri
from cromss_ray.train.checkpoints import (
    TrainingState,
    check_resumable,
    checkpoint_meta,
    finite_metrics,
    latest_checkpoint,
    latest_checkpoint_directory,
)
from cromss_ray.train.cluster import TRAIN, VAL, ExactValidationDataConfig, ray_run_config, ray_scaling_config
from cromss_ray.train.optim import Precision, learning_rate, step_lr_scheduler
from cromss_ray.train.reporting import progress_line, report_epoch

logger = logging.getLogger(__name__)

INPUT_KEY = "input"
"""The key of the :class:`WorkerInput` in Ray Train's ``train_loop_config``."""


@dataclass(frozen=True)
class WorkerInput:
    """What the driver hands every worker: the config and shard metadata (as JSON, validated again on the
    worker), the pipeline's epoch clock, where and how to track, and what each checkpoint's ``meta.json``
    adds (``checkpoint_extra``, e.g. the registry name). ``task`` holds what only one task needs."""

    config: dict[str, Any]
    meta: dict[str, Any]
    clock: str
    tracking_uri: str
    parent_run_id: str | None
    tags: dict[str, str]
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    task: Any = None


@dataclass(frozen=True)
class RunLinks:
    """How a run hangs together with its caller: ``parent_run_id`` nests its MLflow run (a Tune trial
    under its sweep), ``callbacks`` receive every report (Tune's ``TuneReportCallback``), ``tags`` go on
    its MLflow run."""

    parent_run_id: str | None = None
    callbacks: Sequence[ray.train.UserCallback] = ()
    tags: Mapping[str, str] = field(default_factory=dict)


def worker_input(
    config: PretrainConfig | FinetuneConfig,
    meta: Any,
    clock: str,
    links: RunLinks,
    *,
    tags: Mapping[str, str],
    checkpoint_extra: Mapping[str, Any],
    task: Any = None,
) -> WorkerInput:
    """The :class:`WorkerInput` of a run (driver side): JSON config and metadata, absolute tracking URI;
    ``tags`` are the task's own run tags, ``links.tags`` the caller's (which win)."""
    return WorkerInput(
        config=config.model_dump(mode="json"),
        meta=meta.model_dump(mode="json"),
        clock=clock,
        tracking_uri=absolute_tracking_uri(config.tracking.resolved_uri()),
        parent_run_id=links.parent_run_id,
        tags={**tags, **links.tags},
        checkpoint_extra=dict(checkpoint_extra),
        task=task,
    )


def check_checkpoint(config: PretrainConfig | FinetuneConfig) -> None:
    """An earlier run of the same name and storage path must hold the same network (driver side)."""
    checkpoint = latest_checkpoint(config)
    if checkpoint is not None:
        check_resumable(config, checkpoint)


def torch_trainer(
    worker_loop: Callable[[dict[str, Any]], dict[str, Any] | None],
    config: PretrainConfig | FinetuneConfig,
    inputs: WorkerInput,
    datasets: Mapping[str, ray.data.Dataset],
    links: RunLinks,
) -> TorchTrainer:
    """The TorchTrainer of one run: ``worker_loop`` on ``scaling``'s workers, ``run``'s identity, the
    datasets split with validation kept exact (:class:`~cromss_ray.train.cluster.ExactValidationDataConfig`)."""
    return TorchTrainer(
        worker_loop,
        train_loop_config={INPUT_KEY: inputs},
        scaling_config=ray_scaling_config(config.scaling),
        run_config=ray_run_config(config.run, links.callbacks),
        datasets=dict(datasets),
        dataset_config=ExactValidationDataConfig(),
    )


def open_tracker(
    config: PretrainConfig | FinetuneConfig, inputs: WorkerInput, saved: Mapping[str, Any] | None
) -> RunTracker:
    """Rank 0's MLflow run: the run the checkpoint's ``meta.json`` names when resuming, else a new one."""
    return RunTracker.start(
        config,
        tracking_uri=inputs.tracking_uri,
        experiment=config.tracking.experiment,
        run_name=config.run.name,
        run_id=saved["mlflow_run_id"] if saved else None,
        parent_run_id=inputs.parent_run_id,
        tags={"ray.train.run_name": config.run.name, **inputs.tags},
        flush_timeout_s=config.tracking.flush_timeout_s,
    )


class TaskContext(Protocol):
    """What the loop reads of a task's worker context (the tasks' ``WorkerContext`` classes)."""

    config: PretrainConfig | FinetuneConfig
    precision: Precision


class Task(Protocol):
    """What a training task supplies to :func:`run_worker`."""

    name: str
    """``pretrain`` or ``finetune``: the progress lines' prefix."""
    context: TaskContext
    """The task's step-function context: its ``config`` and ``precision`` drive the loop."""
    progress_keys: Sequence[str]

    def describe(self) -> str:
        """What trains, for the start line (e.g. ``"unet on S2, "``; may be empty)."""

    def restore(self, checkpoint: Path | None) -> tuple[TrainingState, dict[str, Any] | None]:
        """The network (DDP-wrapped), optimiser, schedule and scaler, and the checkpoint's ``meta.json``."""

    def before_epoch(self, state: TrainingState, epoch: int, tracker: RunTracker | None) -> None:
        """Anything that changes the network at the start of zero-based ``epoch``."""

    def train_epoch(self, state: TrainingState, epoch: int) -> dict[str, float]:
        """One pass over the worker's training share; metrics summed over every rank."""

    def validate_epoch(self, state: TrainingState, epoch: int) -> dict[str, float]:
        """The epoch's validation metrics (``val/loss`` drives the plateau schedule); may be empty."""

    def finish(
        self, state: TrainingState, tracker: RunTracker | None, metrics: Mapping[str, float]
    ) -> dict[str, Any] | None:
        """After the last epoch, on every rank; rank 0 (``tracker`` given) returns what its summary adds."""


def run_worker(task: Task, inputs: WorkerInput) -> dict[str, Any] | None:
    """The per-worker loop (module docstring); rank 0 returns the run summary, the others None."""
    config, precision = task.context.config, task.context.precision
    train_context = ray.train.get_context()
    is_rank_zero = train_context.get_world_rank() == 0
    with latest_checkpoint_directory() as checkpoint:
        state, saved = task.restore(checkpoint)
    start_epoch = int(saved["epoch"]) if saved else 0
    epochs = config.optim.epochs
    tracker = open_tracker(config, inputs, saved) if is_rank_zero else None
    if tracker is not None:
        logger.info(
            "[cromss %s] run %s: %sepochs %d..%d on %d worker(s), %s, %s; MLflow run %s",
            task.name,
            config.run.name,
            task.describe(),
            start_epoch + 1,
            epochs,
            train_context.get_world_size(),
            precision.device,
            precision.name,
            tracker.run_id,
        )
    metrics: dict[str, float] = dict(saved["metrics"]) if saved else {}
    with tracker or contextlib.nullcontext():
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            if is_rank_zero:
                set_epoch(inputs.clock, epoch)
            task.before_epoch(state, epoch, tracker)
            lr = learning_rate(state.optimizer)
            metrics = {**task.train_epoch(state, epoch), f"{TRAIN}/lr": lr}
            metrics.update(task.validate_epoch(state, epoch))
            step_lr_scheduler(state.scheduler, metrics.get(f"{VAL}/loss", math.nan))
            completed = epoch + 1
            write = None
            if tracker is not None:
                seconds = time.perf_counter() - started
                logger.info(progress_line(task.name, completed, epochs, metrics, task.progress_keys, seconds))
                if completed % config.run.checkpoint_frequency == 0 or completed == epochs:
                    meta = checkpoint_meta(tracker, completed, metrics, **inputs.checkpoint_extra)
                    write = partial(state.save, config=config, meta=meta)
            report_epoch(metrics, epoch=completed, write_checkpoint=write)
            if tracker is not None:
                tracker.log_metrics(metrics, completed)
        if tracker is not None:
            tracker.flush()
        summary = task.finish(state, tracker, metrics)
    if tracker is None:
        return None
    return {
        "mlflow_run_id": tracker.run_id,
        "metrics": finite_metrics(metrics),
        "start_epoch": start_epoch,
        **(summary or {}),
    }

