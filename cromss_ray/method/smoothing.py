"""Spatial-temporal label smoothing: the prior and the smoothed target (spec 2).

The prior is a batched torch computation that runs on any device in float32 and
reproduces ``scipy.ndimage.gaussian_filter(onehot_c, sigma, truncate=truncate)`` per
class, with scipy's default 'reflect' borders (``d c b a | a b c d``, numpy's
'symmetric'), also when the filter radius exceeds the image size. The separable filter is two
float32 matrix products with banded filter matrices: on a GPU they run on the matrix
units at a small share of a training step, where a sum of shifted slices was a
quarter of it. They are exact float32 as long as the process keeps PyTorch's default
float32 matmul precision ('highest'); ``torch.set_float32_matmul_precision('high')``
would let them run in TF32, to about 1e-3.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch

PriorKind = Literal["t", "s", "ts"]
PRIOR_KINDS: tuple[str, ...] = ("t", "s", "ts")


def _gaussian_taps(sigma: float, truncate: float) -> list[float]:
    """Normalised 1-D Gaussian weights for offsets 0 .. radius, radius = int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    weights = [math.exp(-0.5 * (offset / sigma) ** 2) for offset in range(radius + 1)]
    total = weights[0] + 2.0 * sum(weights[1:])
    return [w / total for w in weights]


def _reflect_indices(size: int, radius: int) -> torch.Tensor:
    """Source index of every position in ``-radius .. size + radius - 1`` under half-sample reflection."""
    positions = torch.arange(-radius, size + radius)
    folded = torch.remainder(positions, 2 * size)
    return torch.where(folded >= size, 2 * size - 1 - folded, folded)


