"""Transfer learning on Ray Train: a pretrained branch encoder under a fresh decoder (spec 10-11).

The driver resolves the initialisation (:func:`resolve_init`): the S1 or S2 encoder of a
registered pretrained model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), of one of
the paper's checkpoints (spec 12), or none (``random``). The network's encoder name and
S2 band subset are the source's (:func:`effective_config`); the classes and the ignore
value come from the downstream shards (spec 10).

Every worker builds the single-modality smp network (any architecture), loads the
encoder, and trains it with ``optim.loss`` (cross-entropy, Dice, both, or focal; spec 11's
recipe is CE + Dice) on its share of the training tiles (or a seeded subset of them,
``data.train_fraction`` / ``data.train_count``), cut to ``data.crop`` pixels (when not
given, derived from the decoder's output stride: :func:`default_crop`). A 'frozen'
encoder (the whole run, or until ``model.unfreeze_epoch``) has no trainable parameters;
with ``model.frozen_batch_norm`` 'adapt' (the reference) its batch norm still trains, so
its running statistics follow the downstream data, with 'fixed' it stays in eval mode.
After each epoch the validation split, when there is one, is scored from one confusion
matrix summed over the workers (spec 11: ``val/<branch>/oa``, ``miou``, ``mf1``, per-class
IoU and F1), on the centre crops the pipeline cuts. After the last epoch the test split
(``data.test_uri``, else the validation rows) is scored on whole tiles with the scoring
of ``cromss evaluate`` (:func:`cromss_ray.models.scoring.score_tiles`; each worker its
share of the shard files, the confusion matrices summed): the registered
``test/<branch>/...`` scores are what ``cromss evaluate`` prints for the model and data.
No validation score selects a model: the last epoch's network is tested and registered
(as the reference reports it) and checkpoints are kept by recency, so a run without a
validation split (``data.val_fraction`` 0, the reference's recipe) is complete as long
as it has a test split.

Rank 0 owns the MLflow run (experiment ``cromss-finetune``): the config, per-epoch
metrics, the confusion matrices as JSON and figures, and at the end the model,
registered as ``cromss-ft-<dataset>-<decoder>`` with tags and a description naming the
source model and version (:mod:`cromss_ray.tracking.finetuned`). The loop, resuming and
reporting are the skeleton's (:mod:`cromss_ray.train.loop`); this module supplies the
fine-tuning task (:class:`FinetuneTask`) and its step functions, which run without Ray.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from ray.train.torch import TorchTrainer
from torch import nn

from cromss_ray.config import ConfigError, FinetuneConfig, build_config
from cromss_ray.data.device import to_device
from cromss_ray.data.pipeline import DownstreamDatasets, downstream_datasets
from cromss_ray.data.schema import ShardMetadata
from cromss_ray.data.storage import TileSet
from cromss_ray.method import (
    ConfusionMatrix,
    encoder_state_dict,
    load_encoder_state,
    load_reference_checkpoint,
    segmentation_loss,
)
from cromss_ray.models.scoring import SUMMARY_SCORES, score_tiles
from cromss_ray.models.segmenter import output_stride, pad_to_multiple
from cromss_ray.models.stored import transfer_network, transfer_segmenter
from cromss_ray.tracking.finetuned import TransferSource, default_registry_name, log_finetuned_model, run_tags
from cromss_ray.tracking.model_uris import MODEL_URI_SCHEMES
from cromss_ray.tracking.registry import load_pretrained
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.train.checkpoints import TrainingState, finite_metrics, prepare_training, restore_model
from cromss_ray.train.cluster import TRAIN, VAL
from cromss_ray.train.collectives import all_reduce_sums, all_reduce_tensor, unwrap
from cromss_ray.train.loop import GuardedSteps, RunLinks, WorkerInput, check_checkpoint, received_input
from cromss_ray.train.loop import check_no_credentials, run_worker, torch_trainer, worker_input
from cromss_ray.train.optim import Precision

logger = logging.getLogger(__name__)

TEST = "test"


@dataclass(frozen=True)
class FinetuneResult:
    """What a transfer run leaves: Ray's result, the MLflow run, the registered model, final scores.

    ``metrics`` are the last epoch's training and validation metrics, ``test_metrics``
    the test split's; ``version`` is None when ``tracking.log_model`` is off.
    """

    result: ray.train.Result
    run_id: str
    registry_name: str
    version: int | None
    metrics: dict[str, float]
    test_metrics: dict[str, float]
    start_epoch: int
    source: TransferSource


@dataclass(frozen=True)
class Initialisation:
    """The resolved ``model.init``: where the encoder comes from and its weights (None for 'random')."""

    source: TransferSource
    encoder_state: dict[str, torch.Tensor] | None


def resolve_init(config: FinetuneConfig) -> Initialisation:
    """Pull the configured branch's encoder from the registry or a paper checkpoint (spec 11-12).

    Raises ``ModelNotFoundError`` for a missing registry entry and ConfigError for a
    path that is no file or a checkpoint without ``model.init_fusion``.
    """
    model = config.model
    if model.init == "random":
        return Initialisation(TransferSource(model.init, "random", model.encoder), None)
    if model.init.startswith(MODEL_URI_SCHEMES):
        try:
            pretrained = load_pretrained(model.init, tracking_uri=config.tracking.resolved_uri())
        except ValueError as exc:
            raise ConfigError(f"model.init: {exc}") from None
        source = TransferSource(
            init=model.init,
            kind="registry",
            encoder=pretrained.config.model.encoder,
            s2_bands=pretrained.config.data.s2_bands,
            fusion=pretrained.config.model.fusion,
            name=pretrained.name,
            version=pretrained.version,
            run_id=pretrained.run_id,
        )
        if model.branch not in pretrained.model.modalities:
            raise ConfigError(
                f"model.branch: '{model.branch}', but {model.init} is the single-modality "
                f"{pretrained.config.model.modality.upper()} baseline: it has no {model.branch.upper()} encoder"
            )
        return Initialisation(source, encoder_state_dict(pretrained.model, model.branch))
    path = Path(model.init).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.init: '{model.init}' is neither 'random', a models:/ or runs:/ URI, nor a checkpoint file"
        )
    if model.init_fusion is None:
        raise ConfigError(f"model.init_fusion: the checkpoint {path} needs its fusion ('mid' or 'late')")
    network = load_reference_checkpoint(path, model.init_fusion, encoder=model.encoder)
    source = TransferSource(
        init=str(path.resolve()),
        kind="checkpoint",
        encoder=model.encoder,
        s2_bands=network.s2_bands,
        fusion=model.init_fusion,
    )
    return Initialisation(source, encoder_state_dict(network, model.branch))


def effective_config(config: FinetuneConfig, source: TransferSource) -> FinetuneConfig:
    """``config`` with the source's encoder and, for the S2 branch, its band subset (spec 11).

    A value set explicitly in the config that contradicts the source is a ConfigError.
    """
    model, data = config.model, config.data
    if source.kind == "random":
        return config
    if "encoder" in model.model_fields_set and model.encoder != source.encoder:
        raise ConfigError(
            f"model.encoder: '{model.encoder}' is set, but {source.label} has a '{source.encoder}' encoder; "
            "leave model.encoder out or set it to the source's"
        )
    tree = config.model_dump(mode="json")
    tree["model"]["encoder"] = source.encoder
    if model.branch == "s2" and source.s2_bands is not None:
        if "s2_bands" in data.model_fields_set and data.s2_bands != source.s2_bands:
            raise ConfigError(
                f"data.s2_bands: {data.s2_bands} is set, but {source.label} was pretrained on "
                f"{source.s2_bands} S2 bands; leave data.s2_bands out or set it to {source.s2_bands}"
            )
        tree["data"]["s2_bands"] = source.s2_bands
    return build_config(FinetuneConfig, tree)


def check_finetune_config(config: FinetuneConfig) -> None:
    """Cross-field rules the sections cannot check alone; a ConfigError names the key."""
    model, epochs = config.model, config.optim.epochs
    if model.unfreeze_epoch is not None:
        if model.encoder_mode == "frozen":
            raise ConfigError(
                "model.unfreeze_epoch: a frozen warm-up needs model.encoder_mode 'finetune' (the mode after it)"
            )
        if model.unfreeze_epoch >= epochs:
            raise ConfigError(f"model.unfreeze_epoch: {model.unfreeze_epoch} is not below optim.epochs ({epochs})")
    if config.run.checkpoint_frequency > epochs:
        raise ConfigError(
            f"run.checkpoint_frequency: {config.run.checkpoint_frequency} exceeds optim.epochs ({epochs}); "
            "the final epoch is always checkpointed, so use at most the epoch count"
        )


def check_against_data(config: FinetuneConfig, datasets: DownstreamDatasets) -> None:
    """The shards must give every worker training tiles and something to evaluate."""
    workers, batch_size = config.scaling.num_workers, config.optim.batch_size
    if datasets.num_train < workers * batch_size:
        raise ConfigError(
            f"optim.batch_size: {datasets.num_train} training tiles in {config.data.uri} give {workers} worker(s) "
            f"fewer than one full batch of {batch_size} each (scaling.num_workers {workers})"
        )
    if datasets.val is None and config.optim.scheduler == "plateau":
        raise ConfigError(
            "optim.scheduler: 'plateau' follows the validation loss, but data.val_fraction is 0; "
            "hold out validation tiles or choose another schedule"
        )
    if datasets.val is None and datasets.test is None:
        raise ConfigError("data: neither validation tiles (data.val_fraction) nor a test split (data.test_uri)")


def check_network(config: FinetuneConfig, encoder_state: Mapping[str, torch.Tensor] | None) -> int:
    """Build the network once on the driver and return its output stride: an unknown decoder or
    encoder, or an encoder state that does not fit, fails here with the config key rather than on
    every worker. (The head is built for two classes; neither check depends on the class count.)"""
    try:
        network = transfer_network(config, classes=2)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"model.decoder / model.encoder: cannot build the network: {exc}") from None
    if encoder_state is not None:
        try:
            load_encoder_state(network, encoder_state)
        except ValueError as exc:
            raise ConfigError(f"model.init: the {config.model.branch} encoder of {config.model.init}: {exc}") from None
    return output_stride(network)


REFERENCE_TILE_SIDE = 510
"""The smallest SSL4EO-S12@DW / @OSM tile side, which the reference's training crops fit (spec 10-11)."""
DILATED_CROP_MULTIPLE = 16
"""The multiple the reference's crops take for decoders of output stride below 32 (DeepLabV3+, PSPNet)."""


