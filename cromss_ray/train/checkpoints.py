"""Checkpoints of a training run: what one holds, writing it, and resuming from it.

A checkpoint is one directory (architecture, "names that stay fixed"): ``model.pt``
(the unwrapped model's state dict), ``optim.pt`` (optimiser, scheduler and gradient
scaler states), ``config.yaml`` (the whole validated config) and ``meta.json`` (the
completed epoch count, the epoch's metrics, the MLflow run id and package versions).
A run is resumed from its latest checkpoint (:func:`latest_checkpoint`) only when the
checkpoint holds the same network and, unless ``run.allow_config_change``, the same config
but for :data:`CHANGEABLE_KEYS` (:func:`check_resumable`), and rank 0 keeps writing
to the MLflow run the checkpoint names (:func:`~cromss_ray.train.reporting.open_tracker`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
import yaml
from torch import nn

from cromss_ray.config import (
    ConfigChanges,
    ConfigError,
    FinetuneConfig,
    OptimConfig,
    PretrainConfig,
    build_config,
    describe_changes,
    flatten,
    to_yaml,
)
from cromss_ray.data.storage import write_atomically
from cromss_ray.models.stored import CONFIG_FILE, WEIGHTS_FILE, check_finite, read_config
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.train.cluster import absolute_storage_path
from cromss_ray.train.collectives import unwrap
from cromss_ray.train.optim import LearningRateScheduler, Precision, build_lr_scheduler, build_optimizer

OPTIM_FILE = "optim.pt"
META_FILE = "meta.json"
VERSIONED_PACKAGES = ("cromss-ray", "torch", "ray", "segmentation-models-pytorch")
RESUME_KEYS = ("model.", "data.s2_bands")
"""Config keys a resumed run must share with its checkpoint (they fix the network's shape)."""
CHANGEABLE_KEYS = (
    "optim.epochs",
    "optim.max_nonfinite_steps",
    "run.storage_path",
    "run.checkpoint_frequency",
    "run.checkpoints_to_keep",
    "run.max_failures",
    "run.validation_figures",
    "run.allow_config_change",
    "data.prefetch_batches",
    "scaling.use_gpu",
    "scaling.cpus_per_worker",
    "scaling.gpus_per_worker",
    "tracking.uri",
)
"""Config keys a resumed run may change freely: how long it runs (``optim.epochs``, except under the
cosine schedule, whose period is the epoch count), how it checkpoints, retries and reports, where it
runs and where it logs. Any other change is refused unless ``run.allow_config_change``."""


def changeable(key: str, config: PretrainConfig | FinetuneConfig) -> bool:
    """Whether ``key`` may differ from the checkpoint's config without ``run.allow_config_change``."""
    if key == "optim.epochs":
        return config.optim.scheduler != "cosine"
    return key in CHANGEABLE_KEYS


def latest_checkpoint(config: PretrainConfig | FinetuneConfig) -> ray.train.Checkpoint | None:
    """The latest checkpoint of the run named ``run.name`` under ``run.storage_path``, if any."""
    path = f"{absolute_storage_path(config.run.storage_path).rstrip('/')}/{config.run.name}"
    try:
        return ray.train.Result.from_path(path).checkpoint
    except RuntimeError:
        return None


def read_checkpoint_config(
    config: PretrainConfig | FinetuneConfig, checkpoint: ray.train.Checkpoint
) -> PretrainConfig | FinetuneConfig:
    """The checkpoint's ``config.yaml``, read where it is stored (no download of the weights), as a
    config of ``config``'s type; a ConfigError names the file."""
    path = f"{checkpoint.path}/{CONFIG_FILE}"
    task = "fine-tuning" if isinstance(config, FinetuneConfig) else "pretraining"
    try:
        with checkpoint.filesystem.open_input_stream(path) as stream:
            return build_config(type(config), yaml.safe_load(stream.read()))
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"{path}: not the config of a {task} checkpoint: {exc}") from None


def config_changes(config: PretrainConfig | FinetuneConfig, saved: PretrainConfig | FinetuneConfig) -> ConfigChanges:
    """Every key whose value differs between the checkpoint's config ``saved`` and ``config``, in key order."""
    ours, theirs = flatten(config), flatten(saved)
    return {
        key: (theirs.get(key), ours.get(key))
        for key in sorted(ours.keys() | theirs.keys())
        if ours.get(key) != theirs.get(key)
    }


