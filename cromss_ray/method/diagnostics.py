"""How well sample selection tells wrong labels from right ones, where the clean labels are known (spec 4, 6).

With synthetic data the clean label of every pixel is known, so the segmentation
weights ``w`` of spec 6 and the trust score they come from (the entangled label
confidence ``c^_lbl`` of spec 4) can be scored as detectors of "this noisy label is
wrong". :class:`NoiseDiagnostics` accumulates one branch's evidence batch by batch on
the batch's device, without waiting for it, in sums that add up across batches and
workers; :meth:`NoiseDiagnostics.compute` reads, once per epoch:

* ``selected_precision``: ``sum(w [noisy == clean]) / sum(w)``, the share of selection
  weight on pixels whose noisy label is right;
* ``noise_recall``: the share of corrupted pixels (noisy != clean) with ``w == 0``;
* ``noise_auroc``: the AUROC of the trust score as a detector of corrupted pixels (low
  trust = corrupted), a tie counting 1/2;
* ``base_rate``: the share of right noisy labels (the precision of selecting at random).

Exactness of ``noise_auroc``: the trust score is binned on the dyadic grid
``b = floor(t * 2^bits)`` (``t = 1`` joins the top bin). ``t * 2^bits`` and its floor are
exact in floating point, so the bin of a pixel does not depend on the batch, the device
or the order of accumulation, and the epoch's AUROC equals the AUROC over all its
pixels (e.g. sklearn's ``roc_auc_score``) of the score ``b``, computed in exact integer
arithmetic. It equals the AUROC of ``t`` itself whenever no bin holds both a corrupted
and a right pixel with different trust (in particular when every trust is a multiple of
``2^-bits`` below 1: 1 shares the top bin with ``1 - 2^-bits``); in general the two
differ by at most ``noise_auroc_bin_bound``, which :meth:`compute` reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

TRUST_BITS = 16
"""Default resolution of the trust score's histogram: 2^16 bins of width 1.5e-5 (1 MiB of counts)."""


