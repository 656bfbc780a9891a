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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.data
import ray.train
import torch
from ray.train.torch import TorchTrainer

from cromss_ray.config import ConfigError, FinetuneConfig, PretrainConfig, flatten
from cromss_ray.data.pipeline import DownstreamDatasets, PretrainDatasets, SkippedRows, set_epoch
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.tracking.uris import absolute_tracking_uri, carries_credentials
from cromss_ray.train.checkpoints import (
    TrainingState,
    check_resumable,
    checkpoint_meta,
    finite_metrics,
    latest_checkpoint,
    latest_checkpoint_directory,
    restored_changes,
)
from cromss_ray.train.cluster import TRAIN, VAL, ExactValidationDataConfig, ray_run_config, ray_scaling_config
from cromss_ray.train.collectives import all_reduce_tensor
from cromss_ray.train.optim import Precision, learning_rate, step_lr_scheduler
from cromss_ray.train.rendezvous import rendezvous_config
from cromss_ray.train.reporting import progress_line, report_epoch

logger = logging.getLogger(__name__)

INPUT_KEY = "input"
"""The key of the :class:`WorkerInput`'s object reference in Ray Train's ``train_loop_config``."""
SKIPPED_ROWS_METRIC = "data/skipped_rows"
"""Bad rows left out so far with ``data.on_bad_row=skip`` (row reads over all epochs and splits)."""
NONFINITE_STEPS_METRIC = f"{TRAIN}/nonfinite_steps"
"""The number of training steps of the epoch skipped for a non-finite loss or gradients."""


class NonFiniteLossError(RuntimeError):
    """Too many training steps of an epoch had a non-finite loss or gradients (``optim.max_nonfinite_steps``)."""


@dataclass
class GuardedSteps:
    """The optimiser steps of one training epoch, each skipped when its loss or gradients are not finite.

    A skipped step changes nothing: no optimiser step, and the network's buffers (batch-norm
    statistics, which the forward pass already moved) are put back as they were before it.
    Every rank takes the same decision (a non-finite value on any rank skips the step on
    all), so the ranks stay in step and in sync. More than ``optim.max_nonfinite_steps``
    skipped steps in the epoch, or an epoch with no step taken at all, fail the run with
    :class:`NonFiniteLossError`. With fp16 the gradient scaler keeps skipping the steps whose
    scaled gradients overflow (and lowers its scale), as it always does; only a non-finite
    loss counts there.
    """

    state: TrainingState
    run_name: str
    epoch: int
    limit: int
    skipped: int = 0
    taken: int = 0
    buffers: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, config: PretrainConfig | FinetuneConfig, state: TrainingState, epoch: int) -> GuardedSteps:
        return cls(state, config.run.name, epoch, config.optim.max_nonfinite_steps)

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches``, with the network's buffers kept before each is handed out (to restore on a skip)."""
        for batch in batches:
            self.buffers = [buffer.detach().clone() for buffer in self.state.model.buffers()]
            yield batch

    def optimise(self, loss: torch.Tensor) -> bool:
        """Back-propagate ``loss`` and step the optimiser, unless a rank's loss or gradients are not finite;
        whether the step was taken."""
        state = self.state
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        bad = ~torch.isfinite(loss.detach())
        if not state.scaler.is_enabled():
            gradients = [parameter.grad for parameter in state.model.parameters() if parameter.grad is not None]
            if gradients:
                bad |= ~torch.isfinite(torch.nn.utils.get_total_norm(gradients))
        if int(all_reduce_tensor(bad.to(torch.int32).reshape(1))) == 0:
            state.scaler.step(state.optimizer)
            state.scaler.update()
            self.taken += 1
            return True
        state.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, kept in zip(state.model.buffers(), self.buffers, strict=True):
                buffer.copy_(kept)
        self.skipped += 1
        if self.skipped > self.limit:
            raise NonFiniteLossError(
                f"run '{self.run_name}', epoch {self.epoch + 1}: {self.skipped} training steps with a non-finite "
                f"loss or gradients, more than optim.max_nonfinite_steps ({self.limit}); the run stops, its last "
                "checkpoint (all finite) is kept"
            )
        return False

    def metrics(self) -> dict[str, float]:
        """The epoch's skipped-step count (:data:`NONFINITE_STEPS_METRIC`); raises when every step was skipped."""
        if self.skipped and not self.taken:
            raise NonFiniteLossError(
                f"run '{self.run_name}', epoch {self.epoch + 1}: every training step ({self.skipped}) had a "
                "non-finite loss or gradients; the run stops, its last checkpoint (all finite) is kept"
            )
        return {NONFINITE_STEPS_METRIC: float(self.skipped)}


