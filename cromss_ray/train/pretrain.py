"""CromSS pretraining on Ray Train: the per-worker loop and the TorchTrainer around it (spec 8-9, issue 4).

Every worker builds the two-branch network (spec 1), wraps it in DDP and trains on its
share of the training locations with the CromSS objective (spec 2-8); after each epoch
all workers score their share of the validation locations, and the confusion matrices
(spec 11) of the S1 branch, the S2 branch and the fused prediction are summed over the
workers, against the noisy labels (``val/<branch>/<metric>``) and, when the shards have
them, the clean ones (``val_clean/<branch>/<metric>``). The epoch's flat metrics (with
``epoch``, the number of completed epochs) go to Ray Train, and so to Ray Tune when a
trial drives the run, with a checkpoint every ``run.checkpoint_frequency`` epochs.

Rank 0 owns the MLflow run: the config as params, the metrics per epoch, and at the end
the confusion matrices, a few validation figures and the model, registered under
``cromss-<fusion>-<bands>b``. The checkpoint stores the MLflow run id, so a run resumed
from it (the same ``run.name`` and ``run.storage_path`` again, or a worker group Ray
Train restarts after a failure) keeps writing to the same MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer
from torch import nn

from cromss_ray.config import ConfigError, PretrainConfig
from cromss_ray.data.pipeline import DeviceBatch, pretrain_datasets, set_epoch, to_device
from cromss_ray.data.schema import S2_BAND_NAMES, S2_BAND_SUBSETS, ShardMetadata
from cromss_ray.method import ConfusionMatrix, CromSSLoss, build_model, fused_probabilities
from cromss_ray.tracking.pyfunc import log_pretrained_model
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.tracking.uris import absolute_tracking_uri
from cromss_ray.train.common import (
    TRAIN,
    VAL,
    ExactValidationDataConfig,
    Precision,
    TrainingState,
    all_gather_objects,
    all_reduce_sums,
    all_reduce_tensor,
    check_resumable,
    checkpoint_meta,
    finite_metrics,
    latest_checkpoint,
    latest_checkpoint_directory,
    learning_rate,
    open_tracker,
    prepare_training,
    progress_line,
    ray_run_config,
    ray_scaling_config,
    report_epoch,
    restore_model,
    step_scheduler,
    unwrap,
)

logger = logging.getLogger(__name__)

BRANCHES = ("s1", "s2", "fused")
RGB_BANDS = ("B4", "B3", "B2")
RGB_STRETCH = (0.02, 0.98)
"""Quantiles mapped to 0 and 1 in the S2 true-colour panels."""
PROGRESS_KEYS = (
    "train/loss",
    "val/loss",
    "val/s1/miou",
    "val/s2/miou",
    "val/fused/miou",
    "val_clean/fused/miou",
    "train/lr",
)
"""Metrics shown in the per-epoch progress line."""


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run leaves: Ray's result, the MLflow run, the registered version, final metrics.

    ``start_epoch`` is the number of epochs already done when the last (successful)
    worker group started: 0 for a fresh run, the checkpoint's epoch for a resumed one.
    ``version`` is None when ``tracking.log_model`` is off.
    """

    result: ray.train.Result
    run_id: str
    version: int | None
    metrics: dict[str, float]
    start_epoch: int