class NoiseDiagnostics:
    """Epoch evidence of one branch's sample selection against the clean labels (module docstring).

    ``update(noisy, clean, weights, trust)`` per batch; the state (:attr:`state`) is three
    tensors on ``device``: ``trust_histogram`` ``(2^bits, 2)`` int64 (pixels per trust bin,
    column 0 right labels, column 1 corrupted), ``zero_weight_corrupted`` int64 and
    ``weight_sums`` float64 ``[sum(w), sum(w [noisy == clean])]``. Sum it across workers
    with :meth:`all_reduce` or add another accumulator with :meth:`merge`; the counts add
    exactly. A pixel counts when both its noisy and its clean label lie in
    ``0 .. classes-1`` and differ from ``ignore_index``.
    """

    def __init__(
        self,
        classes: int,
        ignore_index: int | None = 255,
        device: torch.device | str = "cpu",
        bits: int = TRUST_BITS,
    ) -> None:
        if classes < 1:
            raise ValueError(f"classes must be at least 1, got {classes}")
        if not 1 <= bits <= 24:
            raise ValueError(f"bits must lie in 1 .. 24, got {bits}")
        self.classes = classes
        self.ignore_index = ignore_index
        self.bits = bits
        self.trust_histogram = torch.zeros(2**bits, 2, dtype=torch.int64, device=device)
        self.zero_weight_corrupted = torch.zeros((), dtype=torch.int64, device=device)
        self.weight_sums = torch.zeros(2, dtype=torch.float64, device=device)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The accumulated sums by name (the tensors themselves, not copies)."""
        return {
            "trust_histogram": self.trust_histogram,
            "zero_weight_corrupted": self.zero_weight_corrupted,
            "weight_sums": self.weight_sums,
        }

    def _labelled(self, labels: torch.Tensor) -> torch.Tensor:
        inside = (labels >= 0) & (labels < self.classes)
        return inside if self.ignore_index is None else inside & (labels != self.ignore_index)

    def trust_bins(self, trust: torch.Tensor) -> torch.Tensor:
        """``floor(t * 2^bits)`` of the trust clamped to [0, 1] (NaN as 0), with ``t = 1`` in the top bin."""
        scaled = torch.nan_to_num(trust.to(torch.float64), nan=0.0).clamp(0.0, 1.0) * 2**self.bits
        return scaled.floor().long().clamp_max(2**self.bits - 1)

    @torch.no_grad()
    def update(self, noisy: torch.Tensor, clean: torch.Tensor, weights: torch.Tensor, trust: torch.Tensor) -> None:
        """Add a batch: noisy and clean labels, segmentation weights and trust scores, all of one shape.

        Runs on the batch's device and queues its work without a host synchronisation;
        the sums move to the accumulator's device (keep both the same to stay asynchronous).
        """
        shapes = {tuple(tensor.shape) for tensor in (noisy, clean, weights, trust)}
        if len(shapes) != 1:
            raise ValueError(
                f"noisy {tuple(noisy.shape)}, clean {tuple(clean.shape)}, weights {tuple(weights.shape)} "
                f"and trust {tuple(trust.shape)} must share one shape"
            )
        noisy, clean = noisy.reshape(-1).long(), clean.reshape(-1).long()
        valid = self._labelled(noisy) & self._labelled(clean)
        corrupted = valid & (noisy != clean)
        weights = weights.reshape(-1).to(torch.float64)
        index = self.trust_bins(trust.reshape(-1)) * 2 + corrupted.long()
        counts = torch.zeros(self.trust_histogram.numel(), dtype=torch.int64, device=noisy.device)
        counts.scatter_add_(0, index, valid.long())
        device = self.trust_histogram.device
        self.trust_histogram += counts.view_as(self.trust_histogram).to(device)
        self.zero_weight_corrupted += (corrupted & (weights == 0)).sum().to(device)
        kept = torch.stack([(weights * valid).sum(), (weights * (valid & ~corrupted)).sum()])
        self.weight_sums += kept.to(device)

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every state tensor by ``reduce(tensor)``, e.g. a sum over Ray Train's DDP ranks.

        ``reduce`` takes and returns a tensor, e.g. ``lambda t: (torch.distributed.all_reduce(t), t)[1]``.
        """
        for name, tensor in self.state.items():
            reduced = reduce(tensor)
            if reduced.shape != tensor.shape:
                raise ValueError(
                    f"all-reduce of {name} returned shape {tuple(reduced.shape)}, expected {tuple(tensor.shape)}"
                )
            setattr(self, name, reduced.to(device=tensor.device, dtype=tensor.dtype))

    def merge(self, other: NoiseDiagnostics) -> None:
        """Add another accumulator's sums; both must count the same classes on the same trust grid."""
        if (other.classes, other.ignore_index, other.bits) != (self.classes, self.ignore_index, self.bits):
            raise ValueError(
                f"cannot merge diagnostics of (classes, ignore_index, bits) = "
                f"{(other.classes, other.ignore_index, other.bits)} into {(self.classes, self.ignore_index, self.bits)}"
            )
        for name, tensor in self.state.items():
            tensor += other.state[name].to(tensor.device)

    def reset(self) -> None:
        """Start over with zero sums (at each epoch's start)."""
        for tensor in self.state.values():
            tensor.zero_()

    def precision_recall(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The precision-recall curve of the trust score as a detector of corrupted pixels, float64 on the CPU.

        Point ``b`` flags every pixel in trust bins ``0 .. b`` as corrupted: its precision is
        the corrupted share of the flagged pixels, its recall the share of all corrupted
        pixels flagged. Only bins holding pixels give points, in increasing trust (so
        increasing recall); empty when no pixel counted or none is corrupted.
        """
        histogram = self.trust_histogram.cpu()
        occupied = histogram.sum(dim=1) > 0
        flagged = histogram.sum(dim=1).cumsum(0)[occupied].to(torch.float64)
        caught = histogram[:, 1].cumsum(0)[occupied].to(torch.float64)
        if flagged.numel() == 0 or caught[-1] == 0:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return caught / flagged, caught / caught[-1]

    def compute(self) -> dict[str, float]:
        """The epoch's figures (module docstring) as floats; one host synchronisation.

        Besides the four scores: ``pixels`` and ``corrupted_pixels`` counted, and
        ``noise_auroc_bin_bound``, the most by which ``noise_auroc`` can differ from the
        AUROC of the unbinned trust. A score whose denominator is 0 is NaN: ``base_rate``
        without pixels, ``selected_precision`` when all weight is 0, ``noise_recall`` when no
        label is corrupted, the AUROC when all labels are right or all are corrupted.
        """
        right, corrupted = (column.tolist() for column in self.trust_histogram.cpu().unbind(dim=1))
        weight_total, weight_right = self.weight_sums.tolist()
        right_total, corrupted_total = sum(right), sum(corrupted)
        pixels = right_total + corrupted_total

        def share(numerator: float, denominator: float) -> float:
            return numerator / denominator if denominator > 0 else math.nan

        # Pairs (corrupted, right) ordered right (corrupted pixel in a lower bin) count 2 halves, tied pairs 1.
        ordered_halves, tied, right_above = 0, 0, right_total
        for right_here, corrupted_here in zip(right, corrupted):
            right_above -= right_here
            ordered_halves += 2 * corrupted_here * right_above
            tied += corrupted_here * right_here
        pairs = 2 * corrupted_total * right_total
        return {
            "selected_precision": share(weight_right, weight_total),
            "noise_recall": share(int(self.zero_weight_corrupted), corrupted_total),
            "noise_auroc": share(ordered_halves + tied, pairs),
            "noise_auroc_bin_bound": share(tied, pairs),
            "base_rate": share(right_total, pixels),
            "pixels": float(pixels),
            "corrupted_pixels": float(corrupted_total),
        }
