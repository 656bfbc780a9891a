"""The last steps of a batch, on the training device: spec 9's rotations, the network inputs, integer targets and the prior.

Batches leave the Ray Data pipeline (:mod:`cromss_ray.data.pipeline`) in the stored dtype,
cropped and flipped, each training sample with the angle of its rotation
(``rotation_degrees``, 0 for none). :func:`to_device` moves them to the device, rotates the
samples that have an angle (:class:`BatchRotation`: the float arithmetic of
:func:`~cromss_ray.data.transforms.rotate`, so the same values), and makes the reference's
input representation there, batched, with the same float32 steps as
:func:`~cromss_ray.data.scaling.network_input`. Resampling the 15 bands of a rotated 256 px
sample costs a CPU core 10-20 ms and a GPU next to nothing, and the data workers' cores
are what a GPU node runs short of first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cromss_ray.data.scaling import V8_MAX, input_rule
from cromss_ray.data.schema import ModalitySpec, ShardMetadata, s2_subset_names
from cromss_ray.data.transforms import ROTATION_FIELD, reflect_101
from cromss_ray.method.smoothing import smoothing_prior

BILINEAR_FIELDS = ("s1", "s2", "prior")
NEAREST_FIELDS = ("label", "labels_all", "clean_label")


@dataclass
class DeviceBatch:
    """A batch on the device: network inputs, integer targets, the prior when there is one."""

    x1: torch.Tensor
    x2: torch.Tensor
    y: torch.Tensor
    prior: torch.Tensor | None = None
    clean_y: torch.Tensor | None = None


@dataclass(frozen=True)
class BatchRotation:
    """The rotations of some samples of a batch (spec 9), as flat source indices and bilinear
    weights on the device.

    Built by :meth:`plan` with the steps of :func:`~cromss_ray.data.transforms.rotation_plan`
    (float64 coordinates, the same floors and reflect-101 about the window's edges, float32
    weights) and applied with those of :func:`~cromss_ray.data.transforms.rotate` (the four
    corners' products summed in the same order, one operation at a time, rounded for integer
    dtypes), so a rotated sample equals ``Geometry.apply`` of its geometry value for value.
    ``samples`` (on the CPU) are the batch positions of the rotated samples.
    """

    samples: torch.Tensor
    nearest_sources: torch.Tensor
    corners: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def plan(cls, degrees: np.ndarray, height: int, width: int, device: torch.device) -> BatchRotation | None:
        """The rotation of every sample whose angle in ``degrees`` is not 0; None when none is."""
        samples = np.flatnonzero(degrees)
        if samples.size == 0:
            return None
        radians = np.deg2rad(degrees[samples])

        def per_sample(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.round(values, 12)).to(device).reshape(-1, 1, 1)

        cos, sin = per_sample(np.cos(radians)), per_sample(np.sin(radians))
        rows = torch.arange(height, dtype=torch.float64, device=device)[:, None] - (height - 1) / 2
        cols = torch.arange(width, dtype=torch.float64, device=device)[None, :] - (width - 1) / 2
        source_rows = (cos * rows + sin * cols) + (height - 1) / 2
        source_cols = (cos * cols - sin * rows) + (width - 1) / 2
        reach = math.hypot((height - 1) / 2, (width - 1) / 2)

        def axis(source: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, ...]:
            """Flat offsets of the nearest and of the two bilinear source lines, and the second's weight.

            Reflect-101 through a table over every line a rotation can reach (within ``reach`` of
            the centre), which saves an integer modulo per pixel."""
            low = math.floor((size - 1) / 2 - reach) - 1
            high = math.ceil((size - 1) / 2 + reach) + 2
            table = torch.from_numpy(reflect_101(np.arange(low, high + 1), size) * stride).to(device)
            floor = torch.floor(source)
            first = floor.to(torch.int64) - low
            nearest = torch.take(table, torch.floor(source + 0.5).to(torch.int64) - low)
            return nearest, torch.take(table, first), torch.take(table, first + 1), (source - floor).to(torch.float32)

        nearest_rows, top, bottom, row_weight = axis(source_rows, height, width)
        nearest_cols, left, right, col_weight = axis(source_cols, width, 1)
        corners = torch.stack((top + left, top + right, bottom + left, bottom + right))
        weights = torch.stack(
            (
                (1 - row_weight) * (1 - col_weight),
                (1 - row_weight) * col_weight,
                row_weight * (1 - col_weight),
                row_weight * col_weight,
            )
        )
        return cls(
            torch.from_numpy(samples),
            (nearest_rows + nearest_cols).flatten(1),
            corners.flatten(2),
            weights.flatten(2),
        )

    def _planes(self, batch: torch.Tensor) -> torch.Tensor:
        """The rotated samples of ``batch`` (B, ..., h, w) as (R, planes, h * w); uint16 as int32,
        which more of torch's kernels take."""
        if batch.dtype == torch.uint16:
            batch = batch.to(torch.int32)
        rotated = batch.index_select(0, self.samples.to(batch.device))
        return rotated.reshape(len(self.samples), -1, batch.shape[-2] * batch.shape[-1])

    def _sources(self, indices: torch.Tensor, planes: int) -> torch.Tensor:
        return indices[:, None, :].expand(-1, planes, -1)

    def _put(self, batch: torch.Tensor, rotated: torch.Tensor) -> torch.Tensor:
        """A copy of ``batch`` in ``rotated``'s dtype with its rotated samples replaced (sample by
        sample: a few contiguous copies beat torch's copies by index several times on a CPU)."""
        out = batch.to(rotated.dtype, copy=True)
        for slot, sample in enumerate(self.samples.tolist()):
            out[sample].copy_(rotated[slot].reshape(batch.shape[1:]))
        return out

    def nearest(self, batch: torch.Tensor) -> torch.Tensor:
        """Labels: each rotated sample's pixels from their nearest source pixel."""
        planes = self._planes(batch)
        return self._put(batch, torch.gather(planes, 2, self._sources(self.nearest_sources, planes.shape[1])))

    def bilinear(self, batch: torch.Tensor) -> torch.Tensor:
        """Images and the prior: bilinear in float32, rounded to whole values for an integer dtype.

        Returns float32 (what the network input is made from), so the integer values need no
        round trip through their dtype. The buffers are reused over the four corners: on a CPU,
        fresh multi-MB temporaries cost page faults on the order of the arithmetic."""
        planes = self._planes(batch)
        gathered = torch.empty_like(planes)
        product = torch.empty(planes.shape, dtype=torch.float32, device=planes.device)
        values = torch.zeros_like(product)
        for corner, weight in zip(self.corners, self.weights, strict=True):
            torch.gather(planes, 2, self._sources(corner, planes.shape[1]), out=gathered)
            product.copy_(gathered)
            product *= weight[:, None, :]
            values += product
        if not batch.dtype.is_floating_point:
            values.round_()
        return self._put(batch, values)


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


