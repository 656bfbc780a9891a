"""The Ray Data pipeline that feeds the trainers (spec 2, 9; architecture: data flow of a step).

::

    shards (dir / s3://)  --footers checked first-->
      training: the epoch's permutation of all rows, read chunk by chunk (EpochRows)-->  rows
      validation, test: read_parquet (streaming, file order)-->  rows
      --map_batches(CutSamples): season, band subset, crop / flip / rotation-->  uint8 samples
      --streaming_split / iter_torch_batches-->  to_device: network input, prior on the device

:func:`pretrain_datasets` and :func:`downstream_datasets` build the training, validation
(and test) datasets from a config; :func:`~cromss_ray.data.device.to_device` turns a batch
of tensors into the model's inputs and targets. Batches stay in the stored dtype (uint8
for the released data) until it makes them network inputs on the device (spec 9). This
module imports no torch: its classes travel inside the datasets to Ray processes (the
pipeline's tasks and actors, the Train controller) that cut samples but never train.

Determinism. A training sample's augmentation (season, crop corner, flips, rotation) is a
pure function of ``(seed, location id, epoch)``, and the training order is a pure
function of ``(seed, epoch)`` (a fresh uniformly random permutation of all rows every
epoch, spec 9, delivered in exactly that order); the validation split and the
validation season depend on the id alone, and validation is not shuffled (its row
order follows the parallel reads). A Ray Data UDF cannot know the epoch, so every dataset
family carries an :class:`EpochClock`: a tiny Ray actor that the UDF reads once per
batch (it starts at 0). The training loop announces each epoch before iterating::

    datasets = pretrain_datasets(cfg.data, seed=cfg.run.seed)  # on the driver
    ...                                                        # in the train loop:
    for epoch in range(start_epoch, epochs):
        set_epoch(clock, epoch)      # clock: datasets.clock, or its name (a str)
        for batch in shard.iter_torch_batches(batch_size=...):
            ...
        # the epoch ends with a collective (metric all-reduce / ray.train.report)

Calling it on rank 0 suffices: Ray Data's ``streaming_split`` starts an epoch only when
every worker has asked for it, so rank 0's call precedes any read of that epoch. The
epoch must change only after all workers finished the previous epoch, which the
end-of-epoch collective guarantees; calling it on every rank is harmless (same value).

Checks. Every row read is checked (page checksums, labels in the class set or no-data,
finite imagery; ``docs/reliability.md``). With ``data.on_bad_row=skip`` a bad row is left
out and counted in the family's :class:`SkippedRows` (``datasets.skipped``, or
``SkippedRows.named(datasets.skipped.name)`` in a worker); ``skipped.count()`` is the
number of row reads skipped so far, over all epochs and splits, for logging as a metric.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import ray
import ray.data
import ray.experimental.internal_kv as internal_kv
from ray.data.expressions import col

from cromss_ray.config import ConfigError, DataConfig, DownstreamDataConfig
from cromss_ray.data.schema import ShardMetadata
from cromss_ray.data.storage import (
    ShardSet,
    TileSet,
    open_shards,
    read_epoch_order,
    read_shard_set,
    resolve_filesystem,
    scan_shards,
)
from cromss_ray.data.transforms import CutSamples, HashSplit, SampleDraw, TrainingSubset

__all__ = [
    "DownstreamDatasets",
    "EpochClock",
    "SkippedRows",
    "PretrainDatasets",
    "downstream_datasets",
    "open_shards",
    "pretrain_datasets",
    "resolve_filesystem",
    "set_epoch",
]

ROWS_PER_CALL = 8
"""Shard rows per UDF call (8 pretraining locations of 264 px are ~36 MB of uint8 rows)."""
CLOCK_NAMESPACE = "cromss"
SKIPPED_LISTED = 100
"""How many skip messages a :class:`SkippedRows` keeps (all are counted)."""
DOWNSTREAM_ROTATION_PROBABILITY = 0.2


CLOCK_RESTARTS = 5
"""How often Ray restarts a lost epoch clock (its node died, it was killed); calls to it are retried as often."""


@ray.remote(num_cpus=0)
class _EpochCounter:
    """The actor behind :class:`EpochClock`. The epoch is also kept in the cluster's key-value store
    under ``key``, so that a restarted clock goes on with the epoch it had."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()
        stored = internal_kv._internal_kv_get(self._key, namespace=CLOCK_NAMESPACE)
        self._epoch = int(stored) if stored is not None else 0

    def set(self, epoch: int) -> None:
        internal_kv._internal_kv_put(self._key, str(epoch).encode(), overwrite=True, namespace=CLOCK_NAMESPACE)
        self._epoch = epoch

    def get(self) -> int:
        return self._epoch


