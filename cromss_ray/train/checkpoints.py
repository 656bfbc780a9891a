"""Checkpoints of a training run: what one holds, writing it, and resuming from it.

A checkpoint is one directory (architecture, "names that stay fixed"): ``model.pt``
(the unwrapped model's state dict), ``optim.pt`` (optimiser, scheduler and gradient
scaler states), ``config.yaml`` (the whole validated config) and ``meta.json`` (the
completed epoch count, the epoch's metrics, the MLflow run id and package versions).
A run is resumed from its latest checkpoint (:func:`latest_checkpoint`) only when the
checkpoint holds the same network (:func:`check_resumable`), and rank 0 keeps writing
to the MLflow run the checkpoint names (:func:`~cromss_ray.train.reporting.open_tracker`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import yaml
from pydantic import BaseModel
from torch import nn

from cromss_ray.config import ConfigError, FinetuneConfig, OptimConfig, PretrainConfig, build_config, flatten, to_yaml
from cromss_ray.models.stored import CONFIG_FILE, WEIGHTS_FILE
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.train.cluster import absolute_storage_path
from cromss_ray.train.collectives import unwrap
from cromss_ray.train.optim import LearningRateScheduler, Precision, build_lr_scheduler, build_optimizer

OPTIM_FILE = "optim.pt"
META_FILE = "meta.json"
VERSIONED_PACKAGES = ("cromss-ray", "torch", "ray", "segmentation-models-pytorch")
RESUME_KEYS = ("model.", "data.s2_bands")
"""Config keys a resumed run must share with its checkpoint (they fix the network's shape)."""


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

    def save(self, directory: Path, config: BaseModel, meta: Mapping[str, Any]) -> None:
        """Write ``model.pt``, ``optim.pt``, ``config.yaml`` and ``meta.json`` into ``directory``."""
        torch.save(unwrap(self.model).state_dict(), directory / WEIGHTS_FILE)
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
    return torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)


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
