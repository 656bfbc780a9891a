"""Confusion-matrix metrics over a whole evaluation set (spec 11)."""

import math

import pytest
import torch

from cromss_ray.method import ConfusionMatrix

NODATA = 255
TARGET = torch.tensor([[0, 0, 1, 1, 2, NODATA]])
PRED = torch.tensor([[0, 1, 1, 1, 0, 2]])


def _filled() -> ConfusionMatrix:
    matrix = ConfusionMatrix(3, ignore_index=NODATA)
    matrix.update(PRED, TARGET)
    return matrix


def test_metrics_by_hand():
    metrics = _filled().compute()
    # rows = target: 0 -> (1, 1, 0), 1 -> (0, 2, 0), 2 -> (1, 0, 0); the ignored pixel is left out
    assert metrics["matrix"].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert metrics["oa"] == pytest.approx(3 / 5)
    # TP (1, 2, 0), FP (1, 1, 0), FN (1, 0, 1)
    assert metrics["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert metrics["f1"] == pytest.approx([2 / 4, 4 / 5, 0.0])
    assert metrics["recall"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert metrics["precision"][:2] == pytest.approx([1 / 2, 2 / 3]) and math.isnan(metrics["precision"][2])
    assert metrics["miou"] == pytest.approx(1 / 3)
    assert metrics["mf1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_a_class_absent_from_target_and_prediction_is_left_out_of_the_means():
    matrix = ConfusionMatrix(4, ignore_index=NODATA)
    matrix.update(PRED, TARGET)
    metrics = matrix.compute()
    assert math.isnan(metrics["iou"][3]) and math.isnan(metrics["f1"][3])
    assert metrics["miou"] == pytest.approx(1 / 3)


def test_logits_are_reduced_by_argmax():
    logits = torch.nn.functional.one_hot(PRED, 3).permute(0, 2, 1).float()
    matrix = ConfusionMatrix(3, ignore_index=NODATA)
    matrix.update(logits, TARGET)
    assert torch.equal(matrix.matrix, _filled().matrix)


def test_batches_accumulate_merge_and_all_reduce():
    split = ConfusionMatrix(3, ignore_index=NODATA)
    split.update(PRED[:, :3], TARGET[:, :3])
    other = ConfusionMatrix(3, ignore_index=NODATA)
    other.update(PRED[:, 3:], TARGET[:, 3:])
    split.merge(other)
    assert torch.equal(split.matrix, _filled().matrix)
    split.all_reduce(lambda counts: counts * 2)  # two ranks with the same counts
    assert split.matrix.sum().item() == 10
    assert split.compute()["miou"] == pytest.approx(1 / 3)
    split.reset()
    assert split.matrix.sum().item() == 0 and math.isnan(split.compute()["oa"])


def test_bad_updates_are_named():
    matrix = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"target values \[255\] lie outside 0 .. 2"):
        matrix.update(PRED, TARGET)
    with pytest.raises(ValueError, match=r"prediction values \[7\]"):
        matrix.update(torch.tensor([7]), torch.tensor([0]))
    with pytest.raises(ValueError, match="differ in shape"):
        matrix.update(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="cannot merge"):
        matrix.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="all-reduce returned shape"):
        matrix.all_reduce(lambda counts: counts.sum())
    assert matrix.matrix.sum().item() == 0