@dataclass(frozen=True)
class _NamedActor:
    """A handle on a named Ray actor of a pipeline: picklable (it travels inside the UDF and
    through ``train_loop_config``); ``name`` finds it again from any process (:meth:`named`)."""

    name: str
    actor: ray.actor.ActorHandle
    actor_class: ClassVar[Any]
    prefix: ClassVar[str]
    described_as: ClassVar[str]
    restarts: ClassVar[int] = 0
    """How often Ray restarts the actor when it is lost (its calls retried as often); its
    constructor then gets the actor's name, to find its state again."""

    @classmethod
    def create(cls: type[ActorT]) -> ActorT:
        name = f"cromss-{cls.prefix}-{uuid.uuid4().hex[:12]}"
        if not cls.restarts:
            return cls(name, cls.actor_class.options(name=name, namespace=CLOCK_NAMESPACE).remote())
        restarting = {"max_restarts": cls.restarts, "max_task_retries": cls.restarts}
        return cls(name, cls.actor_class.options(name=name, namespace=CLOCK_NAMESPACE, **restarting).remote(name))

    @classmethod
    def named(cls: type[ActorT], name: str) -> ActorT:
        try:
            return cls(name, ray.get_actor(name, namespace=CLOCK_NAMESPACE))
        except ValueError:
            raise ValueError(f"no {cls.described_as} named {name!r} in this Ray cluster") from None


ActorT = TypeVar("ActorT", bound=_NamedActor)


