"""The last step of a batch, on the training device: the network inputs (spec 9), integer targets and the prior.

Batches leave the Ray Data pipeline (:mod:`cromss_ray.data.pipeline`) in the stored dtype;
:func:`to_device` moves them to the device and makes the reference's input representation
there, batched, with the same float32 steps as :func:`~cromss_ray.data.scaling.network_input`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cromss_ray.data.scaling import V8_MAX, input_rule
from cromss_ray.data.schema import ModalitySpec, ShardMetadata, s2_subset_names
from cromss_ray.method.smoothing import smoothing_prior


@dataclass
class DeviceBatch:
    """A batch on the device: network inputs, integer targets, the prior when there is one."""

    x1: torch.Tensor
    x2: torch.Tensor
    y: torch.Tensor
    prior: torch.Tensor | None = None
    clean_y: torch.Tensor | None = None


def network_input_tensor(stored: torch.Tensor, spec: ModalitySpec) -> torch.Tensor:
    """:func:`~cromss_ray.data.scaling.network_input` on ``stored``'s device: the same float32 steps, the same bits.

    Every constant is a float32 tensor on the device (no Python scalar operand, which a
    GPU division may turn into a multiplication by its reciprocal).
    """
    rule = input_rule(spec)
    device = stored.device

    def per_band(constants: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(constants, np.float32)).to(device).reshape(-1, 1, 1)

    full_scale = per_band(np.array([V8_MAX]))
    values = stored.to(torch.float32)
    if not rule.v8:
        if not rule.identity:
            values = values * per_band(np.array([rule.gain])) + per_band(np.array([rule.bias]))
        scaled = (values - per_band(rule.low)) / per_band(rule.span) * full_scale
        values = torch.floor(torch.clamp(torch.nan_to_num(scaled, nan=0.0), 0, V8_MAX))
    return values / full_scale


def to_device(
    batch: dict[str, torch.Tensor],
    meta: ShardMetadata,
    device: torch.device | str,
    *,
    prior: str = "ts",
    sigma: float = 3.0,
    classes: int | None = None,
) -> DeviceBatch:
    """Move a pipeline batch to ``device``, make the network inputs and, on the fast path, compute the prior.

    Images become the reference's input representation (spec 9,
    :func:`network_input_tensor`); the batch's S2 bands are the subset of its band count,
    as :class:`~cromss_ray.data.transforms.CutSamples` cuts them.

    The prior is the batch's own ``prior`` (CPU path), or is computed here from
    ``labels_all`` and ``season`` after the crop (fast path, spec 2): it equals the
    full-tile prior more than ``4 * sigma`` pixels away from the crop border (float32
    rounding aside) and differs near it, where the reflecting border of the Gaussian
    sees the crop edge instead of the tile's pixels. None for ``prior="none"`` and for
    batches that carry neither (validation, downstream).
    """
    device = torch.device(device)

    def move(name: str) -> torch.Tensor:
        return batch[name].to(device, non_blocking=True)

    smoothing = None
    if prior != "none" and "prior" in batch:
        smoothing = move("prior").to(torch.float32)
    elif prior != "none" and "labels_all" in batch:
        smoothing = smoothing_prior(move("labels_all"), move("season"), prior, classes or meta.num_classes, sigma)
    s2 = move("s2")
    return DeviceBatch(
        x1=network_input_tensor(move("s1"), meta.s1),
        x2=network_input_tensor(s2, meta.s2.with_bands(s2_subset_names(s2.shape[-3]))),
        y=move("label").long(),
        prior=smoothing,
        clean_y=move("clean_label").long() if "clean_label" in batch else None,
    )
