"""Segmentation metrics from one confusion matrix over a whole evaluation set (spec 11)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


class ConfusionMatrix:
    """A ``(C, C)`` int64 confusion matrix, rows = target class, columns = predicted class (spec 11).

    Accumulate batches with :meth:`update`, sum the matrices of DDP ranks with
    :meth:`all_reduce` (or of other accumulators with :meth:`merge`), then read the
    metrics with :meth:`compute`. Pixels whose target equals ``ignore_index`` are left out.
    Keep the matrix on the device the all-reduce hook needs (``device``, e.g. CUDA for NCCL).
    """

    def __init__(self, classes: int, ignore_index: int | None = None, device: torch.device | str = "cpu") -> None:
        if classes < 1:
            raise ValueError(f"classes must be at least 1, got {classes}")
        self.classes = classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(classes, classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` class indices shaped like ``target``, or logits ``(N, C, ...)`` (argmax over axis 1).

        Raises a ValueError naming the values when a target (other than ``ignore_index``)
        or a prediction lies outside ``0 .. C-1``.
        """
        if pred.is_floating_point() and pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        if self.ignore_index is not None:
            kept = target != self.ignore_index
            pred, target = pred[kept], target[kept]
        for name, values in (("target", target), ("prediction", pred)):
            outside = (values < 0) | (values >= self.classes)
            if bool(outside.any()):
                raise ValueError(
                    f"{name} values {values[outside].unique().tolist()} lie outside 0 .. {self.classes - 1}"
                    + (f" and are not ignore_index {self.ignore_index}" if name == "target" else "")
                )
        counts = torch.bincount(target * self.classes + pred, minlength=self.classes**2)
        self.matrix += counts.view(self.classes, self.classes).to(self.matrix.device)

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the matrix by ``reduce(matrix)``, e.g. a sum over DDP ranks.

        ``reduce`` takes and returns a tensor, e.g.
        ``lambda t: (torch.distributed.all_reduce(t), t)[1]``.
        """
        reduced = reduce(self.matrix)
        if reduced.shape != self.matrix.shape:
            raise ValueError(f"all-reduce returned shape {tuple(reduced.shape)}, expected {tuple(self.matrix.shape)}")
        self.matrix = reduced.to(device=self.matrix.device, dtype=torch.int64)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another accumulator's counts; both must have the same classes."""
        if other.classes != self.classes:
            raise ValueError(f"cannot merge a {other.classes}-class matrix into a {self.classes}-class one")
        self.matrix += other.matrix.to(self.matrix.device)

    def reset(self) -> None:
        """Start over with zero counts."""
        self.matrix.zero_()

    def compute(self) -> dict[str, Any]:
        """Metrics of the accumulated matrix (spec 11).

        Returns ``oa`` (overall accuracy), per-class lists ``iou``, ``f1``, ``precision``,
        ``recall``, their unweighted class means ``miou`` and ``mf1``, and ``matrix`` (a CPU
        copy). A score whose denominator is 0 is NaN: IoU and F1 of a class absent from
        both target and prediction, precision of a class never predicted, recall of a
        class never in the target. ``miou`` and ``mf1`` average over the classes with a
        defined score, so a class absent from the whole evaluation set neither helps nor
        hurts. An empty matrix gives NaN everywhere.

        Beside them, the reference's convention (smp's ``zero_division=1``), so that
        numbers compare with the paper's tables: ``iou_ref`` and ``f1_ref`` score such an
        absent, never-predicted class 1, and ``miou_ref`` / ``mf1_ref`` average them over
        all C classes (an empty matrix gives 1).
        """
        matrix = self.matrix.detach().cpu().to(torch.float64)
        true_positive = matrix.diagonal()
        predicted = matrix.sum(dim=0)
        actual = matrix.sum(dim=1)
        false_positive = predicted - true_positive
        false_negative = actual - true_positive

        def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
            return torch.where(denominator > 0, numerator / denominator.clamp_min(1), math.nan)

        iou = ratio(true_positive, true_positive + false_positive + false_negative)
        f1 = ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative)
        iou_ref, f1_ref = iou.nan_to_num(1.0), f1.nan_to_num(1.0)
        total = matrix.sum()
        return {
            "oa": (true_positive.sum() / total).item() if total > 0 else math.nan,
            "miou": iou.nanmean().item(),
            "mf1": f1.nanmean().item(),
            "iou": iou.tolist(),
            "f1": f1.tolist(),
            "precision": ratio(true_positive, predicted).tolist(),
            "recall": ratio(true_positive, actual).tolist(),
            "miou_ref": iou_ref.mean().item(),
            "mf1_ref": f1_ref.mean().item(),
            "iou_ref": iou_ref.tolist(),
            "f1_ref": f1_ref.tolist(),
            "matrix": self.matrix.detach().cpu().clone(),
        }
