"""Tiled, blended prediction on arrays (cromss_ray.models.segmenter): coverage, weights, no seams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cromss_ray.data.schema import DW_CLASSES, NODATA, S2_BAND_NAMES, S2_BAND_SUBSETS
from cromss_ray.method import build_model, build_segmentation_model, fused_probabilities
from cromss_ray.models.segmenter import (
    MASKED_INPUT,
    Segmenter,
    predict_array,
    predict_maps,
    taper,
    window_origins,
)

CLASSES = ("a", "b", "c", "d")


def _conv_segmenter(kernel: int, bands: int = 13, seed: int = 0) -> Segmenter:
    """A fully convolutional stride-1 network: receptive field ``2 * kernel - 1`` pixels."""
    torch.manual_seed(seed)
    network = nn.Sequential(
        nn.Conv2d(bands, 8, kernel, padding=kernel // 2),
        nn.ReLU(),
        nn.Conv2d(8, len(CLASSES), kernel, padding=kernel // 2),
    )
    return Segmenter(network, "s2", bands, CLASSES)


def _image(bands: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(bands, height, width)).astype(np.float32)


def test_taper_by_hand():
    ramp = [0.5 - 0.5 * np.cos(np.pi * k / 4) for k in (1, 2, 3)]
    np.testing.assert_allclose(taper(8, 3, before=True, after=False), [*ramp, 1, 1, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(taper(8, 3, before=False, after=True), [1, 1, 1, 1, 1, *ramp[::-1]], rtol=1e-6)
    np.testing.assert_allclose(taper(8, 3, before=True, after=True), [*ramp, 1, 1, *ramp[::-1]], rtol=1e-6)
    assert (taper(8, 0, before=True, after=True) == 1).all()


@given(span=st.integers(1, 64), overlap=st.integers(0, 63), before=st.booleans(), after=st.booleans())
def test_taper_is_positive_and_at_most_one(span: int, overlap: int, before: bool, after: bool):
    weights = taper(span, overlap, before=before, after=after)
    assert weights.shape == (span,)
    assert (weights > 0).all() and (weights <= 1).all()


def test_window_origins_by_hand():
    assert window_origins(300, 256, 64) == [0, 44]
    assert window_origins(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_origins(64, 64, 16) == [0]


@given(size=st.integers(1, 500), span=st.integers(1, 128), data=st.data())
def test_window_origins_cover_the_axis_with_the_overlap(size: int, span: int, data: st.DataObject):
    overlap = data.draw(st.integers(0, span - 1))
    origins = window_origins(size, span, overlap)
    assert origins[0] == 0
    if size > span:
        assert origins[-1] + span == size
        steps = np.diff(origins)
        assert (steps > 0).all() and (steps <= span - overlap).all()
    else:
        assert origins == [0]


@settings(deadline=None, max_examples=25)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    tile=st.integers(2, 40),
    data=st.data(),
)
def test_position_independent_model_has_no_seams(height: int, width: int, tile: int, data: st.DataObject):
    """With a 1 x 1 convolution every window predicts a pixel alike, so any tiling must give the whole-image result."""
    overlap = data.draw(st.integers(0, tile - 1))
    segmenter = _conv_segmenter(kernel=1)
    image = _image(13, height, width)
    whole = predict_array(segmenter, s2=image, tile=128, overlap=0)
    tiled = predict_array(segmenter, s2=image, tile=tile, overlap=overlap, batch_size=3)
    np.testing.assert_allclose(tiled.probabilities, whole.probabilities, atol=1e-5)


def test_blended_tiles_match_the_whole_image_prediction():
    """A 5 x 5-receptive-field network: windows err only at their borders, which the blending weighs down."""
    segmenter = _conv_segmenter(kernel=3)
    image = _image(13, 100, 77, seed=1)
    whole = predict_array(segmenter, s2=image, tile=128, overlap=0)
    tiled = predict_array(segmenter, s2=image, tile=32, overlap=16, batch_size=5)
    abutting = predict_array(segmenter, s2=image, tile=32, overlap=0)
    blended_error = np.abs(tiled.probabilities - whole.probabilities).max()
    assert blended_error < 0.01
    assert np.abs(abutting.probabilities - whole.probabilities).max() > 5 * blended_error
    assert (tiled.classes == whole.classes).mean() > 0.99
    np.testing.assert_allclose(tiled.probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_small_image_is_padded_to_the_encoder_stride_and_cropped_back():
    torch.manual_seed(0)
    network = build_segmentation_model("Unet", "resnet18", 9, len(DW_CLASSES)).eval()
    segmenter = Segmenter(network, "s2", 9, DW_CLASSES)
    image = _image(13, 40, 50)
    prediction = predict_array(segmenter, s2=image, tile=64, overlap=16)
    assert prediction.classes.shape == (40, 50) and prediction.probabilities.shape == (9, 40, 50)
    subset = predict_array(segmenter, s2=image[list(S2_BAND_SUBSETS[9])], tile=64, overlap=16)
    np.testing.assert_array_equal(prediction.probabilities, subset.probabilities)


def test_fused_and_branch_predictions_of_a_cromss_network():
    torch.manual_seed(0)
    network = build_model("mid", "resnet18", s2_bands=9).eval()
    s1, s2 = _image(2, 64, 64, seed=2), _image(9, 64, 64, seed=3)
    x1, x2 = torch.from_numpy(s1)[None], torch.from_numpy(s2)[None]
    with torch.no_grad():
        expected_fused = fused_probabilities(*network(x1, x2))[0].numpy()
        expected_s1 = torch.softmax(network.forward_branch(x1, "s1"), dim=1)[0].numpy()
    fused = predict_array(Segmenter(network, "fused", 9, DW_CLASSES), s1=s1, s2=s2, tile=64)
    np.testing.assert_allclose(fused.probabilities, expected_fused, atol=1e-6)
    branch = predict_array(Segmenter(network, "s1", 9, DW_CLASSES), s1=s1, tile=64)
    np.testing.assert_allclose(branch.probabilities, expected_s1, atol=1e-6)


def test_bad_inputs_are_named():
    segmenter = _conv_segmenter(kernel=1, bands=9)
    with pytest.raises(ValueError, match="overlap"):
        predict_array(segmenter, s2=_image(9, 8, 8), tile=8, overlap=8)
    with pytest.raises(ValueError, match=r"s2: has 5 unnamed bands; the model takes 9 S2 bands \(B2, B3, .*--s2-bands"):
        predict_array(segmenter, s2=_image(5, 8, 8))
    with pytest.raises(ValueError, match="needs the S2 image"):
        predict_array(segmenter, s1=_image(2, 8, 8))
    with pytest.raises(ValueError, match="fused prediction needs a two-branch"):
        Segmenter(segmenter.network, "fused", 9, CLASSES)
    unet = Segmenter(build_segmentation_model("Unet", "resnet18", 9, 4), "s2", 9, CLASSES)
    with pytest.raises(ValueError, match="multiple of the network's stride 32"):
        predict_array(unet, s2=_image(9, 8, 8), tile=48)
    fused = Segmenter(build_model("mid", "resnet18", s2_bands=9), "fused", 9, DW_CLASSES)
    with pytest.raises(ValueError, match="differ in size"):
        predict_array(fused, s1=_image(2, 32, 32), s2=_image(9, 32, 40))


L2A_BANDS = tuple(name for name in S2_BAND_NAMES if name != "B10")
"""An L2A product's 12 bands (no B10, the cirrus band of L1C)."""


