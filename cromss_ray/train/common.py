"""What every Ray Train loop of this project shares: cluster, scaling, precision, optimiser, checkpoints.

The pretraining loop (:mod:`cromss_ray.train.pretrain`) and the fine-tuning loop
(:mod:`cromss_ray.train.finetune`) use the same pieces, so that a config section means
the same thing in both:
``scaling`` becomes a :class:`ray.train.ScalingConfig` (GPUs used when the cluster has
them), ``optim`` an optimiser and a learning-rate schedule (spec 9: Adam 5e-3 with a
plateau schedule on the validation loss), ``run`` a :class:`ray.train.RunConfig` whose
name and storage path identify the run, so that running it again resumes it.

A checkpoint is one directory (architecture, "names that stay fixed"): ``model.pt``
(the unwrapped model's state dict), ``optim.pt`` (optimiser, scheduler and gradient
scaler states), ``config.yaml`` (the whole validated config) and ``meta.json`` (the
completed epoch count, the epoch's metrics, the MLflow run id and package versions).
A run is resumed from its latest checkpoint (:func:`latest_checkpoint`) only when the
checkpoint holds the same network (:func:`check_resumable`), and rank 0 keeps writing
to the MLflow run the checkpoint names (:func:`open_tracker`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel
from ray.actor import ActorHandle
from torch import nn
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LRScheduler,
    ReduceLROnPlateau,
    StepLR,
)

from cromss_ray.config import (
    ConfigError,
    FinetuneConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    ScalingConfig,
    build_config,
    flatten,
    to_yaml,
)
from cromss_ray.tracking.runs import RunTracker

MODEL_FILE = "model.pt"
OPTIM_FILE = "optim.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
LOCAL_HOST = "127.0.0.1"
VERSIONED_PACKAGES = ("cromss-ray", "torch", "ray", "segmentation-models-pytorch")
TRAIN = "train"
VAL = "val"
RESUME_KEYS = ("model.", "data.s2_bands")
"""Config keys a resumed run must share with its checkpoint (they fix the network's shape)."""

Scheduler = LRScheduler | ReduceLROnPlateau


def init_ray() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start one on 127.0.0.1."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(_node_ip_address=LOCAL_HOST)


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster this process is connected to offers any GPU."""
    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(scaling: ScalingConfig) -> bool:
    """``scaling.use_gpu`` with ``"auto"`` decided by the cluster: GPUs when it has them."""
    if scaling.use_gpu == "auto":
        return cluster_has_gpus()
    return bool(scaling.use_gpu)


def ray_scaling_config(scaling: ScalingConfig) -> ray.train.ScalingConfig:
    """Workers and per-worker resources of a run; one GPU share per worker when GPUs are used."""
    use_gpu = resolve_use_gpu(scaling)
    resources: dict[str, float] = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def absolute_storage_path(path: str) -> str:
    """A local storage path made absolute (Ray workers run elsewhere); URIs (``s3://``...) unchanged."""
    scheme = urlparse(path).scheme
    if scheme and len(scheme) > 1:
        return path
    return str(Path(path).expanduser().resolve())


def ray_run_config(run: RunConfig, callbacks: Sequence[ray.train.UserCallback] = ()) -> ray.train.RunConfig:
    """Run identity, checkpoint retention and fault tolerance of a run.

    The name and storage path identify the run: Ray Train finds the checkpoints of an
    earlier run with the same pair and hands the latest to the loop, which resumes from
    it. Retention keeps the most recent ``run.checkpoints_to_keep`` checkpoints, and a
    failed worker group is restarted from the latest checkpoint up to
    ``run.max_failures`` times (-1: without limit).
    """
    return ray.train.RunConfig(
        name=run.name,
        storage_path=absolute_storage_path(run.storage_path),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.checkpoints_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
        callbacks=list(callbacks),
    )


def latest_checkpoint(config: PretrainConfig | FinetuneConfig) -> ray.train.Checkpoint | None:
    """The latest checkpoint of the run named ``run.name`` under ``run.storage_path``, if any."""
    path = f"{absolute_storage_path(config.run.storage_path).rstrip('/')}/{config.run.name}"
    try:
        return ray.train.Result.from_path(path).checkpoint
    except RuntimeError:
        return None


def check_resumable(config: PretrainConfig | FinetuneConfig, checkpoint: ray.train.Checkpoint) -> None:
    """A run resumes only with the network its checkpoint holds (:data:`RESUME_KEYS`).

    Reads the checkpoint's ``config.yaml`` where it is stored (no download of the
    weights) as a config of ``config``'s type; a ConfigError names what differs.
    """
    path = f"{checkpoint.path}/{CONFIG_FILE}"
    task = "fine-tuning" if isinstance(config, FinetuneConfig) else "pretraining"
    try:
        with checkpoint.filesystem.open_input_stream(path) as stream:
            saved = build_config(type(config), yaml.safe_load(stream.read()))
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"{path}: not the config of a {task} checkpoint: {exc}") from None
    ours, theirs = flatten(config), flatten(saved)
    differing = [
        f"{key} ({theirs.get(key)!r} in the checkpoint, {ours[key]!r} now)"
        for key in sorted(ours)
        if key.startswith(RESUME_KEYS) and ours[key] != theirs.get(key)
    ]
    if differing:
        raise ConfigError(
            f"run '{config.run.name}' in {config.run.storage_path} has a checkpoint ({checkpoint.path}) "
            f"of another network: {'; '.join(differing)}. Choose a new run.name to start afresh."
        )


class ExactValidationDataConfig(ray.train.DataConfig):
    """Shard ``train`` equally across workers and ``val`` exactly.

    Training needs the same number of rows (hence steps) on every rank, or a DDP rank
    would wait for a gradient all-reduce its peers never start; Ray Train's equal split
    drops the remainder for that. Validation must score every held-out row once
    (spec 11: one confusion matrix over the whole set), so its split keeps every row and
    the ranks' confusion matrices are summed afterwards.

    Validation samples are cut without augmentation, the same in every epoch, so they are
    cut once and kept in the object store: a streaming split would start a new Ray Data
    execution and cut them again every epoch (docs/benchmarks.md, section 2). The cost
    is the held-out samples' size in object-store memory (1 % of NoLDO-S12 at 256 px:
    about 1.2 GB for the whole cluster).
    """

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: list[ActorHandle] | None,
        worker_node_ids: list[str] | None,
        **kwargs: Any,
    ) -> list[dict[str, ray.data.DataIterator]]:
        others = {name: dataset for name, dataset in datasets.items() if name != VAL}
        shards = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if VAL in datasets:
            validation = datasets[VAL].materialize().split(world_size, equal=False, locality_hints=worker_handles)
            for shard, split in zip(shards, validation, strict=True):
                shard[VAL] = split.iterator()
        return shards