def build_trainer(
    config: PretrainConfig,
    *,
    parent_run_id: str | None = None,
    callbacks: Sequence[ray.train.UserCallback] = (),
    tags: Mapping[str, str] | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one pretraining run (the driver side; Ray must be initialised).

    ``parent_run_id`` nests the MLflow run (a Tune trial under its sweep), ``callbacks``
    receive every report (Tune's ``TuneReportCallback``), ``tags`` go on the MLflow run.
    """
    checkpoint = latest_checkpoint(config)
    if checkpoint is not None:
        check_resumable(config, checkpoint)
    datasets = pretrain_datasets(
        config.data, seed=config.run.seed, prior=config.cromss.prior, sigma=config.cromss.prior_sigma
    )
    if datasets.val is None or datasets.num_val == 0:
        raise ConfigError(
            f"data: no validation locations in {config.data.uri} (data.val_fraction is {config.data.val_fraction}, "
            "data.val_uri unset); pretraining validates every epoch"
        )
    if datasets.num_train < config.scaling.num_workers:
        raise ConfigError(
            f"scaling.num_workers: {config.scaling.num_workers} workers but only {datasets.num_train} "
            f"training locations in {config.data.uri}"
        )
    if datasets.meta.num_classes != config.model.classes:
        raise ConfigError(
            f"model.classes: {config.model.classes}, but the shards in {config.data.uri} have "
            f"{datasets.meta.num_classes} classes ({', '.join(datasets.meta.classes)})"
        )
    loop_config = {
        "config": config.model_dump(mode="json"),
        "meta": datasets.meta.model_dump(mode="json"),
        "clock": datasets.clock.name,
        "tracking_uri": absolute_tracking_uri(config.tracking.resolved_uri()),
        "parent_run_id": parent_run_id,
        "tags": dict(tags or {}),
    }
    return TorchTrainer(
        pretrain_loop,
        train_loop_config=loop_config,
        scaling_config=ray_scaling_config(config.scaling),
        run_config=ray_run_config(config.run, callbacks),
        datasets={TRAIN: datasets.train, VAL: datasets.val},
        dataset_config=ExactValidationDataConfig(),
    )


def run_pretrain(
    config: PretrainConfig,
    *,
    parent_run_id: str | None = None,
    callbacks: Sequence[ray.train.UserCallback] = (),
    tags: Mapping[str, str] | None = None,
) -> PretrainResult:
    """Train (or resume) one pretraining run to ``optim.epochs`` epochs and register its model.

    Raises ``ray.train.TrainingFailedError`` when the workers fail more than
    ``run.max_failures`` times, ConfigError for a config the data or an existing
    checkpoint contradicts.
    """
    result = build_trainer(config, parent_run_id=parent_run_id, callbacks=callbacks, tags=tags).fit()
    summary = result.return_value
    return PretrainResult(
        result=result,
        run_id=summary["mlflow_run_id"],
        version=summary["model_version"],
        metrics=summary["metrics"],
        start_epoch=summary["start_epoch"],
    )


def build_criterion(config: PretrainConfig, ignore_index: int) -> CromSSLoss:
    """The CromSS objective of a config (spec 2-8)."""
    cromss = config.cromss
    return CromSSLoss(
        loss_terms=cromss.loss_terms,
        consistency=cromss.consistency,
        consistency_weight=cromss.consistency_weight,
        smoothing_factors=cromss.smoothing_factors,
        selection=cromss.selection,
        final_ratio=cromss.final_ratio,
        ramp=cromss.ramp,
        ramp_length=cromss.ramp_length,
        confidence=cromss.confidence,
        class_balanced=cromss.class_balanced,
        classes=config.model.classes,
        ignore_index=ignore_index,
    )


@dataclass(frozen=True)
class WorkerContext:
    """What the loop's steps share on one worker."""

    config: PretrainConfig
    meta: ShardMetadata
    device: torch.device
    precision: Precision
    criterion: CromSSLoss

    def batches(
        self, shard: ray.data.DataIterator, *, training: bool
    ) -> Iterator[tuple[dict[str, torch.Tensor], DeviceBatch]]:
        """The shard's batches as tensors on the device, scaled, with the prior when training (spec 2, 9)."""
        prior = self.config.cromss.prior if training else "none"
        for batch in shard.iter_torch_batches(
            batch_size=self.config.optim.batch_size, prefetch_batches=self.config.data.prefetch_batches
        ):
            inputs = to_device(
                batch,
                self.meta,
                self.device,
                prior=prior,
                sigma=self.config.cromss.prior_sigma,
                classes=self.config.model.classes,
            )
            yield batch, inputs


def _restore(context: WorkerContext, checkpoint: Path | None) -> tuple[TrainingState, dict[str, Any] | None]:
    """The network (DDP-wrapped), optimiser, schedule and scaler, from the checkpoint when there is one."""
    config = context.config
    torch.manual_seed(config.run.seed)
    network = build_model(
        config.model.fusion,
        config.model.encoder,
        s1_bands=len(context.meta.s1.bands),
        s2_bands=config.data.s2_bands,
        classes=config.model.classes,
    )
    saved = restore_model(network, checkpoint)
    return prepare_training(network, config.optim, context.precision, checkpoint), saved


def train_epoch(
    context: WorkerContext, state: TrainingState, shard: ray.data.DataIterator, epoch: int
) -> dict[str, float]:
    """One pass over the worker's training share; the loss terms and diagnostics averaged over every rank's steps."""
    state.model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    for _, inputs in context.batches(shard, training=True):
        with context.precision.autocast():
            z1, z2 = state.model(inputs.x1, inputs.x2)
        loss, diagnostics = context.criterion(z1, z2, inputs.y, prior=inputs.prior, epoch=epoch)
        state.optimise(loss)
        for key, value in {"loss": loss.detach(), **diagnostics}.items():
            sums[key] = sums.get(key, 0.0) + value.float()
        steps += 1
    if steps == 0:
        raise RuntimeError(
            f"worker {ray.train.get_context().get_world_rank()} got no training batch in epoch {epoch + 1}"
        )
    totals = all_reduce_sums({**{key: float(value) for key, value in sums.items()}, "steps": steps}, context.device)
    count = totals.pop("steps")
    return {f"{TRAIN}/{key}": value / count for key, value in totals.items()}


def rgb_positions(s2_bands: int) -> list[int]:
    """Positions of B4, B3, B2 among the model's S2 bands (spec 9 subsets all contain them)."""
    names = [S2_BAND_NAMES[index] for index in S2_BAND_SUBSETS[s2_bands]]
    return [names.index(band) for band in RGB_BANDS]


def true_colour(s2: torch.Tensor, positions: Sequence[int]) -> np.ndarray:
    """An (H, W, 3) true-colour image in [0, 1] from one (B, H, W) S2 sample, contrast-stretched."""
    rgb = s2[list(positions)].float().permute(1, 2, 0)
    low, high = torch.quantile(rgb.flatten(), torch.tensor(RGB_STRETCH, device=rgb.device))
    return ((rgb - low) / (high - low).clamp_min(1e-6)).clamp(0, 1).cpu().numpy()


@dataclass
class Validation:
    """One validation pass: flat metrics, the summed confusion matrices, figure samples and a model input."""

    metrics: dict[str, float]
    confusion: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]]
    example: dict[str, torch.Tensor] | None