@pytest.mark.parametrize("model_bands", [12, 9, 3])
def test_named_bands_feed_any_model_band_subset(model_bands: int):
    """A 12-band L2A stack and a shuffled 13-band stack, named, give a model its bands by name."""
    segmenter = _conv_segmenter(kernel=1, bands=model_bands)
    l1c = _image(13, 8, 8, seed=4)
    expected = predict_array(segmenter, s2=l1c[list(S2_BAND_SUBSETS[model_bands])], tile=8)
    l2a = l1c[[S2_BAND_NAMES.index(name) for name in L2A_BANDS]]
    from_l2a = predict_array(segmenter, s2=l2a, tile=8, band_names={"s2": L2A_BANDS})
    np.testing.assert_array_equal(from_l2a.probabilities, expected.probabilities)
    shuffled = np.random.default_rng(0).permutation(13)
    names = [f"B{S2_BAND_NAMES[index][1:].zfill(2)}" for index in shuffled]  # B02 spelling
    from_shuffled = predict_array(segmenter, s2=l1c[shuffled], tile=8, band_names={"s2": names})
    np.testing.assert_array_equal(from_shuffled.probabilities, expected.probabilities)


def test_wrong_band_names_are_named():
    segmenter = _conv_segmenter(kernel=1, bands=13)
    with pytest.raises(ValueError, match=r"s2: lacks the S2 band B10 that the model takes \(B1, .*\); it holds B1, B2"):
        predict_array(segmenter, s2=_image(12, 8, 8), band_names={"s2": L2A_BANDS})
    rgb = _conv_segmenter(kernel=1, bands=9)
    with pytest.raises(ValueError, match=r"lacks the S2 bands B5, B6, B7, B8, B11, B12"):
        predict_array(rgb, s2=_image(3, 8, 8), band_names={"s2": ["B4", "B3", "B2"]})
    with pytest.raises(ValueError, match=r"s2: band 'B13' is not a S2 band \(B1, B2"):
        predict_array(segmenter, s2=_image(13, 8, 8), band_names={"s2": [*S2_BAND_NAMES[:12], "B13"]})
    with pytest.raises(ValueError, match=r"s2: band B2 is named twice"):
        predict_array(segmenter, s2=_image(13, 8, 8), band_names={"s2": [*S2_BAND_NAMES[:12], "B02"]})
    with pytest.raises(ValueError, match=r"s2: 3 band names \(B4, B3, B2\) for 13 bands"):
        predict_array(segmenter, s2=_image(13, 8, 8), band_names={"s2": ["B4", "B3", "B2"]})


