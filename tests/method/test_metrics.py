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


def test_the_reference_convention_scores_an_absent_class_one_and_averages_over_all_classes():
    matrix = ConfusionMatrix(4, ignore_index=NODATA)
    matrix.update(PRED, TARGET)
    metrics = matrix.compute()
    # class 3 is neither in the target nor predicted: IoU = F1 = 1 (zero_division = 1);
    # the others as in test_metrics_by_hand: IoU (1/3, 2/3, 0), F1 (1/2, 4/5, 0)
    assert metrics["iou_ref"] == pytest.approx([1 / 3, 2 / 3, 0.0, 1.0])
    assert metrics["f1_ref"] == pytest.approx([1 / 2, 4 / 5, 0.0, 1.0])
    # means over all 4 classes: (1/3 + 2/3 + 0 + 1) / 4 = 1/2, (1/2 + 4/5 + 0 + 1) / 4 = 0.575
    assert metrics["miou_ref"] == pytest.approx(1 / 2)
    assert metrics["mf1_ref"] == pytest.approx(0.575)
    # our convention leaves class 3 out: mIoU 1/3, mF1 (1/2 + 4/5 + 0) / 3 = 13/30
    assert metrics["miou"] == pytest.approx(1 / 3)
    assert metrics["mf1"] == pytest.approx(13 / 30)


def test_the_conventions_agree_when_every_class_occurs():
    metrics = _filled().compute()
    assert metrics["iou_ref"] == pytest.approx(metrics["iou"])
    assert metrics["miou_ref"] == pytest.approx(metrics["miou"])
    assert metrics["mf1_ref"] == pytest.approx(metrics["mf1"])


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
    empty = split.compute()
    assert split.matrix.sum().item() == 0 and math.isnan(empty["oa"]) and math.isnan(empty["miou"])
    assert empty["miou_ref"] == 1.0 and empty["mf1_ref"] == 1.0  # every class absent and never predicted


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
