"""Whole-tile scoring: every tile predicted by the segmenter and counted in one confusion matrix (spec 11).

``cromss evaluate`` (:mod:`cromss_ray.inference.evaluate`) and a transfer run's test split
(:mod:`cromss_ray.train.finetune`, each worker its share of the tiles) both score with
:func:`score_tiles`, so a run's registered test scores are the ones ``cromss evaluate``
prints for its model and test shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from cromss_ray.data.schema import ShardMetadata
from cromss_ray.data.transforms import band_indices
from cromss_ray.method import ConfusionMatrix
from cromss_ray.models import MODEL_TILE
from cromss_ray.models.segmenter import DEFAULT_BATCH_SIZE, Segmenter, predict_array

SUMMARY_SCORES = ("oa", "miou", "mf1", "miou_ref", "mf1_ref")
"""The whole-set scores a transfer run logs and ``cromss evaluate`` reports (``ConfusionMatrix.compute`` keys):
``_ref`` in the reference's convention (spec 11)."""
MIN_PROBABILITY = 1e-12
"""Floor of a predicted probability in the cross-entropy of :class:`TileScores` (log 0 is infinite)."""


@dataclass
class TileScores:
    """What :func:`score_tiles` accumulates: the confusion matrix, the cross-entropy sum over labelled
    pixels, their count, the tiles scored and the first tile's stored image ``(1, bands, H, W)`` float32
    (the segmenter's bands, as its registered model takes them)."""

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
    tile: int = MODEL_TILE,
    overlap: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TileScores:
    """Predict every row (a decoded downstream tile) whole and score it against its label.

    The stored images are cut to the segmenter's S2 band subset and made model inputs by
    the rule of spec 9 as ``meta`` declares their storage, the same inputs the training
    batches give (:func:`~cromss_ray.data.device.to_device`); each tile is predicted by
    :func:`~cromss_ray.models.segmenter.predict_array` (tiled and blended above ``tile``
    pixels). The confusion matrix lies on the segmenter's device, ready for an all-reduce
    over workers.
    """
    bands = band_indices(meta, segmenter.s2_bands)
    segmenter = replace(segmenter, inputs={"s1": meta.s1, "s2": meta.s2})
    scores = TileScores(ConfusionMatrix(meta.num_classes, meta.nodata, segmenter.device))
    for row in rows:
        images = {
            modality: row[modality][bands] if modality == "s2" else row[modality] for modality in segmenter.modalities
        }
        prediction = predict_array(
            segmenter, **images, tile=tile, overlap=overlap, batch_size=batch_size, stored=True
        )
        label = torch.from_numpy(row["label"].astype(np.int64))
        scores.matrix.update(torch.from_numpy(prediction.classes), label)
        labelled = label != meta.nodata
        probabilities = torch.from_numpy(prediction.probabilities)
        picked = probabilities.gather(0, label.clamp(0, meta.num_classes - 1)[None])[0][labelled]
        scores.loss_sum += float(-picked.double().clamp_min(MIN_PROBABILITY).log().sum())
        scores.pixels += int(labelled.sum())
        scores.tiles += 1
        if scores.example is None:
            scores.example = images[segmenter.modalities[-1]][None].astype(np.float32)
    return scores