def changes_to_record(config: PretrainConfig | FinetuneConfig, saved: PretrainConfig | FinetuneConfig) -> ConfigChanges:
    """The changes from ``saved`` (a checkpoint's config) to ``config`` beyond :data:`CHANGEABLE_KEYS`:
    those ``run.allow_config_change`` lets through and the run records."""
    return {key: change for key, change in config_changes(config, saved).items() if not changeable(key, config)}


def check_resumable(config: PretrainConfig | FinetuneConfig, checkpoint: ray.train.Checkpoint) -> ConfigChanges:
    """A run resumes only with the network its checkpoint holds (:data:`RESUME_KEYS`) and, unless
    ``run.allow_config_change``, with its config but for :data:`CHANGEABLE_KEYS`.

    Returns the changes allowed by ``run.allow_config_change`` (to record in the run); a
    ConfigError names every refused key with its old and new value.
    """
    changed = changes_to_record(config, read_checkpoint_config(config, checkpoint))
    where = f"run '{config.run.name}' in {config.run.storage_path} has a checkpoint ({checkpoint.path})"
    network = {key: change for key, change in changed.items() if key.startswith(RESUME_KEYS)}
    if network:
        raise ConfigError(
            f"{where} of another network: {describe_changes(network)}. Choose a new run.name to start afresh."
        )
    if changed and not config.run.allow_config_change:
        raise ConfigError(
            f"{where} with another config: {describe_changes(changed)}. Resume with the checkpoint's values, "
            "choose a new run.name to start afresh, or pass --allow-config-change (run.allow_config_change=true) "
            "to continue with the new values, recorded in the MLflow run."
        )
    return changed


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
    scheduler: LearningRateScheduler | None
    scaler: torch.amp.GradScaler

    def save(self, directory: Path, config: PretrainConfig | FinetuneConfig, meta: Mapping[str, Any]) -> None:
        """Write ``model.pt``, ``optim.pt``, ``config.yaml`` and ``meta.json`` into ``directory``, each
        through a temporary file renamed into place; a network with a non-finite parameter or buffer is
        refused before anything is written (:class:`~cromss_ray.models.stored.NonFiniteModelError`)."""
        model = unwrap(self.model)
        check_finite(model, f"run '{config.run.name}', checkpoint of epoch {meta.get('epoch')}: not written")
        optimisation = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
        }
        files = {
            WEIGHTS_FILE: torch_bytes(model.state_dict()),
            OPTIM_FILE: torch_bytes(optimisation),
            CONFIG_FILE: to_yaml(config).encode(),
            META_FILE: json.dumps(dict(meta), indent=2, sort_keys=True).encode(),
        }
        local = pafs.LocalFileSystem()
        for name, data in files.items():
            write_atomically(local, str(directory / name), data)

    def load_optimisation(self, directory: Path, device: torch.device) -> None:
        """Restore optimiser, schedule and scaler from ``optim.pt`` (the model is loaded before wrapping)."""
        states = torch.load(directory / OPTIM_FILE, map_location=device, weights_only=True)
        self.optimizer.load_state_dict(states["optimizer"])
        if self.scheduler is not None and states["scheduler"] is not None:
            self.scheduler.load_state_dict(states["scheduler"])
        self.scaler.load_state_dict(states["scaler"])


def torch_bytes(value: Any) -> bytes:
    """``value`` as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def load_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict of a checkpoint directory (on the CPU)."""
    return torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)


def read_meta(directory: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint directory; a clear error naming the file when it is missing or broken."""
    path = directory / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint meta file: {exc}") from None


def restored_changes(config: PretrainConfig | FinetuneConfig, checkpoint: Path | None) -> ConfigChanges:
    """The changes a run resumed from the checkpoint directory ``checkpoint`` makes to its config
    (:func:`changes_to_record`; none without a checkpoint): after a restart from a checkpoint the
    resumed run wrote itself, none."""
    if checkpoint is None:
        return {}
    return changes_to_record(config, read_config(checkpoint / CONFIG_FILE, type(config)))


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
    state = TrainingState(model, optimizer, build_lr_scheduler(optimizer, optim), precision.grad_scaler())
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


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as plain floats for JSON, with NaN / infinity left out."""
    return {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}
