"""The CromSS training objective: weighted segmentation terms plus cross-modal consistency (spec 8),
and the objective of the single-modality baseline (spec 11): the same segmentation terms, unweighted and unsmoothed.

The term functions take log-probabilities ``(N, C, H, W)`` (one log-softmax per
modality serves every term), soft targets ``(N, C, H, W)`` and per-pixel weights
``(N, H, W)``. Every weighted mean is ``sum(w * l) / sum(w)`` and is 0 when all
weights are 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cromss_ray.method.confidence import (
    CONFIDENCE_KINDS,
    ConfidenceKind,
    entangle,
    label_confidence,
    prediction_confidence,
)
from cromss_ray.method.schedules import RAMP_KINDS, RampKind, selection_ratio
from cromss_ray.method.selection import consistency_weights, selection_weights
from cromss_ray.method.smoothing import smoothed_target

ConsistencyKind = Literal["ce", "kl", "mse", "none"]
CONSISTENCY_KINDS: tuple[str, ...] = ("ce", "kl", "mse", "none")
LOSS_TERM_NAMES: dict[str, str] = {"c": "ce", "d": "dice", "f": "focal"}
DICE_EPS = 1e-7
MODALITIES: tuple[str, str] = ("s1", "s2")


class SelectionMaps(NamedTuple):
    """Per-pixel maps ``(N, H, W)`` of one step, per modality of the network ((s1, s2) for CromSS):
    the entangled label confidences ``c^_lbl`` (spec 4), i.e. the trust in each noisy label, and
    the segmentation weights ``w`` computed from them (spec 6; 1 everywhere labelled when
    selection is off). The single-modality baseline has one branch: its trust is its own label
    confidence ``p_y`` (spec 3), its weights 1 everywhere labelled."""

    trust: tuple[torch.Tensor, ...]
    weights: tuple[torch.Tensor, ...]


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * l) / sum(w)``, and 0 when every weight is 0."""
    total = weights.sum()
    return (values * weights).sum() / torch.where(total > 0, total, 1.0)


def _class_sum_dims(tensor: torch.Tensor) -> list[int]:
    """All axes of an ``(N, C, ...)`` tensor except the class axis."""
    return [0, *range(2, tensor.dim())]


