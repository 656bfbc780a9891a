"""Class-balanced segmentation weights and consistency weights (spec 6-7)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cromss_ray.method import consistency_weights, selection_weights

NODATA = 255

# Ten pixels of a (1, 10) map, three classes plus one no-data pixel.
Y = torch.tensor([[0, 1, 0, 1, 0, 2, 0, 1, NODATA, 0]])
CONFIDENCE = torch.tensor([[0.9, 0.4, 0.6, 0.8, 0.3, 0.7, 0.2, 0.2, 0.9, 0.1]])


def test_class_balanced_soft_weights_by_hand():
    weights = selection_weights(CONFIDENCE, Y, ratio=0.5, classes=3)
    # class 0: 5 pixels, k = floor(2.5) = 2, confidences 0.9 0.6 0.3 0.2 0.1 -> tau = 0.6
    # class 1: 3 pixels, k = floor(1.5) = 1, confidences 0.8 0.4 0.2 -> tau = 0.8
    # class 2: 1 pixel, k = floor(0.5) = 0 -> weight 0; the no-data pixel -> 0
    expected = [1.0, 0.4 / 0.8, 1.0, 1.0, 0.3 / 0.6, 0.0, 0.2 / 0.6, 0.2 / 0.8, 0.0, 0.1 / 0.6]
    assert weights[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert weights.shape == Y.shape and weights.dtype == CONFIDENCE.dtype


def test_non_balanced_weights_use_one_threshold_over_all_labelled_pixels():
    weights = selection_weights(CONFIDENCE, Y, ratio=0.5, classes=3, class_balanced=False)
    # 9 labelled pixels, k = floor(4.5) = 4; sorted 0.9 0.8 0.7 0.6 ... -> tau = 0.6
    expected = [1.0, 0.4 / 0.6, 1.0, 1.0, 0.5, 1.0, 0.2 / 0.6, 0.2 / 0.6, 0.0, 0.1 / 0.6]
    assert weights[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_zero_threshold_gives_the_whole_class_full_weight():
    y = torch.tensor([[1, 1, 1, 1, 0]])
    confidence = torch.tensor([[0.0, 0.3, 0.0, 0.0, 0.5]])
    # class 1: k = floor(4 * 0.5) = 2, sorted 0.3 0 0 0 -> tau = 0 -> weight 1 for all four
    weights = selection_weights(confidence, y, ratio=0.5, classes=2)
    assert weights[0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_ratio_one_keeps_every_labelled_pixel_and_ratio_zero_uses_the_confidence():
    assert selection_weights(CONFIDENCE, Y, 1.0, 3)[0].tolist() == [1.0] * 8 + [0.0, 1.0]
    expected = CONFIDENCE[0].tolist()
    expected[8] = 0.0
    assert selection_weights(CONFIDENCE, Y, 0.0, 3)[0].tolist() == pytest.approx(expected)


def test_the_first_epoch_ratio_already_soft_weights_the_least_confident_pixel():
    # rho(0) = 1 - exp(-5) / 2 = 0.99663; class 0 has 5 pixels -> k = floor(4.983) = 4, tau = 0.2
    ratio = 1 - math.exp(-5.0) / 2
    weights = selection_weights(CONFIDENCE, Y, ratio, 3)
    assert weights[0, 9].item() == pytest.approx(0.1 / 0.2)
    assert weights[0, [0, 2, 4, 6]].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_selection_weights_carry_no_gradient():
    confidence = torch.rand(2, 4, 4, requires_grad=True)
    weights = selection_weights(confidence, torch.randint(0, 3, (2, 4, 4)), 0.5, 3)
    assert not weights.requires_grad


def test_shape_mismatch_and_bad_ratio_are_named():
    with pytest.raises(ValueError, match="differ in shape"):
        selection_weights(torch.rand(2, 3), torch.zeros(3, 2, dtype=torch.long), 0.5, 2)
    with pytest.raises(ValueError, match="ratio"):
        selection_weights(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), 1.5, 2)


def test_consistency_weights_by_hand():
    confidence = torch.tensor([0.0, 0.5, 1.0])
    r0 = math.exp(-5.0)
    # v = (1 - r) + r c while e <= E
    assert consistency_weights(confidence, 0, 80, "exp").tolist() == pytest.approx([1 - r0, 1 - r0 / 2, 1.0])
    assert consistency_weights(confidence, 20, 80, "linear").tolist() == pytest.approx([0.75, 0.875, 1.0])
    assert consistency_weights(confidence, 80, 80, "exp").tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert consistency_weights(confidence, 81, 80, "exp").tolist() == pytest.approx([0.0, 0.5, 1.0])


@st.composite
def _labelled_confidences(draw):
    size = draw(st.integers(1, 60))
    labels = draw(st.lists(st.sampled_from([0, 1, 2, 3, NODATA]), min_size=size, max_size=size))
    values = draw(
        st.lists(st.floats(0.0, 1.0, allow_subnormal=True, width=32), min_size=size, max_size=size)
    )
    ratio = draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
    return torch.tensor(values, dtype=torch.float32), torch.tensor(labels), ratio


@settings(max_examples=150, deadline=None)
@given(_labelled_confidences(), st.booleans())
def test_weights_lie_in_unit_interval_and_keep_the_top_share_of_each_class(case, class_balanced):
    confidence, y, ratio = case
    weights = selection_weights(confidence, y, ratio, classes=4, class_balanced=class_balanced)
    assert bool(((weights >= 0) & (weights <= 1)).all())
    assert bool((weights[y == NODATA] == 0).all())
    groups = [y == c for c in range(4)] if class_balanced else [y != NODATA]
    for members in groups:
        kept = math.floor(int(members.sum()) * ratio)
        assert int((weights[members] == 1).sum()) >= kept