def rotated_fields(
    batch: dict[str, torch.Tensor], device: torch.device, skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The batch's images, prior and labels (but ``skip``) on ``device``, each sample rotated by
    its ``rotation_degrees`` angle (spec 9); empty when no sample of the batch has one."""
    if ROTATION_FIELD not in batch:
        return {}
    height, width = batch["label"].shape[-2:]
    rotation = BatchRotation.plan(batch[ROTATION_FIELD].cpu().numpy(), height, width, device)
    if rotation is None:
        return {}
    return {
        name: (rotation.bilinear if name in BILINEAR_FIELDS else rotation.nearest)(batch[name].to(device))
        for name in (*BILINEAR_FIELDS, *NEAREST_FIELDS)
        if name in batch and name not in skip
    }


def to_device(
    batch: dict[str, torch.Tensor],
    meta: ShardMetadata,
    device: torch.device | str,
    *,
    prior: str = "ts",
    sigma: float = 3.0,
    classes: int | None = None,
) -> DeviceBatch:
    """Move a pipeline batch to ``device``, rotate, make the network inputs and, on the fast path, compute the prior.

    Samples with a ``rotation_degrees`` angle are rotated first (spec 9,
    :class:`BatchRotation`): images and a CPU prior bilinear, the labels by nearest pixel.
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
    moved: dict[str, torch.Tensor] = {}

    def move(name: str) -> torch.Tensor:
        if name not in moved:
            moved[name] = batch[name].to(device, non_blocking=True)
        return moved[name]

    moved.update(rotated_fields(batch, device, skip=("prior",) if prior == "none" else ()))

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