@torch.no_grad()
def validate(
    context: WorkerContext, network: nn.Module, shard: ray.data.DataIterator, epoch: int, figures: int
) -> Validation:
    """Score the worker's validation share; the loss and confusion matrices are summed over every rank.

    The validation loss is unweighted and unsmoothed (spec 8), averaged over samples;
    metrics come from one confusion matrix per branch and label kind (spec 11). The
    unwrapped network is used, so no DDP collective runs while ranks hold different
    numbers of batches. With ``figures`` (the same on every rank), the first samples of
    the ranks, in rank order, keep their panels and selection weight maps at ``epoch``
    (spec 6) for figures.
    """
    network.eval()
    classes, nodata, device = context.config.model.classes, context.meta.nodata, context.device
    label_kinds = (VAL, f"{VAL}_clean") if context.meta.has_clean_label else (VAL,)
    matrices = {(kind, branch): ConfusionMatrix(classes, nodata, device) for kind in label_kinds for branch in BRANCHES}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    samples: list[dict[str, Any]] = []
    example = None
    positions = rgb_positions(context.config.data.s2_bands)
    for batch, inputs in context.batches(shard, training=False):
        with context.precision.autocast():
            z1, z2 = network(inputs.x1, inputs.x2)
        z1, z2 = z1.float(), z2.float()
        loss, _ = context.criterion.evaluate(z1, z2, inputs.y)
        size = inputs.y.shape[0]
        loss_sum += loss.double() * size
        count += size
        predictions = {
            "s1": z1.argmax(dim=1),
            "s2": z2.argmax(dim=1),
            "fused": fused_probabilities(z1, z2).argmax(dim=1),
        }
        for (kind, branch), matrix in matrices.items():
            matrix.update(predictions[branch], inputs.y if kind == VAL else inputs.clean_y)
        if example is None:
            example = {"s1": inputs.x1[:1].cpu(), "s2": inputs.x2[:1].cpu()}
        if len(samples) < figures:
            drawn = _figure_samples(context, inputs, batch["key"], z1, z2, predictions["fused"], epoch, positions)
            samples.extend(drawn[: figures - len(samples)])
    if figures:
        gathered = all_gather_objects((samples, example))
        samples = [sample for rank_samples, _ in gathered for sample in rank_samples][:figures]
        example = next((rank_example for _, rank_example in gathered if rank_example is not None), None)
    totals = all_reduce_sums({"loss": float(loss_sum), "count": count}, device)
    metrics = {f"{VAL}/loss": totals["loss"] / totals["count"]}
    confusion = {}
    for (kind, branch), matrix in matrices.items():
        matrix.all_reduce(all_reduce_tensor)
        result = matrix.compute()
        confusion[f"{kind}/{branch}"] = result
        for name, value in result.items():
            if isinstance(value, float):
                metrics[f"{kind}/{branch}/{name}"] = value
    return Validation(metrics, confusion, samples, example)