@functools.lru_cache(maxsize=64)
def _filter_matrix(size: int, sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    """The ``(size, size)`` float32 matrix ``A`` with ``A @ v`` the 1-D Gaussian filter of ``v`` (reflecting borders).

    Row ``j`` holds the taps of output ``j`` at the (reflected) source positions; taps
    that reflect onto the same source are summed, so a radius beyond the image is exact too.
    """
    taps = torch.tensor(_gaussian_taps(sigma, truncate), dtype=torch.float64)
    radius = len(taps) - 1
    offsets = torch.arange(-radius, radius + 1)
    outputs = torch.arange(size).repeat_interleave(len(offsets))
    sources = _reflect_indices(size, radius)[outputs + radius + offsets.repeat(size)]
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((outputs, sources), taps[offsets.abs()].repeat(size), accumulate=True)
    return matrix.to(device=device, dtype=torch.float32)


def _gaussian_filter(maps: torch.Tensor, sigma: float, truncate: float) -> torch.Tensor:
    """Gaussian filter over the last two axes of ``maps`` with reflecting borders (scipy defaults).

    Two float32 matrix products, one per axis, with the banded filter matrices.
    """
    rows = _filter_matrix(maps.shape[-2], sigma, truncate, maps.device)
    columns = _filter_matrix(maps.shape[-1], sigma, truncate, maps.device)
    return torch.matmul(torch.matmul(rows, maps), columns.T)


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Rescale each pixel's class values (axis -3) to sum to 1; a pixel without mass becomes uniform."""
    total = maps.sum(dim=-3, keepdim=True)
    uniform = torch.full_like(maps, 1.0 / maps.shape[-3])
    return torch.where(total > 0, maps / total.clamp_min(torch.finfo(maps.dtype).tiny), uniform)


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Float one-hot with the class axis inserted before the last two axes; labels outside 0..C-1 give zeros."""
    class_ids = torch.arange(classes, device=labels.device).view(classes, 1, 1)
    return (labels.unsqueeze(-3) == class_ids).to(torch.float32)


def smoothing_prior(
    labels: torch.Tensor,
    season: int | torch.Tensor,
    kind: PriorKind = "ts",
    classes: int = 9,
    sigma: float = 3.0,
    truncate: float = 4.0,
) -> torch.Tensor:
    """Smoothing prior from all seasons' labels (spec 2).

    ``labels`` is integer ``(T, H, W)`` (then ``season`` is an int) or ``(N, T, H, W)``
    (then ``season`` is an int or an ``(N,)`` tensor of per-sample seasons). Returns a
    float32 ``(C, H, W)`` / ``(N, C, H, W)`` prior on the labels' device, each pixel
    summing to 1:

    * temporal ``P_t = norm(G(F))`` with ``F = (1/T) sum_s onehot(labels[s])``;
    * spatial ``P_s = norm(G(onehot(labels[season])))``;
    * ``kind`` 'ts' = ``(P_t + P_s) / 2``, 't' = ``P_t``, 's' = ``P_s``.

    G is a per-class Gaussian (``sigma``, radius ``int(truncate * sigma + 0.5)``) with
    reflecting borders. A label outside ``0 .. classes-1`` (the no-data value 255)
    contributes no one-hot mass; a pixel left with no mass at all after filtering
    (an image without any label) gets the uniform prior 1/C.
    """
    if kind not in PRIOR_KINDS:
        raise ValueError(f"prior kind must be one of {PRIOR_KINDS}, got {kind!r}")
    if labels.dim() not in (3, 4):
        raise ValueError(f"labels must be (T, H, W) or (N, T, H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    batched = labels.dim() == 4
    if not batched:
        if not isinstance(season, int):
            raise ValueError("an unbatched (T, H, W) label stack takes an int season")
        labels = labels.unsqueeze(0)
    samples, seasons = labels.shape[:2]
    season_index = torch.as_tensor(season, device=labels.device).long()
    if season_index.dim() == 0:
        season_index = season_index.expand(samples)
    if season_index.shape != (samples,):
        raise ValueError(f"season must be an int or a ({samples},) tensor, got shape {tuple(season_index.shape)}")
    if bool(((season_index < 0) | (season_index >= seasons)).any()):
        raise ValueError(f"season must lie in 0 .. {seasons - 1}, got {season_index.tolist()}")

    maps = []
    if "t" in kind:
        class_ids = torch.arange(classes, device=labels.device).view(1, 1, classes, 1, 1)
        frequency = (labels.unsqueeze(2) == class_ids).sum(dim=1, dtype=torch.float32) / seasons
        maps.append(frequency)
    if "s" in kind:
        drawn = labels[torch.arange(samples, device=labels.device), season_index]
        maps.append(_one_hot(drawn, classes))
    filtered = _gaussian_filter(torch.cat(maps, dim=1), sigma, truncate)
    priors = [_normalise(part) for part in filtered.split(classes, dim=1)]
    prior = priors[0] if len(priors) == 1 else (priors[0] + priors[1]) / 2
    return prior if batched else prior.squeeze(0)


def smoothed_target(
    y: torch.Tensor,
    prior: torch.Tensor | None,
    factors: Sequence[float],
    classes: int,
) -> torch.Tensor:
    """Smoothed soft target ``q`` ``(N, C, H, W)`` from labels ``y`` ``(N, H, W)`` (spec 2).

    * two factors (a, b) with a prior P: ``q = (1 - a - b) onehot(y) + a P + b / C``;
    * one factor a with a prior: ``q = (1 - a) onehot(y) + a P``;
    * one factor a without prior: ``q = (1 - a) onehot(y) + a / C``;
    * no factor: ``q = onehot(y)``.

    Without a prior (prior type 'none') P is the uniform 1 / C, as in the spec's one-factor
    rule, so two factors give ``q = (1 - a - b) onehot(y) + (a + b) / C``: a sweep may
    draw (a, b) and the prior type independently. Pixels whose label lies outside
    ``0 .. classes-1`` carry no target: their ``q`` is all zeros, so they add nothing to
    any loss term.
    """
    factors = tuple(float(f) for f in factors)
    if len(factors) > 2 or any(f < 0 for f in factors) or sum(factors) > 1:
        raise ValueError(f"smoothing takes at most two non-negative factors summing to at most 1, got {factors}")
    if prior is not None and prior.shape != (*y.shape[:-2], classes, *y.shape[-2:]):
        raise ValueError(
            f"prior shape {tuple(prior.shape)} does not match labels {tuple(y.shape)} with {classes} classes"
        )
    onehot = _one_hot(y, classes)
    labelled = ((y >= 0) & (y < classes)).unsqueeze(-3)
    if not factors:
        return onehot
    a, b = factors if len(factors) == 2 else (factors[0], 0.0)
    if prior is None:
        target = (1 - a - b) * onehot + (a + b) / classes
    else:
        target = (1 - a - b) * onehot + a * prior.float() + b / classes
    return target * labelled