@dataclass(frozen=True)
class WorkerInput:
    """What the driver hands every worker: the config and shard metadata (as JSON, validated again on the
    worker), the names of the pipeline's epoch clock and skipped-row counter, where and how to track, and
    what each checkpoint's ``meta.json`` adds (``checkpoint_extra``, e.g. the registry name). ``task``
    holds what only one task needs."""

    config: dict[str, Any]
    meta: dict[str, Any]
    clock: str
    skipped: str
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
    datasets: PretrainDatasets | DownstreamDatasets,
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
        meta=datasets.meta.model_dump(mode="json"),
        clock=datasets.clock.name,
        skipped=datasets.skipped.name,
        tracking_uri=absolute_tracking_uri(config.tracking.resolved_uri()),
        parent_run_id=links.parent_run_id,
        tags={**tags, **links.tags},
        checkpoint_extra=dict(checkpoint_extra),
        task=task,
    )


def check_no_credentials(config: PretrainConfig | FinetuneConfig) -> None:
    """Refuse credentials written into the config or the tracking URI (driver side, before anything starts).

    The config travels to every worker, into each checkpoint's ``config.yaml`` and into Tune's
    experiment state; credentials belong in each node's environment or instance profile, where
    MLflow and the AWS SDK find them at use (clusters/README.md, "Credentials").
    """
    keys = [
        key
        for key, value in flatten(config).items()
        for text in (value if isinstance(value, list) else [value])
        if isinstance(text, str) and carries_credentials(text)
    ]
    if config.tracking.uri is None and carries_credentials(config.tracking.resolved_uri()):
        keys.append("MLFLOW_TRACKING_URI (environment)")
    if keys:
        raise ConfigError(
            f"{', '.join(keys)}: carries credentials (user:password@ or a secret query value), which would reach "
            "checkpoints, Ray's state and logs; give them to every node's environment instead: "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or an instance profile"
        )


def check_checkpoint(config: PretrainConfig | FinetuneConfig) -> None:
    """An earlier run of the same name and storage path must hold the same network and, unless
    ``run.allow_config_change``, the same config but for the changeable keys (driver side,
    :func:`~cromss_ray.train.checkpoints.check_resumable`)."""
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
    datasets split with validation kept exact (:class:`~cromss_ray.train.cluster.ExactValidationDataConfig`),
    the process group on 127.0.0.1 when the whole cluster is (:mod:`~cromss_ray.train.rendezvous`).

    ``inputs`` go through the object store (:func:`received_input`): Ray Train's controller unpickles
    ``train_loop_config``, and a :class:`WorkerInput` there would make it import this module and so torch's
    model stack, MLflow and the method, several seconds on the path of every run's start-up.
    """
    return TorchTrainer(
        worker_loop,
        train_loop_config={INPUT_KEY: ray.put(inputs)},
        torch_config=rendezvous_config(),
        scaling_config=ray_scaling_config(config.scaling),
        run_config=ray_run_config(config.run, links.callbacks),
        datasets=dict(datasets),
        dataset_config=ExactValidationDataConfig(),
    )


def received_input(loop_config: Mapping[str, Any]) -> WorkerInput:
    """The run's :class:`WorkerInput` on a worker, from the ``train_loop_config`` of :func:`torch_trainer`."""
    return ray.get(loop_config[INPUT_KEY])


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
        max_backoff_s=config.tracking.max_backoff_s,
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
        changes = restored_changes(config, checkpoint) if is_rank_zero else {}
    start_epoch = int(saved["epoch"]) if saved else 0
    epochs = config.optim.epochs
    tracker = open_tracker(config, inputs, saved) if is_rank_zero else None
    skipped_rows = SkippedRows.named(inputs.skipped) if is_rank_zero else None
    if tracker is not None and changes:
        tracker.record_config_change(changes, start_epoch)
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
            if tracker is not None and skipped_rows is not None:
                metrics[SKIPPED_ROWS_METRIC] = float(skipped_rows.count())
                seconds = time.perf_counter() - started
                logger.info(
                    progress_line(
                        task.name, config.run.name, completed, epochs, metrics, task.progress_keys, seconds
                    )
                )
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

