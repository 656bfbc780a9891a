"""Collectives over the worker group (identities on one worker), and the network inside its DDP wrapper.

Plain ``torch.distributed``: the same step functions run under Ray Train and, on one
worker, in a plain process (``bench/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

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