def _figure_samples(
    context: WorkerContext,
    inputs: DeviceBatch,
    keys: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    prediction: torch.Tensor,
    epoch: int,
    positions: Sequence[int],
) -> list[dict[str, Any]]:
    """Figure panels per sample of a batch: S2 true colour, labels, fused prediction, selection weights."""
    weights_s1, weights_s2 = context.criterion.selection_maps(z1, z2, inputs.y, epoch=epoch)
    samples = []
    for index in range(inputs.y.shape[0]):
        sample = {
            "id": int(keys[index]),
            "s2_rgb": true_colour(inputs.x2[index], positions),
            "label": inputs.y[index].cpu().numpy(),
            "prediction": prediction[index].cpu().numpy(),
            "weights_s1": weights_s1[index].cpu().numpy(),
            "weights_s2": weights_s2[index].cpu().numpy(),
        }
        if inputs.clean_y is not None:
            sample["clean_label"] = inputs.clean_y[index].cpu().numpy()
        samples.append(sample)
    return samples


def _finish(
    context: WorkerContext,
    tracker: RunTracker,
    state: TrainingState,
    validation: Validation,
    epoch: int,
) -> int | None:
    """Rank 0 at the end: confusion matrices, validation figures, the model logged and registered."""
    config = context.config
    class_names = list(context.meta.classes)
    for name, result in validation.confusion.items():
        tracker.log_confusion_matrix(name, result, class_names)
    if validation.samples:
        tracker.log_validation_samples(validation.samples, class_names, epoch)
    if not config.tracking.log_model:
        return None
    version_tags = {key: f"{value:.6g}" for key, value in validation.metrics.items()}
    return log_pretrained_model(
        unwrap(state.model),
        config,
        tracker=tracker,
        registry_name=config.registry_name(),
        aliases=config.tracking.aliases,
        input_example=validation.example,
        epoch=epoch,
        version_tags={"epoch": str(epoch), **version_tags},
    )