@dataclass(frozen=True)
class Precision:
    """Mixed precision of the forward pass: autocast dtype (None: fp32) and whether a gradient scaler is needed."""

    dtype: torch.dtype | None
    device: torch.device

    @classmethod
    def on(cls, device: torch.device, precision: str) -> Precision:
        """bf16 / fp16 autocast on a GPU; fp32 on a CPU whatever the config asks."""
        if device.type != "cuda" or precision == "fp32":
            return cls(None, device)
        return cls(torch.bfloat16 if precision == "bf16" else torch.float16, device)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast region of a forward pass (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled only for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def build_optimizer(parameters: Iterable[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """Adam (reference), AdamW or SGD with momentum, with the config's lr and weight decay."""
    if optim.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> Scheduler | None:
    """The per-epoch learning-rate schedule (plateau on the validation loss is the reference, spec 9)."""
    if optim.scheduler == "plateau":
        return ReduceLROnPlateau(optimizer, mode="min", factor=optim.plateau_factor, patience=optim.plateau_patience)
    if optim.scheduler == "exponential":
        return ExponentialLR(optimizer, gamma=optim.gamma)
    if optim.scheduler == "cosine":
        return CosineAnnealingLR(optimizer, T_max=optim.epochs)
    if optim.scheduler == "step":
        return StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)
    return None


def step_scheduler(scheduler: Scheduler | None, val_loss: float) -> None:
    """Advance the schedule by one epoch; the plateau schedule watches the validation loss."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


def learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sums(sums: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Element-wise sum of the same-keyed dicts of every rank (identity on one worker).

    Every rank must pass the same keys; they are reduced in sorted order.
    """
    keys = sorted(sums)
    if not is_distributed():
        return {key: float(sums[key]) for key in keys}
    values = torch.tensor([float(sums[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(keys, values.tolist(), strict=True))


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum of a tensor over every rank (for :meth:`ConfusionMatrix.all_reduce`)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` on one worker)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a checkpoint, stored in its ``meta.json``."""
    versions: dict[str, str] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class TrainingState:
    """Everything a checkpoint restores: the model and the optimiser, schedule and scaler driving it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler | None
    scaler: torch.amp.GradScaler

    def save(self, directory: Path, config: BaseModel, meta: Mapping[str, Any]) -> None:
        """Write ``model.pt``, ``optim.pt``, ``config.yaml`` and ``meta.json`` into ``directory``."""
        torch.save(unwrap(self.model).state_dict(), directory / MODEL_FILE)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(),
            },
            directory / OPTIM_FILE,
        )
        (directory / CONFIG_FILE).write_text(to_yaml(config))
        (directory / META_FILE).write_text(json.dumps(dict(meta), indent=2, sort_keys=True))

    def optimise(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss``: gradients (scaled for fp16), step, scaler update."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def load_optimisation(self, directory: Path, device: torch.device) -> None:
        """Restore optimiser, schedule and scaler from ``optim.pt`` (the model is loaded before wrapping)."""
        states = torch.load(directory / OPTIM_FILE, map_location=device, weights_only=True)
        self.optimizer.load_state_dict(states["optimizer"])
        if self.scheduler is not None and states["scheduler"] is not None:
            self.scheduler.load_state_dict(states["scheduler"])
        self.scaler.load_state_dict(states["scaler"])


def load_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict of a checkpoint directory (on the CPU)."""
    return torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)


def read_meta(directory: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint directory; a clear error naming the file when it is missing or broken."""
    path = directory / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint meta file: {exc}") from None


def restore_model(network: nn.Module, checkpoint: Path | None) -> dict[str, Any] | None:
    """Load a checkpoint directory's weights into ``network``; its ``meta.json`` (None without a checkpoint)."""
    if checkpoint is None:
        return None
    network.load_state_dict(load_model_state(checkpoint))
    return read_meta(checkpoint)


def prepare_training(
    network: nn.Module, optim: OptimConfig, precision: Precision, checkpoint: Path | None
) -> TrainingState:
    """``network`` wrapped for the worker group (DDP), with its optimiser, schedule and gradient scaler,
    their states restored from ``checkpoint`` when there is one (load the weights first: :func:`restore_model`)."""
    model = ray.train.torch.prepare_model(network)
    optimizer = build_optimizer(model.parameters(), optim)
    state = TrainingState(model, optimizer, build_scheduler(optimizer, optim), precision.grad_scaler())
    if checkpoint is not None:
        state.load_optimisation(checkpoint, precision.device)
    return state


@contextlib.contextmanager
def latest_checkpoint_directory() -> Iterator[Path | None]:
    """The local directory of the checkpoint Ray Train hands this worker (None when starting fresh)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def open_tracker(
    config: PretrainConfig | FinetuneConfig, loop_config: Mapping[str, Any], saved: Mapping[str, Any] | None
) -> RunTracker:
    """Rank 0's MLflow run: the run the checkpoint's ``meta.json`` names when resuming, else a new one.

    ``loop_config`` carries the ``tracking_uri``, the ``parent_run_id`` and the run ``tags``.
    """
    return RunTracker.start(
        config,
        tracking_uri=loop_config["tracking_uri"],
        experiment=config.tracking.experiment,
        run_name=config.run.name,
        run_id=saved["mlflow_run_id"] if saved else None,
        parent_run_id=loop_config["parent_run_id"],
        tags={"ray.train.run_name": config.run.name, **loop_config["tags"]},
    )


def checkpoint_meta(
    tracker: RunTracker, epoch: int, metrics: Mapping[str, float], **extra: Any
) -> dict[str, Any]:
    """``meta.json`` of a checkpoint: completed epochs, finite metrics, the MLflow run to resume,
    package versions, and ``extra`` (e.g. the registry name)."""
    return {
        "epoch": epoch,
        "metrics": finite_metrics(metrics),
        "mlflow_run_id": tracker.run_id,
        **extra,
        "versions": package_versions(),
    }


def progress_line(
    task: str, epoch: int, epochs: int, metrics: Mapping[str, float], keys: Sequence[str], seconds: float
) -> str:
    """``[cromss TASK] epoch E/N  key value ...  (S s)``: the ``keys`` present in ``metrics``."""
    values = "  ".join(f"{key} {metrics[key]:.4g}" for key in keys if key in metrics)
    return f"[cromss {task}] epoch {epoch}/{epochs}  {values}  ({seconds:.1f} s)"


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as plain floats for JSON, with NaN / infinity left out."""
    return {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}


def report_epoch(
    metrics: Mapping[str, float],
    *,
    epoch: int,
    write_checkpoint: Callable[[Path], None] | None,
) -> None:
    """Report one epoch's flat metrics (with ``epoch``) to Ray Train, with a checkpoint when due.

    Every rank must call this once per epoch (it is a barrier). ``write_checkpoint`` is
    given on rank 0 of a checkpointing epoch only: it fills a fresh directory that Ray
    Train then persists as ``checkpoint_epoch_<epoch>`` under the run's storage path.
    """
    flat = {**metrics, "epoch": epoch}
    if write_checkpoint is None:
        ray.train.report(flat)
        return
    with tempfile.TemporaryDirectory(prefix="cromss-checkpoint-") as directory:
        write_checkpoint(Path(directory))
        ray.train.report(
            flat,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
        )
