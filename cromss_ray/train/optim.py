"""Optimisation of one worker's network: precision, optimiser and learning-rate schedule (spec 9).

Plain PyTorch (no Ray), so the step functions that ``bench/`` runs in one process use it too.
``optim`` becomes an optimiser and a learning-rate schedule (spec 9: Adam 5e-3 with a
plateau schedule on the validation loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import (
    ExponentialLR,
    LambdaLR,
    LRScheduler,
    ReduceLROnPlateau,
    StepLR,
)

from cromss_ray.config import OptimConfig

LearningRateScheduler = LRScheduler | ReduceLROnPlateau


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


@dataclass(frozen=True)
class CosineToFloor:
    """The cosine schedule as a factor of ``lr`` per zero-based epoch: from ``lr`` down to ``floor`` over
    ``epochs`` epochs, then held at ``floor`` (spec 11: 5e-4 to 1e-5 over 40 of 50 epochs).

    Epoch e < epochs trains at ``floor + (lr - floor) (1 + cos(pi e / epochs)) / 2``; every later epoch
    at ``floor``. With ``epochs`` the whole run and ``floor`` 0 it is plain cosine annealing.
    """

    lr: float
    floor: float
    epochs: int

    def __call__(self, epoch: int) -> float:
        if epoch >= self.epochs:
            return self.floor / self.lr
        cosine = (1.0 + math.cos(math.pi * epoch / self.epochs)) / 2.0
        return (self.floor + (self.lr - self.floor) * cosine) / self.lr


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> LearningRateScheduler | None:
    """The per-epoch learning-rate schedule (plateau on the validation loss is the reference, spec 9)."""
    if optim.scheduler == "plateau":
        return ReduceLROnPlateau(optimizer, mode="min", factor=optim.plateau_factor, patience=optim.plateau_patience)
    if optim.scheduler == "exponential":
        return ExponentialLR(optimizer, gamma=optim.gamma)
    if optim.scheduler == "cosine":
        return LambdaLR(optimizer, CosineToFloor(optim.lr, optim.lr_floor, optim.cosine_epochs or optim.epochs))
    if optim.scheduler == "step":
        return StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)
    return None


def step_lr_scheduler(scheduler: LearningRateScheduler | None, val_loss: float) -> None:
    """Advance the schedule by one epoch; the plateau schedule watches the validation loss."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


def learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])