@pytest.fixture(scope="module")
def unet() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(build_segmentation_model("Unet", "resnet18", 9, len(DW_CLASSES)).eval(), "s2", 9, DW_CLASSES)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_pixel_is_masked_and_leaves_every_other_pixel_alone(unet: Segmenter, bad: float):
    """The network sees the band means' code where a pixel is masked: the clean run with those values there
    gives every other pixel's class and probabilities; the masked pixel is NODATA with NaN probabilities.
    (Fed to the network, one NaN would spread over every window that holds it.)"""
    clean = _image(9, 70, 90, seed=6)
    row, col = 35, 50  # in two overlapping windows of 64 px, overlap 16
    clean[:, row, col] = MASKED_INPUT
    image = clean.copy()
    image[4, row, col] = bad
    expected = predict_array(unet, s2=clean, tile=64, overlap=16)
    masked = predict_array(unet, s2=image, tile=64, overlap=16)
    assert masked.classes[row, col] == NODATA and np.isnan(masked.probabilities[:, row, col]).all()
    others = np.ones((70, 90), bool)
    others[row, col] = False
    np.testing.assert_array_equal(masked.classes[others], expected.classes[others])
    np.testing.assert_array_equal(masked.probabilities[:, others], expected.probabilities[:, others])
    assert np.isfinite(masked.probabilities[:, others]).all()


def test_predict_maps_masks_a_pixel_non_finite_in_either_image_in_every_output():
    torch.manual_seed(0)
    network = build_model("mid", "resnet18", s2_bands=9).eval()
    s1, s2 = _image(2, 40, 40, seed=7)[None], _image(9, 40, 40, seed=8)[None]
    for image in (s1, s2):  # a masked pixel is filled in both images
        image[..., 10, 12] = image[..., 30, 5] = MASKED_INPUT
    clean = predict_maps(network, s1, s2)
    s1[0, 1, 10, 12] = np.nan
    s2[0, 0, 30, 5] = np.inf
    masked = predict_maps(network, s1, s2)
    others = np.ones((1, 40, 40), bool)
    others[0, 10, 12] = others[0, 30, 5] = False
    for prefix in ("", "s1_", "s2_"):
        classes, probabilities = masked[f"{prefix}classes"], masked[f"{prefix}probabilities"]
        assert classes[0, 10, 12] == classes[0, 30, 5] == NODATA
        assert np.isnan(probabilities[0, :, 10, 12]).all() and np.isnan(probabilities[0, :, 30, 5]).all()
        np.testing.assert_array_equal(classes[others], clean[f"{prefix}classes"][others])
        np.testing.assert_array_equal(
            probabilities.transpose(0, 2, 3, 1)[others], clean[f"{prefix}probabilities"].transpose(0, 2, 3, 1)[others]
        )