def run_epoch(
    context: WorkerContext,
    state: TrainingState,
    shards: tuple[ray.data.DataIterator, ray.data.DataIterator],
    tracker: RunTracker | None,
    epoch: int,
) -> tuple[dict[str, float], Validation]:
    """Train and validate zero-based ``epoch``, step the schedule, log it (rank 0) and report it.

    The report carries a checkpoint every ``run.checkpoint_frequency`` epochs and after
    the last one; the last epoch's validation also keeps the figure samples.
    """
    config = context.config
    started = time.perf_counter()
    lr = learning_rate(state.optimizer)
    train_metrics = train_epoch(context, state, shards[0], epoch)
    completed = epoch + 1
    last = completed == config.optim.epochs
    figures = config.run.validation_figures if last else 0
    validation = validate(context, unwrap(state.model), shards[1], epoch, figures)
    step_scheduler(state.scheduler, validation.metrics[f"{VAL}/loss"])
    metrics = {**train_metrics, f"{TRAIN}/lr": lr, **validation.metrics}
    write = None
    if tracker is not None:
        tracker.log_metrics(metrics, completed)
        seconds = time.perf_counter() - started
        logger.info(progress_line("pretrain", completed, config.optim.epochs, metrics, PROGRESS_KEYS, seconds))
        if completed % config.run.checkpoint_frequency == 0 or last:
            meta = checkpoint_meta(tracker, completed, metrics, registry_name=config.registry_name())
            write = partial(state.save, config=config, meta=meta)
    report_epoch(metrics, epoch=completed, write_checkpoint=write)
    return metrics, validation


def pretrain_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The per-worker pretraining loop (Ray Train ``train_loop_per_worker``); rank 0 returns the run summary.

    Resumes from the checkpoint Ray Train hands the worker group (a re-run of the same
    run, or a restart after a failure), trains the remaining epochs, and ends with the
    final artifacts and the registered model (rank 0).
    """
    config = PretrainConfig.model_validate(loop_config["config"])
    meta = ShardMetadata.model_validate(loop_config["meta"])
    train_context = ray.train.get_context()
    device = ray.train.torch.get_device()
    precision = Precision.on(device, config.scaling.precision)
    context = WorkerContext(config, meta, device, precision, build_criterion(config, meta.nodata))
    with latest_checkpoint_directory() as checkpoint:
        state, saved = _restore(context, checkpoint)
    start_epoch = int(saved["epoch"]) if saved else 0
    shards = (ray.train.get_dataset_shard(TRAIN), ray.train.get_dataset_shard(VAL))
    is_rank_zero = train_context.get_world_rank() == 0
    tracker = open_tracker(config, loop_config, saved) if is_rank_zero else None
    if tracker is not None:
        logger.info(
            "[cromss pretrain] run %s: epochs %d..%d on %d worker(s), %s, %s; MLflow run %s",
            config.run.name,
            start_epoch + 1,
            config.optim.epochs,
            train_context.get_world_size(),
            device,
            precision.name,
            tracker.run_id,
        )
    metrics: dict[str, float] = dict(saved["metrics"]) if saved else {}
    validation = None
    with tracker or contextlib.nullcontext():
        for epoch in range(start_epoch, config.optim.epochs):
            if is_rank_zero:
                set_epoch(loop_config["clock"], epoch)
            metrics, validation = run_epoch(context, state, shards, tracker, epoch)
        if validation is None:
            final_epoch = config.optim.epochs - 1
            validation = validate(context, unwrap(state.model), shards[1], final_epoch, config.run.validation_figures)
        if tracker is None:
            return None
        version = _finish(context, tracker, state, validation, config.optim.epochs)
    return {
        "mlflow_run_id": tracker.run_id,
        "model_version": version,
        "metrics": finite_metrics(metrics),
        "start_epoch": start_epoch,
    }
