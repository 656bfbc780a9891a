"""Sample-selection weights: class-balanced segmentation weights and consistency weights (spec 6-7).

Both are computed without gradient; they only scale the per-pixel losses.
"""

from __future__ import annotations

import torch

from cromss_ray.method.schedules import RampKind, ramp


@torch.no_grad()
def selection_weights(
    confidence: torch.Tensor,
    y: torch.Tensor,
    ratio: float,
    classes: int,
    class_balanced: bool = True,
) -> torch.Tensor:
    """Segmentation-loss weights in [0, 1] from entangled label confidences (spec 6).

    ``confidence`` and the labels ``y`` share one shape (normally ``(N, H, W)``, the
    worker's whole local batch). For ``0 < ratio < 1`` and each class c with n_c pixels,
    ``k = floor(n_c * ratio)``; if k > 0 the k-th largest confidence tau_c of the class
    gives its pixels ``clip(c / tau_c, 0, 1)`` (all 1 when tau_c = 0), and if k = 0 the
    class's pixels get 0 (reference behaviour). ``ratio = 1`` gives 1 everywhere and
    ``ratio = 0`` gives the confidence itself. ``class_balanced=False`` uses one threshold
    over all labelled pixels. Pixels whose label lies outside ``0 .. classes-1`` get 0.

    The per-class thresholds come from one stable sort by confidence and one by class,
    so there is no loop over classes and no device-to-host synchronisation.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"selection ratio must lie in [0, 1], got {ratio}")
    if confidence.shape != y.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} and labels {tuple(y.shape)} differ in shape")
    y = y.long()
    labelled = (y >= 0) & (y < classes)
    if ratio == 1.0:
        return labelled.to(confidence.dtype)
    if ratio == 0.0:
        return torch.where(labelled, confidence, 0.0)
    if confidence.numel() == 0:
        return torch.zeros_like(confidence)

    groups = classes + 1 if class_balanced else 2
    group = torch.where(labelled, y if class_balanced else 0, groups - 1).reshape(-1)
    flat = confidence.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    sorted_confidence = flat[order]

    counts = torch.bincount(group, minlength=groups)
    starts = torch.cumsum(counts, dim=0) - counts
    k = torch.floor(counts.to(torch.float64) * ratio).long()
    threshold = sorted_confidence[(starts + k - 1).clamp(0, flat.numel() - 1)]

    pixel_k = k[group].reshape(y.shape)
    pixel_threshold = threshold[group].reshape(y.shape)
    positive = pixel_threshold > 0
    soft = (confidence / torch.where(positive, pixel_threshold, 1.0)).clamp(0.0, 1.0)
    weights = torch.where(positive, soft, 1.0)
    return torch.where(labelled & (pixel_k > 0), weights, 0.0)


@torch.no_grad()
def consistency_weights(confidence: torch.Tensor, epoch: int, length: int, kind: RampKind = "exp") -> torch.Tensor:
    """Consistency weights ``v = (1 - r) + r c^`` while epoch <= length, then ``v = c^`` (spec 7)."""
    if epoch > length:
        return confidence.clone()
    r = ramp(epoch, length, kind)
    return (1.0 - r) + r * confidence
