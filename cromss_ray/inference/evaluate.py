"""Scores of a registered model on a downstream test split: ``cromss evaluate`` (spec 11).

The model is pulled from the registry and every tile of the shards scored whole by
:func:`~cromss_ray.models.scoring.score_tiles` (tiled and blended above ``tile`` pixels),
all tiles in one confusion matrix, ignored pixels (the shards' no-data value) left out:
overall accuracy, per-class IoU, F1, precision and recall, and their unweighted means
mIoU and mF1, and beside them mIoU and mF1 in the reference's convention (spec 11). Runs in this process (on a GPU when there is one); no Ray cluster is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from cromss_ray.data.schema import DATASET_NAMES
from cromss_ray.data.shards import BadRowPolicy
from cromss_ray.data.storage import TileSet, scan_shards
from cromss_ray.models.scoring import SUMMARY_SCORES, check_tiles, score_tiles
from cromss_ray.models import MODEL_TILE
from cromss_ray.models.segmenter import DEFAULT_BATCH_SIZE, BranchName
from cromss_ray.tracking.registry import load_segmenter

CLASS_SCORES = ("iou", "f1", "precision", "recall")


@dataclass(frozen=True)
class EvaluationResult:
    """The scores of one model on one shard set; ``scores`` is ``ConfusionMatrix.compute()``'s result."""

    model_uri: str
    data_uri: str
    branch: str
    dataset: str
    class_names: tuple[str, ...]
    tiles: int
    scores: dict[str, Any]
    skipped: tuple[str, ...] = ()
    """With ``on_bad_row="skip"``: a message per bad row left out (naming file and id)."""

    def metrics(self, split: str = "test") -> dict[str, float]:
        """``<split>/<branch>/oa``, ``miou``, ``mf1``, ``miou_ref`` and ``mf1_ref``, as a transfer run logs them."""
        return {f"{split}/{self.branch}/{name}": float(self.scores[name]) for name in SUMMARY_SCORES}

    @property
    def labelled_pixels(self) -> int:
        return int(self.scores["matrix"].sum())


def evaluate_model(
    model_uri: str,
    data_uri: str,
    *,
    branch: BranchName | None = None,
    tracking_uri: str | None = None,
    s3_endpoint: str | None = None,
    tile: int = MODEL_TILE,
    overlap: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    allow_incomplete: bool = False,
    on_bad_row: BadRowPolicy = "raise",
) -> EvaluationResult:
    """Score ``model_uri`` (fine-tuned, or pretrained with ``branch`` or fused) on the shards at ``data_uri``.

    The shards must be downstream tiles (one date per row) of the model's classes;
    their stored values are scaled as their metadata declares and cut to the model's
    S2 band subset (spec 9). A ValueError names the mismatch. The shards are checked as
    training checks them (``data.allow_incomplete``, ``data.on_bad_row``): before the
    model is pulled, their manifest must vouch for them unless ``allow_incomplete``; a bad
    row raises naming file and row, or with ``on_bad_row="skip"`` is left out and listed
    in the result's ``skipped``.
    """
    skipped: list[str] = []
    shards = scan_shards(data_uri, s3_endpoint, allow_incomplete=allow_incomplete)
    tiles = TileSet(shards, on_bad_row=on_bad_row, skipped=skipped.extend)
    segmenter = load_segmenter(model_uri, branch=branch, tracking_uri=tracking_uri)
    segmenter.network.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    check_tiles(segmenter, tiles.meta, data_uri, model_uri)
    scores = score_tiles(segmenter, tiles.rows(), tiles.meta, tile=tile, overlap=overlap, batch_size=batch_size)
    return EvaluationResult(
        model_uri=model_uri,
        data_uri=data_uri,
        branch=segmenter.branch,
        dataset=tiles.meta.kind,
        class_names=segmenter.class_names,
        tiles=scores.tiles,
        scores=scores.matrix.compute(),
        skipped=tuple(skipped),
    )


def _percent(value: float) -> str:
    return f"{100 * value:.2f}" if math.isfinite(value) else "-"


def format_evaluation(result: EvaluationResult) -> str:
    """The scores as a text table: one row per class, then the means and the overall accuracy (in %)."""
    scores = result.scores
    width = max(len("class"), *(len(name) for name in result.class_names))
    header = f"{'class':<{width}}  " + "  ".join(f"{name:>9}" for name in CLASS_SCORES)
    lines = [
        f"model  {result.model_uri} ({result.branch} prediction)",
        f"data   {result.data_uri}: {DATASET_NAMES[result.dataset]}, {result.tiles} tiles, "
        f"{result.labelled_pixels} labelled pixels"
        + (f", {len(result.skipped)} bad row{'s' * (len(result.skipped) > 1)} skipped" if result.skipped else ""),
        "",
        header,
        "-" * len(header),
    ]
    for index, name in enumerate(result.class_names):
        cells = "  ".join(f"{_percent(scores[score][index]):>9}" for score in CLASS_SCORES)
        lines.append(f"{name:<{width}}  {cells}")
    lines.append("-" * len(header))
    lines.append(f"OA {_percent(scores['oa'])}  mIoU {_percent(scores['miou'])}  mF1 {_percent(scores['mf1'])}  (%)")
    lines.append(
        f"reference convention (a class absent from the truth and never predicted scores 100): "
        f"mIoU {_percent(scores['miou_ref'])}  mF1 {_percent(scores['mf1_ref'])}  (%)"
    )
    return "\n".join(lines)