@dataclass(frozen=True)
class EpochClock(_NamedActor):
    """The epoch a pipeline's augmentation uses: a named Ray actor, read once per batch, restarted
    with its epoch when it is lost."""

    actor_class = _EpochCounter
    prefix = "epoch"
    described_as = "epoch clock"
    restarts = CLOCK_RESTARTS

    def set(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        ray.get(self.actor.set.remote(int(epoch)))

    def read(self) -> int:
        return ray.get(self.actor.get.remote())


@ray.remote(num_cpus=0)
class _SkipCounter:
    """The actor behind :class:`SkippedRows`."""

    def __init__(self) -> None:
        self._count = 0
        self._messages: list[str] = []

    def add(self, messages: list[str]) -> None:
        self._count += len(messages)
        self._messages.extend(messages[: SKIPPED_LISTED - len(self._messages)])

    def count(self) -> int:
        return self._count

    def messages(self) -> list[str]:
        return list(self._messages)


@dataclass(frozen=True)
class SkippedRows(_NamedActor):
    """The bad rows a pipeline left out (``data.on_bad_row=skip``): a named Ray actor.

    Callable with a list of messages (one per skipped row read, naming file and location
    id), which the readers do.
    """

    actor_class = _SkipCounter
    prefix = "skipped"
    described_as = "skipped-row counter"

    def __call__(self, messages: list[str]) -> None:
        ray.get(self.actor.add.remote(messages))

    def count(self) -> int:
        """Row reads skipped so far (a row skipped in two epochs counts twice)."""
        return ray.get(self.actor.count.remote())

    def messages(self) -> list[str]:
        """The first :data:`SKIPPED_LISTED` skip messages."""
        return ray.get(self.actor.messages.remote())


def set_epoch(clock: EpochClock | str, epoch: int) -> None:
    """Announce ``epoch`` to a pipeline's augmentation before iterating it (module docstring)."""
    (EpochClock.named(clock) if isinstance(clock, str) else clock).set(epoch)


@dataclass(frozen=True)
class PretrainDatasets:
    """Pretraining datasets (spec 9): ``val`` is None when nothing is held out."""

    train: ray.data.Dataset
    val: ray.data.Dataset | None
    meta: ShardMetadata
    num_train: int
    num_val: int
    clock: EpochClock
    skipped: SkippedRows


@dataclass(frozen=True)
class DownstreamDatasets:
    """Downstream datasets (spec 10, 11): ``test`` is None without ``test_uri``.

    ``test_tiles`` are the whole tiles a transfer run's test split scores (as ``cromss
    evaluate`` does): the test shards, else the held-out validation rows of the training
    shards, else None.
    """

    train: ray.data.Dataset
    val: ray.data.Dataset | None
    test: ray.data.Dataset | None
    meta: ShardMetadata
    num_train: int
    num_val: int
    num_test: int
    clock: EpochClock
    skipped: SkippedRows
    test_tiles: TileSet | None = None


@dataclass(frozen=True)
class _Split:
    """Validation rows (their shards, or the ids held out of the training shards) and counts."""

    val: ShardSet | None
    train_keep: Callable[[str], bool] | None
    val_ids: list[str] | None
    num_train: int
    num_val: int


def _split(shards: ShardSet, val_uri: str | None, cfg: DataConfig | DownstreamDataConfig) -> _Split:
    """Held-out validation rows: a separate location, or ids whose stable hash is small."""
    if val_uri is not None:
        val = scan_shards(val_uri, cfg.s3_endpoint, allow_incomplete=cfg.allow_incomplete)
        _check_compatible(shards, val)
        return _Split(val, None, None, shards.num_rows, val.num_rows)
    ids = shards.read_ids() if cfg.val_fraction > 0 else []
    split = HashSplit.for_ids(ids, cfg.val_fraction)
    num_val = sum(1 for row_id in ids if split.is_val(row_id))
    if num_val == 0:
        return _Split(None, None, None, shards.num_rows, 0)
    val_ids = sorted({row_id for row_id in ids if split.is_val(row_id)})
    return _Split(shards, split.is_train, val_ids, len(ids) - num_val, num_val)


def _check_compatible(train: ShardSet, other: ShardSet) -> None:
    """Validation / test shards must describe the same data as the training shards."""
    ignored = {"has_clean_label"}
    theirs, ours = other.meta.model_dump(exclude=ignored), train.meta.model_dump(exclude=ignored)
    differing = sorted(key for key in ours if ours[key] != theirs[key])
    if differing:
        raise ValueError(f"{other.uri}: shard metadata differs from {train.uri} in {', '.join(differing)}")


def _read(
    shards: ShardSet,
    udf: CutSamples,
    *,
    ids: list[str] | None = None,
    order: tuple[int, Callable[[], int]] | None = None,
) -> ray.data.Dataset:
    """Stream ``shards`` through ``udf``; ``ids`` restricts the read to those rows (pushed down to the scan).

    With ``order`` (training: the seed and the epoch's source) the rows come in each epoch's
    permutation of all rows of all files (spec 9), read :data:`ROWS_PER_CALL` at a time
    straight from their row groups (docs/data.md, "Order").
    """
    if order is not None:
        dataset = read_epoch_order(shards, *order, chunk_rows=ROWS_PER_CALL)
    else:
        dataset = read_shard_set(shards)
    if ids is not None:
        dataset = dataset.filter(expr=col("id").is_in(ids))
    return dataset.map_batches(udf, batch_format="pyarrow", batch_size=ROWS_PER_CALL, zero_copy_batch=True)


def pretrain_datasets(
    cfg: DataConfig, *, seed: int, prior: str = "ts", sigma: float = 3.0
) -> PretrainDatasets:
    """Training and validation datasets for CromSS pretraining (spec 2, 9).

    Training batches: a uniformly drawn season per visit, the S2 band subset, random crop,
    flips and (with ``cfg.rotation_probability``) a rotation, one geometry for images,
    label, all-season labels (``labels_all``, when the prior is computed on the device) or
    the CPU prior (``prior``, computed on the full tile, then cropped). Validation
    batches: a season fixed by the id, centre crop, no flips, no prior.
    """
    from cromss_ray.method.smoothing import PRIOR_KINDS  # imports torch: on the driver only (module docstring)

    choices = (*PRIOR_KINDS, "none")
    if prior not in choices:
        raise ValueError(f"prior must be one of {choices}, got {prior!r}")
    shards = scan_shards(cfg.uri, cfg.s3_endpoint, allow_incomplete=cfg.allow_incomplete)
    meta = shards.meta
    split = _split(shards, cfg.val_uri, cfg)
    clock, skipped = EpochClock.create(), SkippedRows.create()
    checks = {"on_bad_row": cfg.on_bad_row, "skipped": skipped}
    with_prior = prior != "none"
    train_udf = CutSamples(
        meta,
        cfg.s2_bands,
        cfg.crop,
        SampleDraw(True, seed, cfg.rotation_probability, clock.read),
        keep=split.train_keep,
        labels_all=with_prior and cfg.prior_on_device,
        cpu_prior=prior if with_prior and not cfg.prior_on_device else None,
        sigma=sigma,
        **checks,
    )
    train = _read(shards, train_udf, order=(seed, clock.read))
    val = None
    if split.val is not None:
        val_udf = CutSamples(split.val.meta, cfg.s2_bands, cfg.crop, SampleDraw(False), **checks)
        val = _read(split.val, val_udf, ids=split.val_ids)
    return PretrainDatasets(train, val, meta, split.num_train, split.num_val, clock, skipped)


def downstream_datasets(
    cfg: DownstreamDataConfig, *, seed: int, rotation_probability: float = DOWNSTREAM_ROTATION_PROBABILITY
) -> DownstreamDatasets:
    """Training, validation and test datasets of a downstream task (spec 10, 11).

    Training: random crop, flips and rotation per sample; validation / test: centre crop
    (the whole tile when it is smaller). Labels keep the ignore value ``meta.nodata``.
    With ``cfg.train_fraction`` or ``cfg.train_count`` only a :class:`TrainingSubset` of the
    training rows (those not held out), drawn by ``seed``, trains. ``test_tiles`` reads the
    test (else validation) rows whole, outside Ray Data. ``cfg.crop`` must be set (a transfer
    run derives it from the decoder).
    """
    if cfg.crop is None:
        raise ConfigError("data.crop: no training crop is set (a transfer run derives it from the decoder)")
    shards = scan_shards(cfg.uri, cfg.s3_endpoint, allow_incomplete=cfg.allow_incomplete)
    meta = shards.meta
    split = _split(shards, None, cfg)
    keep, num_train = split.train_keep, split.num_train
    if cfg.train_fraction is not None or cfg.train_count is not None:
        keep, num_train = _training_subset(shards, split, cfg, seed)
    clock, skipped = EpochClock.create(), SkippedRows.create()
    checks = {"on_bad_row": cfg.on_bad_row, "skipped": skipped}
    train_udf = CutSamples(
        meta,
        cfg.s2_bands,
        cfg.crop,
        SampleDraw(True, seed, rotation_probability, clock.read),
        keep=keep,
        seasons_out=False,
        **checks,
    )
    train = _read(shards, train_udf, order=(seed, clock.read))
    val, tiles = None, None
    if split.val is not None:
        val_udf = CutSamples(meta, cfg.s2_bands, cfg.crop, SampleDraw(False), seasons_out=False, **checks)
        val = _read(split.val, val_udf, ids=split.val_ids)
        tiles = TileSet(split.val, frozenset(split.val_ids) if split.val_ids is not None else None, **checks)
    test, num_test = None, 0
    if cfg.test_uri is not None:
        test_shards = scan_shards(cfg.test_uri, cfg.s3_endpoint, allow_incomplete=cfg.allow_incomplete)
        _check_compatible(shards, test_shards)
        test_udf = CutSamples(test_shards.meta, cfg.s2_bands, cfg.crop, SampleDraw(False), seasons_out=False, **checks)
        test, num_test = _read(test_shards, test_udf), test_shards.num_rows
        tiles = TileSet(test_shards, **checks)
    return DownstreamDatasets(train, val, test, meta, num_train, split.num_val, num_test, clock, skipped, tiles)


def _training_subset(
    shards: ShardSet, split: _Split, cfg: DownstreamDataConfig, seed: int
) -> tuple[TrainingSubset, int]:
    """The seeded subset of the training rows ``cfg`` asks for, and how many rows it keeps."""
    ids = [row_id for row_id in shards.read_ids() if split.train_keep is None or split.train_keep(row_id)]
    key = "data.train_count" if cfg.train_count is not None else "data.train_fraction"
    try:
        subset = TrainingSubset.draw(ids, seed, fraction=cfg.train_fraction, count=cfg.train_count)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc} in {cfg.uri} (after the validation split)") from None
    return subset, sum(1 for row_id in ids if subset(row_id))
