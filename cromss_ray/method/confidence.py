"""Per-pixel confidences and their cross-modal entangling (spec 3-4).

All functions work on detached logits and return tensors without gradient.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

ConfidenceKind = Literal["ce", "gini"]
CONFIDENCE_KINDS: tuple[str, ...] = ("ce", "gini")


@torch.no_grad()
def prediction_confidence(logits: torch.Tensor, kind: ConfidenceKind = "ce") -> torch.Tensor:
    """Prediction confidence ``(N, H, W)`` of logits ``(N, C, H, W)`` (spec 3).

    ``"ce"``: ``1 - H(p) / log(C)`` with the entropy ``H(p) = -sum_c p_c log p_c``;
    ``"gini"``: ``sum_c p_c^2``. The result is clamped to [0, 1] and a NaN becomes 0.
    The entropy is taken with log-softmax, so a class whose probability underflows to 0
    adds ``0 log 0 = 0`` (the reference took ``log(softmax)``, which turns such a
    saturated pixel into NaN and then 0).
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"confidence kind must be one of {CONFIDENCE_KINDS}, got {kind!r}")
    log_probs = F.log_softmax(logits.detach().float(), dim=1)
    probs = log_probs.exp()
    if kind == "ce":
        entropy = -(probs * log_probs).sum(dim=1)
        confidence = 1.0 - entropy / math.log(logits.shape[1])
    else:
        confidence = probs.square().sum(dim=1)
    return torch.nan_to_num(confidence, nan=0.0).clamp(0.0, 1.0)


@torch.no_grad()
def label_confidence(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Label confidence ``p_y`` ``(N, H, W)``: the probability given to the noisy label's class (spec 3).

    Pixels whose label lies outside ``0 .. C-1`` (no-data, ignored) get 0, and so does a NaN.
    """
    classes = logits.shape[1]
    probs = F.softmax(logits.detach().float(), dim=1)
    y = y.long()
    labelled = (y >= 0) & (y < classes)
    picked = probs.gather(1, torch.where(labelled, y, 0).unsqueeze(1)).squeeze(1)
    return torch.where(labelled, torch.nan_to_num(picked, nan=0.0), 0.0)


@torch.no_grad()
def entangle(c1: torch.Tensor, c2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-modal entangling ``c^_m = (c_m + c_1 c_2) / 2`` of two confidence maps (spec 4)."""
    common = c1 * c2
    return (c1 + common) / 2, (c2 + common) / 2
