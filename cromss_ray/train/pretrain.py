"""CromSS pretraining on Ray Train: the pretraining task of the training-loop skeleton (spec 8-9).

Every worker builds the two-branch network (spec 1), wraps it in DDP and trains on its
share of the training locations with the CromSS objective (spec 2-8); with ``model.fusion``
'single' it trains the single-modality baseline instead (spec 11: one U-Net on
``model.modality``, the segmentation terms on the one-hot noisy labels), validated, scored
and registered the same way for its one branch (no fused prediction). After each epoch
all workers score their share of the validation locations, and the confusion matrices
(spec 11) of the S1 branch, the S2 branch and the fused prediction are summed over the
workers, against the noisy labels (``val/<branch>/<metric>``) and, when the shards have
them, the clean ones (``val_clean/<branch>/<metric>``). With clean labels, the noise
diagnostics of the S1 and S2 selection (:class:`~cromss_ray.method.NoiseDiagnostics`) are
summed over the workers too, on the training and the validation batches
(``train/<branch>/<metric>``, ``val/<branch>/<metric>``). The epoch's flat metrics (with
``epoch``, the number of completed epochs) go to Ray Train, and so to Ray Tune when a
trial drives the run, with a checkpoint every ``run.checkpoint_frequency`` epochs.

Rank 0 owns the MLflow run: the config as params, the metrics per epoch, and at the end
the confusion matrices, a few validation figures and the model, registered under
``cromss-<fusion>-<bands>b``. Resuming, reporting and checkpointing are the skeleton's
(:mod:`cromss_ray.train.loop`); the step functions (:func:`train_epoch`,
:func:`validate`) take a :class:`WorkerContext` and run without Ray on one worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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
from cromss_ray.data.device import DeviceBatch, to_device
from cromss_ray.data.pipeline import pretrain_datasets
from cromss_ray.data.schema import S2_BAND_NAMES, S2_BAND_SUBSETS, ShardMetadata
from cromss_ray.method import (
    ConfusionMatrix,
    CromSSLoss,
    NoiseDiagnostics,
    SelectionMaps,
    SingleModalityLoss,
    fused_probabilities,
)
from cromss_ray.method.losses import MODALITIES
from cromss_ray.models.stored import network_from_config
from cromss_ray.tracking.pyfunc import log_pretrained_model
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.train.checkpoints import TrainingState, prepare_training, restore_model
from cromss_ray.train.cluster import TRAIN, VAL
from cromss_ray.train.collectives import all_gather_objects, all_reduce_sums, all_reduce_tensor, unwrap
from cromss_ray.train.loop import GuardedSteps, RunLinks, check_checkpoint, received_input
from cromss_ray.train.loop import check_no_credentials, run_worker, torch_trainer, worker_input
from cromss_ray.train.optim import Precision
from cromss_ray.train.probe import ProbeData, ProbeRows, transfer_probe

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
    "transfer/s1/miou",
    "transfer/s2/miou",
    "train/lr",
)
"""Metrics shown in the per-epoch progress line."""
FUSED = "fused"
NOISE_METRICS = ("selected_precision", "noise_recall", "noise_auroc", "base_rate")
"""The noise diagnostics logged per branch as ``<split>/<branch>/<metric>`` when the shards have clean labels."""


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
    config: PretrainConfig, links: RunLinks = RunLinks(), probe: ProbeData | None = None
) -> TorchTrainer:
    """The TorchTrainer of one pretraining run (the driver side; Ray must be initialised); with ``probe``,
    rank 0 also scores the encoder by the transfer probe (:mod:`cromss_ray.train.probe`) after each epoch
    that is due."""
    check_no_credentials(config)
    check_checkpoint(config)
    datasets = pretrain_datasets(
        config.data, seed=config.run.seed, prior=config.training_prior(), sigma=config.cromss.prior_sigma
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
    inputs = worker_input(
        config,
        datasets,
        links,
        tags={},
        checkpoint_extra={"registry_name": config.registry_name()},
        task=probe,
    )
    return torch_trainer(pretrain_loop, config, inputs, {TRAIN: datasets.train, VAL: datasets.val}, links)


def run_pretrain(
    config: PretrainConfig, links: RunLinks = RunLinks(), probe: ProbeData | None = None
) -> PretrainResult:
    """Train (or resume) one pretraining run to ``optim.epochs`` epochs and register its model; with
    ``probe``, its epochs also report the transfer probe's scores (:func:`build_trainer`).

    Raises ``ray.train.TrainingFailedError`` when the workers fail more than
    ``run.max_failures`` times, ConfigError for a config the data or an existing
    checkpoint contradicts.
    """
    result = build_trainer(config, links, probe).fit()
    summary = result.return_value
    return PretrainResult(
        result=result,
        run_id=summary["mlflow_run_id"],
        version=summary["model_version"],
        metrics=summary["metrics"],
        start_epoch=summary["start_epoch"],
    )


Objective = CromSSLoss | SingleModalityLoss


def build_criterion(config: PretrainConfig, ignore_index: int) -> Objective:
    """The objective of a config: CromSS (spec 2-8), or the single-modality baseline's (spec 11)."""
    cromss = config.cromss
    if config.model.fusion == "single":
        return SingleModalityLoss(
            config.model.modality,
            loss_terms=cromss.loss_terms,
            confidence=cromss.confidence,
            classes=config.model.classes,
            ignore_index=ignore_index,
        )
    return CromSSLoss(
        loss_terms=cromss.loss_terms,
        consistency=cromss.consistency,
        consistency_weight=cromss.consistency_weight,
        smoothing_factors=config.smoothing_factors(),
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
    criterion: Objective

    @property
    def modalities(self) -> tuple[str, ...]:
        """The network's branches: S1 and S2, or the baseline's one modality."""
        return (self.config.model.modality,) if self.config.model.fusion == "single" else MODALITIES

    @property
    def predictions(self) -> tuple[str, ...]:
        """What validation scores: every branch, and the fused prediction of two (spec 1)."""
        return self.modalities if len(self.modalities) == 1 else (*self.modalities, FUSED)

    def logits(self, network: nn.Module, inputs: DeviceBatch) -> tuple[torch.Tensor, ...]:
        """The network's logits of each of :attr:`modalities` (in the run's precision)."""
        images = {"s1": inputs.x1, "s2": inputs.x2}
        with self.precision.autocast():
            outputs = network(*(images[modality] for modality in self.modalities))
        return outputs if isinstance(outputs, tuple) else (outputs,)

    def batches(
        self, shard: ray.data.DataIterator, *, training: bool
    ) -> Iterator[tuple[dict[str, torch.Tensor], DeviceBatch]]:
        """The shard's batches as tensors on the device, scaled, with the prior when training (spec 2, 9)."""
        prior = self.config.training_prior() if training else "none"
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

    def noise_diagnostics(self) -> dict[str, NoiseDiagnostics]:
        """An empty accumulator per branch whose labels the selection weights (spec 6) when the shards have
        clean labels, else none. The baseline's one branch is scored with its own label confidence as trust."""
        if not self.meta.has_clean_label:
            return {}
        classes, nodata = self.config.model.classes, self.meta.nodata
        return {branch: NoiseDiagnostics(classes, nodata, self.device) for branch in self.modalities}


def add_noise_evidence(
    diagnostics: Mapping[str, NoiseDiagnostics], inputs: DeviceBatch, maps: SelectionMaps
) -> None:
    """Add a batch's selection of each branch to its accumulator (on the device, no host synchronisation);
    nothing without accumulators (shards without clean labels)."""
    if not diagnostics:
        return
    for accumulator, trust, weights in zip(diagnostics.values(), maps.trust, maps.weights, strict=True):
        accumulator.update(inputs.y, inputs.clean_y, weights, trust)


def noise_metrics(split: str, diagnostics: Mapping[str, NoiseDiagnostics]) -> dict[str, float]:
    """The epoch's noise diagnostics of every branch, summed over every rank: ``<split>/<branch>/<metric>``."""
    metrics = {}
    for branch, accumulator in diagnostics.items():
        accumulator.all_reduce(all_reduce_tensor)
        result = accumulator.compute()
        metrics.update({f"{split}/{branch}/{name}": result[name] for name in NOISE_METRICS})
    return metrics


def train_epoch(
    context: WorkerContext, state: TrainingState, shard: ray.data.DataIterator, epoch: int
) -> dict[str, float]:
    """One pass over the worker's training share; the loss terms and diagnostics averaged over every rank's steps.

    A step with a non-finite loss or gradients is skipped and counted
    (:class:`~cromss_ray.train.loop.GuardedSteps`, ``train/nonfinite_steps``).

    With clean labels, also the noise diagnostics of the selection each step applied,
    over every rank's training pixels (``train/<branch>/<metric>``, :data:`NOISE_METRICS`).
    """
    state.model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    noise = context.noise_diagnostics()
    guard = GuardedSteps.of(context.config, state, epoch)
    for _, inputs in guard.batches(context.batches(shard, training=True)):
        logits = context.logits(state.model, inputs)
        loss, diagnostics, maps = context.criterion.forward_with_selection(
            *logits, inputs.y, prior=inputs.prior, epoch=epoch
        )
        if not guard.optimise(loss):
            continue
        add_noise_evidence(noise, inputs, maps)
        for key, value in {"loss": loss.detach(), **diagnostics}.items():
            sums[key] = sums.get(key, 0.0) + value.float()
        steps += 1
    skipped = guard.metrics()
    if steps == 0:
        raise RuntimeError(
            f"worker {ray.train.get_context().get_world_rank()} got no training batch in epoch {epoch + 1}"
        )
    totals = all_reduce_sums({**{key: float(value) for key, value in sums.items()}, "steps": steps}, context.device)
    count = totals.pop("steps")
    averages = {f"{TRAIN}/{key}": value / count for key, value in totals.items()}
    return {**averages, **noise_metrics(TRAIN, noise), **skipped}


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
    """One validation pass: flat metrics, the summed confusion matrices, figure samples and one sample's
    stored images (the shards' storage, S2 cut to the run's bands), the registered model's input example."""

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
    metrics come from one confusion matrix per prediction (:attr:`WorkerContext.predictions`)
    and label kind (spec 11). The
    unwrapped network is used, so no DDP collective runs while ranks hold different
    numbers of batches. With ``figures`` (the same on every rank), the first samples of
    the ranks, in rank order, keep their panels and selection weight maps at ``epoch``
    (spec 6) for figures. With clean labels, the selection the loss would apply at
    ``epoch`` is scored on the validation batches as in training (``val/<branch>/<metric>``,
    :data:`NOISE_METRICS`).
    """
    network.eval()
    classes, nodata, device = context.config.model.classes, context.meta.nodata, context.device
    label_kinds = (VAL, f"{VAL}_clean") if context.meta.has_clean_label else (VAL,)
    matrices = {
        (kind, branch): ConfusionMatrix(classes, nodata, device)
        for kind in label_kinds
        for branch in context.predictions
    }
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    samples: list[dict[str, Any]] = []
    example = None
    noise = context.noise_diagnostics()
    positions = rgb_positions(context.config.data.s2_bands)
    for batch, inputs in context.batches(shard, training=False):
        logits = tuple(z.float() for z in context.logits(network, inputs))
        loss, _ = context.criterion.evaluate(*logits, inputs.y)
        size = inputs.y.shape[0]
        loss_sum += loss.double() * size
        count += size
        predictions = {modality: z.argmax(dim=1) for modality, z in zip(context.modalities, logits, strict=True)}
        if FUSED in context.predictions:
            predictions[FUSED] = fused_probabilities(*logits).argmax(dim=1)
        for (kind, branch), matrix in matrices.items():
            matrix.update(predictions[branch], inputs.y if kind == VAL else inputs.clean_y)
        if example is None:
            example = {modality: batch[modality][:1].clone() for modality in context.modalities}
        drawing = len(samples) < figures
        if noise or drawing:
            maps = context.criterion.selection_maps(*logits, inputs.y, epoch=epoch)
            add_noise_evidence(noise, inputs, maps)
        if drawing:
            shown = predictions[context.predictions[-1]]
            drawn = _figure_samples(inputs, batch["key"], context.modalities, maps, shown, positions)
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
    metrics.update(noise_metrics(VAL, noise))
    return Validation(metrics, confusion, samples, example)


def _figure_samples(
    inputs: DeviceBatch,
    keys: torch.Tensor,
    modalities: Sequence[str],
    maps: SelectionMaps,
    prediction: torch.Tensor,
    positions: Sequence[int],
) -> list[dict[str, Any]]:
    """Figure panels per sample of a batch: S2 true colour, labels, the prediction (fused for CromSS),
    each branch's selection weights."""
    samples = []
    for index in range(inputs.y.shape[0]):
        sample = {
            "id": int(keys[index]),
            "s2_rgb": true_colour(inputs.x2[index], positions),
            "label": inputs.y[index].cpu().numpy(),
            "prediction": prediction[index].cpu().numpy(),
        }
        for modality, weights in zip(modalities, maps.weights, strict=True):
            sample[f"weights_{modality}"] = weights[index].cpu().numpy()
        if inputs.clean_y is not None:
            sample["clean_label"] = inputs.clean_y[index].cpu().numpy()
        samples.append(sample)
    return samples


@dataclass
class PretrainTask:
    """Pretraining as a :class:`~cromss_ray.train.loop.Task`: the two-branch network and the CromSS
    objective (or the single-modality baseline's), validation of every branch and the fused prediction,
    the model registered at the end."""

    context: WorkerContext
    probe: ProbeData | None = None
    name: str = "pretrain"
    progress_keys: Sequence[str] = PROGRESS_KEYS
    validation: Validation | None = None
    shards: dict[str, ray.data.DataIterator] = field(default_factory=dict)
    probe_rows: ProbeRows | None = None
    probe_scores: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return ""

    def restore(self, checkpoint: Path | None) -> tuple[TrainingState, dict[str, Any] | None]:
        self.shards = {split: ray.train.get_dataset_shard(split) for split in (TRAIN, VAL)}
        torch.manual_seed(self.context.config.run.seed)
        network = network_from_config(self.context.config)
        saved = restore_model(network, checkpoint)
        return prepare_training(network, self.context.config.optim, self.context.precision, checkpoint), saved

    def before_epoch(self, state: TrainingState, epoch: int, tracker: RunTracker | None) -> None:
        return None

    def train_epoch(self, state: TrainingState, epoch: int) -> dict[str, float]:
        return train_epoch(self.context, state, self.shards[TRAIN], epoch)

    def validate_epoch(self, state: TrainingState, epoch: int) -> dict[str, float]:
        """Validation; the last epoch's also keeps the figure samples. With a probe, rank 0 adds its scores."""
        last = epoch + 1 == self.context.config.optim.epochs
        figures = self.context.config.run.validation_figures if last else 0
        self.validation = validate(self.context, unwrap(state.model), self.shards[VAL], epoch, figures)
        if self.probe is None or ray.train.get_context().get_world_rank() != 0:
            return self.validation.metrics
        return {**self.validation.metrics, **self.transfer_scores(state, epoch)}

    def transfer_scores(self, state: TrainingState, epoch: int) -> dict[str, float]:
        """The probe's scores, computed every ``tune.transfer.every`` epochs, at the last and at a (re)start.

        Ray Tune needs the sweep metric in every report, so an epoch between probes reports the
        latest probe's scores again, and ``transfer/epoch`` says which epoch they are of.
        """
        settings, config = self.probe.settings, self.context.config
        completed = epoch + 1
        if completed % settings.every == 0 or completed == config.optim.epochs or not self.probe_scores:
            self.probe_rows = self.probe_rows or self.probe.load()
            network = unwrap(state.model)
            scores = transfer_probe(
                network, config.model.encoder, config.data.s2_bands, self.probe_rows, settings, self.context.device
            )
            self.probe_scores = {**scores, "transfer/epoch": float(completed)}
        return self.probe_scores

    def finish(
        self, state: TrainingState, tracker: RunTracker | None, metrics: Mapping[str, float]
    ) -> dict[str, Any] | None:
        """Rank 0: confusion matrices, validation figures, the model logged and registered.

        A resumed run with no epoch left validates once more (on every rank) for them.
        """
        config = self.context.config
        if self.validation is None:
            final_epoch = config.optim.epochs - 1
            figures = config.run.validation_figures
            self.validation = validate(self.context, unwrap(state.model), self.shards[VAL], final_epoch, figures)
        if tracker is None:
            return None
        validation, epoch = self.validation, config.optim.epochs
        class_names = list(self.context.meta.classes)
        for name, result in validation.confusion.items():
            tracker.log_confusion_matrix(name, result, class_names)
        if validation.samples:
            tracker.log_validation_samples(validation.samples, class_names, epoch)
        if not config.tracking.log_model:
            return {"model_version": None}
        version_tags = {key: f"{value:.6g}" for key, value in validation.metrics.items()}
        version = log_pretrained_model(
            unwrap(state.model),
            config,
            tracker=tracker,
            registry_name=config.registry_name(),
            aliases=config.tracking.aliases,
            input_example=validation.example,
            example_storage={"s1": self.context.meta.s1, "s2": self.context.meta.s2},
            epoch=epoch,
            version_tags=version_tags,
        )
        return {"model_version": version}


def pretrain_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The per-worker pretraining loop (Ray Train ``train_loop_per_worker``); rank 0 returns the run summary."""
    inputs = received_input(loop_config)
    config = PretrainConfig.model_validate(inputs.config)
    meta = ShardMetadata.model_validate(inputs.meta)
    device = ray.train.torch.get_device()
    precision = Precision.on(device, config.scaling.precision)
    context = WorkerContext(config, meta, device, precision, build_criterion(config, meta.nodata))
    return run_worker(PretrainTask(context, probe=inputs.task), inputs)
