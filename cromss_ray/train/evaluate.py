"""Scores of a registered model on a downstream test split: ``cromss evaluate`` (spec 11).

Every tile of the shards is predicted whole (tiled and blended above ``tile`` pixels,
:mod:`cromss_ray.predict`) and all tiles go into one confusion matrix, ignored pixels
(the shards' no-data value) left out: overall accuracy, per-class IoU, F1, precision and
recall, and their unweighted means mIoU and mF1. Runs in this process (on a GPU when
there is one); no Ray cluster is needed.

:func:`score_tiles` is the scoring itself; a transfer run scores its test split with it
too (each worker its share of the tiles, :mod:`cromss_ray.train.finetune`), so the test
scores a run registers are the ones ``cromss evaluate`` prints for its model and test shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cromss_ray.data.schema import ShardMetadata
from cromss_ray.data.storage import TileSet, scan_shards
from cromss_ray.data.transforms import band_indices
from cromss_ray.method import ConfusionMatrix
from cromss_ray.predict import DEFAULT_BATCH_SIZE, Branch, Segmenter, predict_array
from cromss_ray.tracking.finetuned import DATASET_NAMES, DEFAULT_TILE, load_segmenter, scaling_of

SUMMARY_SCORES = ("oa", "miou", "mf1")
CLASS_SCORES = ("iou", "f1", "precision", "recall")
MIN_PROBABILITY = 1e-12
"""Floor of a predicted probability in the cross-entropy of :class:`TileScores` (log 0 is infinite)."""


@dataclass
class TileScores:
    """What :func:`score_tiles` accumulates: the confusion matrix, the cross-entropy sum over labelled
    pixels, their count, the tiles scored and the first tile's model input ``(1, bands, H, W)``."""

    matrix: ConfusionMatrix
    loss_sum: float = 0.0
    pixels: int = 0
    tiles: int = 0
    example: np.ndarray | None = None


def check_tiles(segmenter: Segmenter, meta: ShardMetadata, data_uri: str, model_uri: str) -> None:
    """Shards can be scored by ``segmenter``: downstream tiles (one date per row) of its classes; a
    ValueError names the mismatch."""
    if meta.seasons != 1:
        raise ValueError(
            f"{data_uri}: {meta.kind} shards hold {meta.seasons} dates per row; evaluation takes downstream tiles"
        )
    if tuple(meta.classes) != segmenter.class_names:
        raise ValueError(
            f"{data_uri}: the shards' classes {list(meta.classes)} are not the {len(segmenter.class_names)} "
            f"classes {model_uri} predicts {list(segmenter.class_names)}"
        )


@torch.no_grad()
def score_tiles(
    segmenter: Segmenter,
    rows: Iterable[dict[str, Any]],
    meta: ShardMetadata,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TileScores:
    """Predict every row (a decoded downstream tile) whole and score it against its label.

    Stored values are scaled as ``meta`` declares and cut to the segmenter's S2 band
    subset (spec 9); each tile is predicted by :func:`~cromss_ray.predict.predict_array`
    (tiled and blended above ``tile`` pixels). The confusion matrix lies on the
    segmenter's device, ready for an all-reduce over workers.
    """
    bands = band_indices(meta, segmenter.s2_bands)
    scaling = scaling_of(meta)
    scores = TileScores(ConfusionMatrix(meta.num_classes, meta.nodata, segmenter.device))
    for row in rows:
        inputs = {
            modality: scaling[modality].apply(row[modality][bands] if modality == "s2" else row[modality])
            for modality in segmenter.modalities
        }
        prediction = predict_array(segmenter, **inputs, tile=tile, overlap=overlap, batch_size=batch_size)
        label = torch.from_numpy(row["label"].astype(np.int64))
        scores.matrix.update(torch.from_numpy(prediction.classes), label)
        labelled = label != meta.nodata
        probabilities = torch.from_numpy(prediction.probabilities)
        picked = probabilities.gather(0, label.clamp(0, meta.num_classes - 1)[None])[0][labelled]
        scores.loss_sum += float(-picked.double().clamp_min(MIN_PROBABILITY).log().sum())
        scores.pixels += int(labelled.sum())
        scores.tiles += 1
        if scores.example is None:
            scores.example = inputs[segmenter.modalities[-1]][None]
    return scores


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

    def metrics(self, split: str = "test") -> dict[str, float]:
        """``<split>/<branch>/oa``, ``miou`` and ``mf1``, as a transfer run logs them."""
        return {f"{split}/{self.branch}/{name}": float(self.scores[name]) for name in SUMMARY_SCORES}

    @property
    def labelled_pixels(self) -> int:
        return int(self.scores["matrix"].sum())


def evaluate_model(
    model_uri: str,
    data_uri: str,
    *,
    branch: Branch | None = None,
    tracking_uri: str | None = None,
    s3_endpoint: str | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
) -> EvaluationResult:
    """Score ``model_uri`` (fine-tuned, or pretrained with ``branch`` or fused) on the shards at ``data_uri``.

    The shards must be downstream tiles (one date per row) of the model's classes;
    their stored values are scaled as their metadata declares and cut to the model's
    S2 band subset (spec 9). A ValueError names the mismatch.
    """
    segmenter = load_segmenter(model_uri, branch=branch, tracking_uri=tracking_uri)
    segmenter.network.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    tiles = TileSet(scan_shards(data_uri, s3_endpoint))
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
        f"{result.labelled_pixels} labelled pixels",
        "",
        header,
        "-" * len(header),
    ]
    for index, name in enumerate(result.class_names):
        cells = "  ".join(f"{_percent(scores[score][index]):>9}" for score in CLASS_SCORES)
        lines.append(f"{name:<{width}}  {cells}")
    lines.append("-" * len(header))
    lines.append(f"OA {_percent(scores['oa'])}  mIoU {_percent(scores['miou'])}  mF1 {_percent(scores['mf1'])}  (%)")
    return "\n".join(lines)