def default_crop(stride: int) -> int:
    """The reference's training crop for a network of output ``stride`` (spec 11).

    The largest multiple of ``max(stride, 16)`` within a 510 px tile: 480 for stride 32
    (U-Net, FPN, ...), 496 for DeepLabV3+ (16) and PSPNet (8). Smaller tiles (DFC2020's
    256 px) are taken whole.
    """
    multiple = max(stride, DILATED_CROP_MULTIPLE)
    return REFERENCE_TILE_SIDE // multiple * multiple


def with_training_crop(config: FinetuneConfig, stride: int) -> FinetuneConfig:
    """``config`` with ``data.crop`` set: the given crop when the network's ``stride`` divides it, else a
    ConfigError naming the key; without one, :func:`default_crop`."""
    crop = config.data.crop
    if crop is None:
        tree = config.model_dump(mode="json")
        tree["data"]["crop"] = default_crop(stride)
        return build_config(FinetuneConfig, tree)
    if crop % stride:
        nearest = " or ".join(str(size) for size in (crop // stride * stride, (crop // stride + 1) * stride) if size)
        raise ConfigError(
            f"data.crop: {crop} is not a multiple of {stride}, the output stride of {config.model.decoder} with "
            f"{config.model.encoder}; use {nearest}, or leave data.crop out ({default_crop(stride)} from the decoder)"
        )
    return config


def training_config(config: FinetuneConfig, initialisation: Initialisation) -> FinetuneConfig:
    """``config`` as the run trains it, and as its checkpoints store it: the source's encoder and bands
    (:func:`effective_config`) and the training crop the decoder takes (:func:`with_training_crop`), the
    network built once to check both."""
    config = effective_config(config, initialisation.source)
    return with_training_crop(config, check_network(config, initialisation.encoder_state))


@dataclass(frozen=True)
class TransferInput:
    """What only a transfer run's workers need: the source encoder's weights (in the object store; None
    for 'random'), whether there is a validation split, and the test split's tiles."""

    encoder_state: ray.ObjectRef | None
    validates: bool
    test_tiles: TileSet


@dataclass(frozen=True)
class PreparedRun:
    """A transfer run ready to fit: its trainer, the effective config, the source and the registry name."""

    trainer: TorchTrainer
    config: FinetuneConfig
    source: TransferSource
    registry_name: str


def build_trainer(
    config: FinetuneConfig, links: RunLinks = RunLinks(), initialisation: Initialisation | None = None
) -> PreparedRun:
    """The TorchTrainer of one transfer run and what it was built from (driver side; Ray must be initialised).

    The effective config is :func:`training_config`'s. ``initialisation`` is
    ``resolve_init(config)`` when the caller resolved it already.
    """
    check_no_credentials(config)
    check_finetune_config(config)
    initialisation = initialisation or resolve_init(config)
    config = training_config(config, initialisation)
    check_checkpoint(config)
    datasets = downstream_datasets(config.data, seed=config.run.seed)
    check_against_data(config, datasets)
    meta = datasets.meta
    registry_name = default_registry_name(config, meta)
    state = initialisation.encoder_state
    inputs = worker_input(
        config,
        datasets,
        links,
        tags=run_tags(config, meta, initialisation.source),
        checkpoint_extra={"registry_name": registry_name, "source": asdict(initialisation.source)},
        task=TransferInput(
            encoder_state=ray.put(state) if state is not None else None,
            validates=datasets.val is not None,
            test_tiles=datasets.test_tiles,
        ),
    )
    splits = {TRAIN: datasets.train, **({VAL: datasets.val} if datasets.val is not None else {})}
    trainer = torch_trainer(finetune_loop, config, inputs, splits, links)
    return PreparedRun(trainer, config, initialisation.source, registry_name)


def run_finetune(
    config: FinetuneConfig, links: RunLinks = RunLinks(), initialisation: Initialisation | None = None
) -> FinetuneResult:
    """Train (or resume) one transfer run to ``optim.epochs`` epochs, test it and register its model.

    Raises ConfigError for a config the source, the data or an existing checkpoint
    contradicts, ``ModelNotFoundError`` for a missing source model and
    ``ray.train.TrainingFailedError`` when the workers fail more than ``run.max_failures`` times.
    ``initialisation`` is ``resolve_init(config)`` when the caller resolved it already.
    """
    prepared = build_trainer(config, links, initialisation)
    result = prepared.trainer.fit()
    summary = result.return_value
    return FinetuneResult(
        result=result,
        run_id=summary["mlflow_run_id"],
        registry_name=prepared.registry_name,
        version=summary["model_version"],
        metrics=summary["metrics"],
        test_metrics=summary["test_metrics"],
        start_epoch=summary["start_epoch"],
        source=prepared.source,
    )


def encoder_frozen(config: FinetuneConfig, epoch: int) -> bool:
    """Whether the encoder is frozen in zero-based ``epoch`` (spec 11; warm-up until ``unfreeze_epoch``)."""
    model = config.model
    if model.encoder_mode == "frozen":
        return True
    return model.unfreeze_epoch is not None and epoch < model.unfreeze_epoch


def freeze_encoder(network: nn.Module, batch_norm: str) -> None:
    """No encoder parameter trains; the encoder's batch norm follows ``batch_norm`` (spec 11).

    'adapt' (the reference) only stops the gradients: ``network.train()`` still puts the
    encoder's batch norm in training mode, so its running statistics follow the downstream
    data. 'fixed' keeps the whole encoder in eval mode (smp's ``freeze_encoder`` keeps
    ``network.train()`` away from it from then on), so its statistics do not move.
    """
    if batch_norm == "adapt":
        network.encoder.requires_grad_(False)
        return
    network.freeze_encoder()
    network.encoder.eval()


def is_frozen(network: nn.Module) -> bool:
    """Whether no encoder parameter of ``network`` trains."""
    return not any(parameter.requires_grad for parameter in network.encoder.parameters())


def metric_slug(name: str) -> str:
    """A class name as a metric-key part: lower case, runs of other characters as one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class WorkerContext:
    """What the loop's steps share on one worker."""

    config: FinetuneConfig
    meta: ShardMetadata
    device: torch.device
    precision: Precision

    @property
    def branch(self) -> str:
        return self.config.model.branch

    def batches(self, shard: ray.data.DataIterator, *, training: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The shard's ``(image of the branch, label)`` batches on the device, scaled (spec 9).

        Training drops a last, smaller batch: decoders with batch norm after global pooling
        (DeepLabV3+, PSPNet) cannot train on a single sample.
        """
        for batch in shard.iter_torch_batches(
            batch_size=self.config.optim.batch_size,
            prefetch_batches=self.config.data.prefetch_batches,
            drop_last=training,
        ):
            inputs = to_device(batch, self.meta, self.device, prior="none")
            yield (inputs.x1 if self.branch == "s1" else inputs.x2), inputs.y


def unfreeze_if_due(context: WorkerContext, state: TrainingState, epoch: int) -> bool:
    """After the frozen warm-up, make the encoder trainable and wrap the network anew.

    DDP fixes the parameters it synchronises when it wraps a module, so the network is
    re-wrapped; the optimiser already holds the encoder's parameters (they had no
    gradient until now). Returns whether the encoder was unfrozen.
    """
    network = unwrap(state.model)
    if encoder_frozen(context.config, epoch) or not is_frozen(network):
        return False
    network.unfreeze_encoder()
    state.model = network  # drops the old DDP wrapper, and its gradient hooks, before wrapping anew
    state.model = ray.train.torch.prepare_model(network)
    return True


def train_epoch(
    context: WorkerContext, state: TrainingState, shard: ray.data.DataIterator, epoch: int
) -> dict[str, float]:
    """One pass over the worker's training share with ``optim.loss`` (spec 11).

    ``train/loss`` is the batches' losses weighted by their labelled pixels, over every rank
    (for 'ce' the cross-entropy over all labelled pixels).

    A step with a non-finite loss or gradients is skipped and counted
    (:class:`~cromss_ray.train.loop.GuardedSteps`, ``train/nonfinite_steps``).
    """
    state.model.train()
    nodata, kind = context.meta.nodata, context.config.optim.loss
    loss_sum = torch.zeros((), dtype=torch.float64, device=context.device)
    pixels = torch.zeros((), dtype=torch.int64, device=context.device)
    guard = GuardedSteps.of(context.config, state, epoch)
    for image, label in guard.batches(context.batches(shard, training=True)):
        with context.precision.autocast():
            logits = state.model(image)
        loss = segmentation_loss(logits.float(), label, kind, ignore_index=nodata)
        labelled = (label != nodata).sum()
        if not guard.optimise(loss):
            continue
        loss_sum += loss.detach().double() * labelled
        pixels += labelled
    skipped = guard.metrics()
    totals = all_reduce_sums({"loss": float(loss_sum), "pixels": int(pixels)}, context.device)
    if totals["pixels"] == 0:
        raise RuntimeError(f"no labelled training pixel on any worker in epoch {epoch + 1}")
    return {f"{TRAIN}/loss": totals["loss"] / totals["pixels"], **skipped}


@dataclass
class Evaluation:
    """One scored split: flat metrics and the confusion-matrix result (spec 11)."""

    metrics: dict[str, float]
    confusion: dict[str, Any]
    example: torch.Tensor | None


@torch.no_grad()
def evaluate_split(context: WorkerContext, network: nn.Module, shard: ray.data.DataIterator, split: str) -> Evaluation:
    """Score the worker's share of ``split``; loss and confusion matrix are summed over every rank.

    ``<split>/loss`` is the unweighted cross-entropy over labelled pixels; the scores
    come from one confusion matrix (spec 11). The unwrapped network is used, so no DDP
    collective runs while ranks hold different numbers of batches. Tiles are padded to
    the network's stride and the logits cropped back.
    """
    network.eval()
    nodata = context.meta.nodata
    matrix = ConfusionMatrix(context.meta.num_classes, nodata, context.device)
    stride = output_stride(network)
    loss_sum = torch.zeros((), dtype=torch.float64, device=context.device)
    pixels = torch.zeros((), dtype=torch.int64, device=context.device)
    example = None
    for image, label in context.batches(shard, training=False):
        with context.precision.autocast():
            logits = network(pad_to_multiple(image, stride))
        logits = logits[..., : image.shape[-2], : image.shape[-1]].float()
        loss_sum += F.cross_entropy(logits, label, ignore_index=nodata, reduction="sum").double()
        pixels += (label != nodata).sum()
        matrix.update(logits.argmax(dim=1), label)
        if example is None:
            example = image[:1].cpu()
    return _summed_evaluation(context, split, matrix, float(loss_sum), int(pixels), example)


@torch.no_grad()
def evaluate_tiles(context: WorkerContext, network: nn.Module, tiles: TileSet, split: str) -> Evaluation:
    """Score whole tiles as ``cromss evaluate`` does (:func:`~cromss_ray.models.scoring.score_tiles`).

    Each rank predicts its share of the shard files with the unwrapped network, in fp32
    and tiled above 512 px like the registered model; loss and confusion matrix are
    summed over every rank. ``<split>/loss`` is the cross-entropy of the predicted
    probabilities over labelled pixels.
    """
    train_context = ray.train.get_context()
    segmenter = transfer_segmenter(network, context.config, context.meta)
    rows = tiles.rows(train_context.get_world_rank(), train_context.get_world_size())
    scores = score_tiles(segmenter, rows, context.meta)
    example = torch.from_numpy(scores.example) if scores.example is not None else None
    return _summed_evaluation(context, split, scores.matrix, scores.loss_sum, scores.pixels, example)


def _summed_evaluation(
    context: WorkerContext,
    split: str,
    matrix: ConfusionMatrix,
    loss_sum: float,
    pixels: int,
    example: torch.Tensor | None,
) -> Evaluation:
    """Sum one rank's loss and confusion matrix over every rank; the split's flat metrics (spec 11)."""
    branch = context.branch
    totals = all_reduce_sums({"loss": loss_sum, "pixels": pixels}, context.device)
    matrix.all_reduce(all_reduce_tensor)
    result = matrix.compute()
    metrics = {
        f"{split}/loss": totals["loss"] / totals["pixels"] if totals["pixels"] else math.nan,
        **{f"{split}/{branch}/{name}": result[name] for name in SUMMARY_SCORES},
    }
    for score in ("iou", "f1"):
        for class_name, value in zip(context.meta.classes, result[score], strict=True):
            if math.isfinite(value):
                metrics[f"{split}/{branch}/{score}/{metric_slug(class_name)}"] = value
    return Evaluation(metrics, result, example)


@dataclass
class FinetuneTask:
    """Fine-tuning as a :class:`~cromss_ray.train.loop.Task`: the single-modality network from the source
    encoder (frozen while the config says so), ``optim.loss``, validation of its branch when there is a
    validation split, and at the end the test split scored on whole tiles and the last epoch's model
    registered."""

    context: WorkerContext
    inputs: WorkerInput
    name: str = "finetune"
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    shards: dict[str, ray.data.DataIterator] = field(default_factory=dict)

    @property
    def progress_keys(self) -> tuple[str, ...]:
        branch = self.context.branch
        return ("train/loss", "val/loss", f"val/{branch}/oa", f"val/{branch}/miou", "train/lr")

    def describe(self) -> str:
        return f"{self.context.config.model.decoder} on {self.context.branch.upper()}, "

    def restore(self, checkpoint: Path | None) -> tuple[TrainingState, dict[str, Any] | None]:
        """From the checkpoint when there is one, else with the source encoder loaded; frozen when the
        starting epoch says so."""
        transfer: TransferInput = self.inputs.task
        self.shards = {TRAIN: ray.train.get_dataset_shard(TRAIN)}
        if transfer.validates:
            self.shards[VAL] = ray.train.get_dataset_shard(VAL)
        config = self.context.config
        torch.manual_seed(config.run.seed)
        network = transfer_network(config, self.context.meta.num_classes)
        saved = restore_model(network, checkpoint)
        if saved is None and transfer.encoder_state is not None:
            load_encoder_state(network, ray.get(transfer.encoder_state))
        if encoder_frozen(config, int(saved["epoch"]) if saved else 0):
            freeze_encoder(network, config.model.frozen_batch_norm)
        return prepare_training(network, config.optim, self.context.precision, checkpoint), saved

    def before_epoch(self, state: TrainingState, epoch: int, tracker: RunTracker | None) -> None:
        if unfreeze_if_due(self.context, state, epoch) and tracker is not None:
            logger.info("[cromss finetune] epoch %d: encoder unfrozen", epoch + 1)

    def train_epoch(self, state: TrainingState, epoch: int) -> dict[str, float]:
        return train_epoch(self.context, state, self.shards[TRAIN], epoch)

    def validate_epoch(self, state: TrainingState, epoch: int) -> dict[str, float]:
        if VAL not in self.shards:
            return {}
        self.evaluations[VAL] = evaluate_split(self.context, unwrap(state.model), self.shards[VAL], VAL)
        return self.evaluations[VAL].metrics

    def finish(
        self, state: TrainingState, tracker: RunTracker | None, metrics: Mapping[str, float]
    ) -> dict[str, Any] | None:
        """The test split scored on every rank; rank 0 logs it, the confusion matrices and the model."""
        network = unwrap(state.model)
        test = self.evaluations[TEST] = evaluate_tiles(self.context, network, self.inputs.task.test_tiles, TEST)
        if tracker is None:
            return None
        config, branch, epochs = self.context.config, self.context.branch, self.context.config.optim.epochs
        summary: dict[str, Any] = {"test_metrics": finite_metrics(test.metrics), "model_version": None}
        example = test.example if test.example is not None else getattr(self.evaluations.get(VAL), "example", None)
        tracker.log_metrics(test.metrics, epochs)
        for split, evaluation in self.evaluations.items():
            tracker.log_confusion_matrix(f"{split}/{branch}", evaluation.confusion, list(self.context.meta.classes))
        if not config.tracking.log_model:
            return summary
        summary["model_version"] = log_finetuned_model(
            network,
            config,
            self.context.meta,
            TransferSource(**self.inputs.checkpoint_extra["source"]),
            tracker=tracker,
            registry_name=self.inputs.checkpoint_extra["registry_name"],
            aliases=config.tracking.aliases,
            input_example=example,
            epoch=epochs,
            version_tags={key: f"{value:.6g}" for key, value in finite_metrics(test.metrics).items()},
        )
        return summary


def finetune_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The per-worker transfer loop (Ray Train ``train_loop_per_worker``); rank 0 returns the run summary."""
    inputs = received_input(loop_config)
    config = FinetuneConfig.model_validate(inputs.config)
    meta = ShardMetadata.model_validate(inputs.meta)
    device = ray.train.torch.get_device()
    context = WorkerContext(config, meta, device, Precision.on(device, config.scaling.precision))
    return run_worker(FinetuneTask(context, inputs), inputs)