def weighted_cross_entropy(log_probs: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``L_ce = sum(w * CE) / sum(w)`` with ``CE = -sum_c q_c log p_c`` per pixel (spec 8)."""
    return _weighted_mean(-(target * log_probs).sum(dim=1), weights)


def weighted_focal(
    log_probs: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, gamma: float = 2.0
) -> torch.Tensor:
    """Weighted focal loss ``sum(w * FL) / sum(w)``, ``FL = -sum_c q_c (1 - p_c)^gamma log p_c`` (spec 8 'f').

    The spec names the focal term without a formula; this is the softmax focal loss of
    Lin et al. extended to soft targets, which equals the cross-entropy at gamma = 0.
    """
    focal = (1.0 - log_probs.exp()).pow(gamma)
    return _weighted_mean(-(target * focal * log_probs).sum(dim=1), weights)


def weighted_dice(probs: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted multiclass soft Dice loss (spec 8).

    For each class c, ``I_c = sum w p_c t_c`` and ``U_c = sum w (p_c + t_c)`` over batch and
    pixels; ``loss_c = 1 - 2 I_c / max(U_c, 1e-7)``, set to 0 when the class's target
    mass ``sum t_c`` is 0; the result is the mean over all C classes.
    """
    dims = _class_sum_dims(probs)
    pixel_weights = weights.unsqueeze(1)
    intersection = (pixel_weights * probs * target).sum(dim=dims)
    cardinality = (pixel_weights * (probs + target)).sum(dim=dims)
    dice = 2.0 * intersection / cardinality.clamp_min(DICE_EPS)
    present = target.sum(dim=dims) > 0
    return ((1.0 - dice) * present).mean()


SegmentationLossKind = Literal["ce", "dice", "ce+dice", "focal"]
SEGMENTATION_LOSS_KINDS: tuple[str, ...] = ("ce", "dice", "ce+dice", "focal")


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: SegmentationLossKind = "ce",
    ignore_index: int = 255,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """The loss of a transfer step on hard labels (spec 11): spec 8's terms with one-hot targets.

    ``logits`` (N, C, H, W) and ``labels`` (N, H, W). Pixels labelled ``ignore_index`` (or
    outside ``0 .. C-1``) have weight 0, so they leave both the cross-entropy mean and the
    Dice sums (prediction and target alike). 'ce' is the mean cross-entropy over labelled
    pixels; 'dice' the soft Dice of spec 8 over all C classes (a class absent from the
    batch's labels scores loss 0 and still counts in the mean); 'ce+dice' their sum (the
    reference recipe); 'focal' the softmax focal loss of :func:`weighted_focal`.
    """
    if kind not in SEGMENTATION_LOSS_KINDS:
        raise ValueError(f"segmentation loss must be one of {SEGMENTATION_LOSS_KINDS}, got {kind!r}")
    classes = logits.shape[1]
    labels = labels.long()
    labelled = (labels != ignore_index) & (labels >= 0) & (labels < classes)
    weights = labelled.to(logits.dtype)
    target = F.one_hot(torch.where(labelled, labels, 0), classes).movedim(-1, 1).to(logits.dtype)
    log_probs = F.log_softmax(logits, dim=1)
    if kind == "focal":
        return weighted_focal(log_probs, target, weights, focal_gamma)
    loss = logits.new_zeros(())
    if kind in ("ce", "ce+dice"):
        loss = loss + weighted_cross_entropy(log_probs, target, weights)
    if kind in ("dice", "ce+dice"):
        loss = loss + weighted_dice(log_probs.exp(), target, weights)
    return loss


def consistency_loss(
    log_p1: torch.Tensor,
    log_p2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    kind: ConsistencyKind = "ce",
) -> torch.Tensor:
    """Cross-modal consistency ``sum(l_12 v_2) / sum(v_2) + sum(l_21 v_1) / sum(v_1)`` (spec 8).

    ``l_12`` makes modality 1 learn from modality 2's detached prediction, weighted by
    modality 2's confidence, and vice versa. Per pixel, summed over classes:
    'ce' ``-sum_c p2_c log p1_c``; 'kl' ``sum_c p2_c (log p2_c - log p1_c)``;
    'mse' ``sum_c (p1_c - p2_c)^2``; 'none' gives 0.
    """
    if kind not in CONSISTENCY_KINDS:
        raise ValueError(f"consistency kind must be one of {CONSISTENCY_KINDS}, got {kind!r}")
    if kind == "none":
        return log_p1.new_zeros(())

    def towards(log_student: torch.Tensor, log_teacher: torch.Tensor) -> torch.Tensor:
        log_teacher = log_teacher.detach()
        teacher = log_teacher.exp()
        if kind == "ce":
            return -(teacher * log_student).sum(dim=1)
        if kind == "kl":
            return (teacher * (log_teacher - log_student)).sum(dim=1)
        return (log_student.exp() - teacher).square().sum(dim=1)

    return _weighted_mean(towards(log_p1, log_p2), v2) + _weighted_mean(towards(log_p2, log_p1), v1)


class _SegmentationObjective(nn.Module):
    """What both pretraining objectives share: excluded labels, the segmentation terms of spec 8
    and the confidence diagnostics of spec 3."""

    def __init__(
        self, loss_terms: str, confidence: ConfidenceKind, classes: int, ignore_index: int, focal_gamma: float
    ) -> None:
        super().__init__()
        if not loss_terms or set(loss_terms) - set(LOSS_TERM_NAMES):
            raise ValueError(f"loss_terms must combine 'c', 'd', 'f', got {loss_terms!r}")
        if confidence not in CONFIDENCE_KINDS:
            raise ValueError(f"confidence must be one of {CONFIDENCE_KINDS}, got {confidence!r}")
        if classes < 2:
            raise ValueError(f"need classes >= 2, got {classes}")
        self.loss_terms = "".join(dict.fromkeys(loss_terms))
        self.confidence = confidence
        self.classes = classes
        self.ignore_index = ignore_index
        self.focal_gamma = float(focal_gamma)

    def _clean_labels(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels as int64 with every excluded pixel set to -1, and the labelled mask."""
        y = y.long()
        labelled = (y != self.ignore_index) & (y >= 0) & (y < self.classes)
        return torch.where(labelled, y, -1), labelled

    def _segmentation_terms(
        self, name: str, log_p: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sum of one branch's segmentation terms (spec 8) and each, detached, as ``loss/<term>/<name>``."""
        total = log_p.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for term in self.loss_terms:
            if term == "c":
                value = weighted_cross_entropy(log_p, targets, weights)
            elif term == "d":
                value = weighted_dice(log_p.exp(), targets, weights)
            else:
                value = weighted_focal(log_p, targets, weights, self.focal_gamma)
            terms[f"loss/{LOSS_TERM_NAMES[term]}/{name}"] = value.detach()
            total = total + value
        return total, terms

    @torch.no_grad()
    def _confidences(
        self, name: str, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One branch's prediction and label confidences (spec 3) and their means over the labelled pixels
        (``<name>/confidence_pred``, ``<name>/confidence_label``)."""
        pred, lbl = prediction_confidence(logits, self.confidence), label_confidence(logits, y)
        count = mask.sum().clamp_min(1.0)
        means = {
            f"{name}/confidence_pred": (pred * mask).sum() / count,
            f"{name}/confidence_label": (lbl * mask).sum() / count,
        }
        return pred, lbl, means


class CromSSLoss(_SegmentationObjective):
    """The CromSS objective ``L = sum_m (segmentation terms of m) + lambda L_con`` (spec 2-8).

    Args:
        loss_terms: segmentation terms, any combination of 'c' (cross-entropy),
            'd' (Dice), 'f' (focal); reference 'cd'.
        consistency: 'ce' (reference), 'kl', 'mse' or 'none'.
        consistency_weight: lambda.
        smoothing_factors: () for none, (a,) or (a, b) (spec 2; reference (0.15, 0.05)).
            Without the ``prior`` argument of :meth:`forward` the prior is uniform.
        selection: cross-modal sample selection on (spec 6-7); off means w = v = 1.
        final_ratio: rho_final of the selection-ratio schedule.
        ramp: ramp kind 'exp', 'linear' or 'none'; ramp_length: E in epochs.
        confidence: prediction-confidence kind 'ce' or 'gini'.
        class_balanced: one threshold per class (reference) or one for all pixels.
        classes: C; ignore_index: label excluded from every term (weight 0). Any label
            outside ``0 .. C-1`` is excluded as well.
        focal_gamma: exponent of the focal term.

    ``loss(z1, z2, y, prior=None, epoch=0)`` returns ``(loss, diagnostics)``. The
    diagnostics are detached 0-d tensors on the logits' device (convert with ``float()``
    only when logging: each conversion waits for the device): ``loss/<term>/<s1|s2>`` for term in ce, dice, focal;
    ``loss/consistency`` (unless 'none'); ``selection/ratio`` (rho of this epoch, 1 when
    selection is off); per modality ``<m>/selected_share`` (share of labelled pixels at
    full segmentation weight), ``<m>/weight_mean`` (mean segmentation weight),
    ``<m>/confidence_pred`` and ``<m>/confidence_label`` (mean raw, not entangled,
    confidences over labelled pixels). :meth:`forward_with_selection` also returns the
    step's per-pixel trust and weight maps (for :class:`~cromss_ray.method.diagnostics.NoiseDiagnostics`),
    :meth:`evaluate` gives the validation loss and :meth:`selection_maps` the per-pixel
    trust and weight maps alone (for validation).
    """

    def __init__(
        self,
        loss_terms: str = "cd",
        consistency: ConsistencyKind = "ce",
        consistency_weight: float = 1.0,
        smoothing_factors: Sequence[float] = (0.15, 0.05),
        selection: bool = True,
        final_ratio: float = 0.5,
        ramp: RampKind = "exp",
        ramp_length: int = 80,
        confidence: ConfidenceKind = "ce",
        class_balanced: bool = True,
        classes: int = 9,
        ignore_index: int = 255,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__(loss_terms, confidence, classes, ignore_index, focal_gamma)
        if consistency not in CONSISTENCY_KINDS:
            raise ValueError(f"consistency must be one of {CONSISTENCY_KINDS}, got {consistency!r}")
        if ramp not in RAMP_KINDS:
            raise ValueError(f"ramp must be one of {RAMP_KINDS}, got {ramp!r}")
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final_ratio must lie in [0, 1], got {final_ratio}")
        if ramp_length < 0 or consistency_weight < 0:
            raise ValueError(
                f"need ramp_length >= 0 and consistency_weight >= 0, got {ramp_length}, {consistency_weight}"
            )
        factors = tuple(float(f) for f in smoothing_factors)
        if len(factors) > 2 or any(f < 0 for f in factors) or sum(factors) > 1:
            raise ValueError(f"smoothing_factors takes at most two non-negative factors summing to <= 1, got {factors}")
        self.consistency = consistency
        self.consistency_weight = float(consistency_weight)
        self.smoothing_factors = factors
        self.selection = selection
        self.final_ratio = float(final_ratio)
        self.ramp = ramp
        self.ramp_length = int(ramp_length)
        self.class_balanced = class_balanced

    @torch.no_grad()
    def _weights(
        self, logits: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, labelled: torch.Tensor, epoch: int
    ) -> tuple[SelectionMaps, list[torch.Tensor], dict[str, torch.Tensor]]:
        """Trust and segmentation weights w_m, consistency weights v_m and their diagnostics (spec 3-7)."""
        mask = labelled.float()
        count = mask.sum().clamp_min(1.0)
        pred_conf, label_conf, diagnostics = [], [], {}
        for name, z in zip(MODALITIES, logits):
            pred, lbl, means = self._confidences(name, z, y, mask)
            pred_conf.append(pred)
            label_conf.append(lbl)
            diagnostics.update(means)
        trust = entangle(*label_conf)
        if self.selection:
            ratio = selection_ratio(epoch, self.ramp_length, self.final_ratio, self.ramp)
            s1, s2 = (selection_weights(c, y, ratio, self.classes, self.class_balanced) for c in trust)
            con = [consistency_weights(c, epoch, self.ramp_length, self.ramp) * mask for c in entangle(*pred_conf)]
        else:
            ratio, (s1, s2), con = 1.0, (mask, mask), [mask, mask]
        diagnostics["selection/ratio"] = mask.new_tensor(ratio)
        for name, weights in zip(MODALITIES, (s1, s2)):
            diagnostics[f"{name}/selected_share"] = ((weights >= 1.0) & labelled).sum() / count
            diagnostics[f"{name}/weight_mean"] = weights.sum() / count
        return SelectionMaps(trust, (s1, s2)), con, diagnostics

    def _objective(
        self,
        logits: tuple[torch.Tensor, torch.Tensor],
        targets: torch.Tensor,
        seg_weights: Sequence[torch.Tensor],
        con_weights: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its detached terms for given targets and weights (spec 8)."""
        log_probs = [F.log_softmax(z, dim=1) for z in logits]
        total = log_probs[0].new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for name, log_p, weights in zip(MODALITIES, log_probs, seg_weights):
            value, branch_terms = self._segmentation_terms(name, log_p, targets, weights)
            terms.update(branch_terms)
            total = total + value
        if self.consistency != "none":
            value = consistency_loss(log_probs[0], log_probs[1], con_weights[0], con_weights[1], self.consistency)
            terms["loss/consistency"] = value.detach()
            total = total + self.consistency_weight * value
        return total, terms

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        y: torch.Tensor,
        prior: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for logits ``z1``, ``z2`` ``(N, C, H, W)``, labels ``y`` ``(N, H, W)``.

        ``prior`` ``(N, C, H, W)`` is the smoothing prior (None: uniform, prior
        type 'none'); ``epoch`` is the zero-based epoch of the schedules (spec 5-8).
        """
        loss, diagnostics, _ = self.forward_with_selection(z1, z2, y, prior, epoch)
        return loss, diagnostics

    def forward_with_selection(
        self, z1: torch.Tensor, z2: torch.Tensor, y: torch.Tensor, prior: torch.Tensor | None = None, epoch: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], SelectionMaps]:
        """:meth:`forward` and the trust and weight maps it computed on the way (no extra work)."""
        logits = (z1.float(), z2.float())
        y, labelled = self._clean_labels(y)
        maps, con, diagnostics = self._weights(logits, y, labelled, epoch)
        targets = smoothed_target(y, prior, self.smoothing_factors, self.classes)
        loss, terms = self._objective(logits, targets, maps.weights, con)
        return loss, {**terms, **diagnostics}, maps

    def evaluate(
        self, z1: torch.Tensor, z2: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Validation loss: the same terms, unweighted (w = v = 1) and unsmoothed (spec 8).

        Returns ``(loss, diagnostics)`` with the ``loss/...`` keys of :meth:`forward`.
        """
        logits = (z1.float(), z2.float())
        y, labelled = self._clean_labels(y)
        mask = labelled.float()
        return self._objective(logits, smoothed_target(y, None, (), self.classes), [mask, mask], [mask, mask])

    @torch.no_grad()
    def selection_maps(self, z1: torch.Tensor, z2: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> SelectionMaps:
        """The per-pixel trust and segmentation weights that :meth:`forward` would use at ``epoch`` (spec 4, 6).

        For validation (figures, noise diagnostics): a weight of 1 is full weight, 0
        excluded (also every unlabelled pixel); nothing else of the loss is computed.
        """
        logits = (z1.float(), z2.float())
        y, labelled = self._clean_labels(y)
        maps, _, _ = self._weights(logits, y, labelled, epoch)
        return maps


class SingleModalityLoss(_SegmentationObjective):
    """The objective of the single-modality baseline (spec 11): spec 8's segmentation terms of one branch
    on the one-hot noisy labels, every labelled pixel at weight 1 (no selection, no smoothing, no
    consistency), as the reference's baseline trains.

    The methods mirror :class:`CromSSLoss` with one logits tensor ``z`` for the two, so a
    trainer calls either objective alike (their ``prior`` and ``epoch`` change nothing here).
    Diagnostics: ``loss/<term>/<modality>``, ``selection/ratio`` (1), and for the modality
    ``selected_share`` and ``weight_mean`` (1 whenever a pixel is labelled), ``confidence_pred``
    and ``confidence_label``. The trust of :meth:`selection_maps` is the branch's own label
    confidence ``p_y``: there is no second modality to entangle it with (spec 4).
    """

    def __init__(
        self,
        modality: str = "s2",
        loss_terms: str = "cd",
        confidence: ConfidenceKind = "ce",
        classes: int = 9,
        ignore_index: int = 255,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__(loss_terms, confidence, classes, ignore_index, focal_gamma)
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.modality = modality

    def forward(
        self, z: torch.Tensor, y: torch.Tensor, prior: torch.Tensor | None = None, epoch: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for logits ``z`` ``(N, C, H, W)`` and labels ``y`` ``(N, H, W)``."""
        loss, diagnostics, _ = self.forward_with_selection(z, y, prior, epoch)
        return loss, diagnostics

    def forward_with_selection(
        self, z: torch.Tensor, y: torch.Tensor, prior: torch.Tensor | None = None, epoch: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], SelectionMaps]:
        """:meth:`forward` and the branch's trust and weight maps."""
        z = z.float()
        y, labelled = self._clean_labels(y)
        mask = labelled.float()
        _, trust, diagnostics = self._confidences(self.modality, z, y, mask)
        full_weight = mask.sum() / mask.sum().clamp_min(1.0)
        diagnostics["selection/ratio"] = mask.new_tensor(1.0)
        diagnostics[f"{self.modality}/selected_share"] = full_weight
        diagnostics[f"{self.modality}/weight_mean"] = full_weight
        loss, terms = self.evaluate(z, y)
        return loss, {**terms, **diagnostics}, SelectionMaps((trust,), (mask,))

    def evaluate(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Validation loss: the training loss itself, which is already unweighted and unsmoothed (spec 8)."""
        y, labelled = self._clean_labels(y)
        targets = smoothed_target(y, None, (), self.classes)
        return self._segmentation_terms(self.modality, F.log_softmax(z.float(), dim=1), targets, labelled.float())

    @torch.no_grad()
    def selection_maps(self, z: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> SelectionMaps:
        """The branch's trust (its label confidence) and weights (1 where labelled) (spec 3)."""
        y, labelled = self._clean_labels(y)
        return SelectionMaps((label_confidence(z.float(), y),), (labelled.float(),))
