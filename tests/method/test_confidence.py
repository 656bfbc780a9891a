"""Prediction and label confidences and their entangling (spec 3-4)."""

import math

import pytest
import torch

from cromss_ray.method import entangle, label_confidence, prediction_confidence


def _logits(*pixels: tuple[float, ...]) -> torch.Tensor:
    """(1, C, 1, P) logits whose softmax at pixel i is ``pixels[i]``."""
    return torch.tensor(pixels, dtype=torch.float32).log().T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_entropy_confidence_by_hand():
    # p = (0.5, 0.25, 0.25): H = 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2; c = 1 - H / log 3
    logits = _logits((0.5, 0.25, 0.25), (1 / 3, 1 / 3, 1 / 3))
    confidence = prediction_confidence(logits, "ce")
    assert confidence.shape == (1, 1, 2)
    assert confidence[0, 0, 0].item() == pytest.approx(1 - 1.5 * math.log(2) / math.log(3), abs=1e-6)
    assert confidence[0, 0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_gini_confidence_by_hand():
    # sum p^2 = 0.25 + 0.0625 + 0.0625
    confidence = prediction_confidence(_logits((0.5, 0.25, 0.25)), "gini")
    assert confidence.item() == pytest.approx(0.375, abs=1e-6)


def test_saturated_logits_give_full_confidence_and_nan_gives_zero():
    logits = torch.tensor([[1e4, -1e4, -1e4], [math.nan, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    for kind in ("ce", "gini"):
        confidence = prediction_confidence(logits, kind)
        assert confidence[0, 0].tolist() == [1.0, 0.0]


def test_label_confidence_picks_the_label_class_and_zeroes_unlabelled_pixels():
    logits = _logits((0.5, 0.25, 0.25), (0.1, 0.2, 0.7), (0.1, 0.2, 0.7))
    y = torch.tensor([[[1, 2, 255]]])
    confidence = label_confidence(logits, y)
    assert confidence[0, 0].tolist() == pytest.approx([0.25, 0.7, 0.0], abs=1e-6)


def test_entangle_by_hand():
    # c1 = 0.8, c2 = 0.5: c1 c2 = 0.4, so (0.8 + 0.4) / 2 and (0.5 + 0.4) / 2
    e1, e2 = entangle(torch.tensor([0.8, 0.0]), torch.tensor([0.5, 1.0]))
    assert e1.tolist() == pytest.approx([0.6, 0.0])
    assert e2.tolist() == pytest.approx([0.45, 0.5])


def test_confidences_carry_no_gradient():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = torch.randint(0, 4, (2, 3, 3))
    c1 = prediction_confidence(logits, "ce")
    c2 = label_confidence(logits, y)
    e1, _ = entangle(c1, c2)
    for tensor in (c1, c2, e1):
        assert not tensor.requires_grad and tensor.grad_fn is None


def test_unknown_confidence_kind_is_named():
    with pytest.raises(ValueError, match="confidence kind"):
        prediction_confidence(torch.zeros(1, 2, 1, 1), "margin")
