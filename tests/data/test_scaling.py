"""The network input of spec 9: pixels worked out by hand, the device path's bits, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cromss_ray.data import network_input
from cromss_ray.data.device import network_input_tensor
from cromss_ray.data.scaling import MEAN_CODE, convert_storage, v8_codes
from cromss_ray.data.schema import S1_BAND_NAMES, S2_BAND_NAMES, ModalitySpec, s2_subset_names

S1_RAW = ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB", representation="physical")
S2_RAW = ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, scale=1e-4, unit="reflectance", representation="physical")
S2_V8 = ModalitySpec(dtype="uint8", bands=S2_BAND_NAMES, scale=1 / 255, unit="normalized", representation="v8")
S1_SYNTH = ModalitySpec(
    dtype="uint8", bands=S1_BAND_NAMES, scale=35 / 255, offset=-30.0, unit="dB", representation="physical"
)
S1_V8 = ModalitySpec(dtype="uint8", bands=S1_BAND_NAMES, representation="v8")
S2_SYNTH = ModalitySpec(dtype="uint8", bands=S2_BAND_NAMES, scale=1 / 255, unit="reflectance", representation="physical")


def _codes(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float32) / np.float32(255)


def test_s1_pixels_by_hand_with_both_clip_ends_and_truncation() -> None:
    # VV: mu - 2 sigma = -12.54847273 - 10.51395434 = -23.06242707, 4 sigma = 21.02790868
    # VH: mu - 2 sigma = -20.19237134 - 11.82301834 = -32.01538968, 4 sigma = 23.64603668
    # -30 dB: VV -84.1 -> 0 (lower clip), VH 21.73 -> 21
    # -23 dB: VV 0.757 -> 0 (truncated, not rounded to 1), VH 97.22 -> 97
    # -5 dB:  VV 219.04 -> 219, VH 291.3 -> 255 (upper clip)
    stored = np.array([[[-30.0, -23.0, -5.0]], [[-30.0, -23.0, -5.0]]], np.float32)
    expected = _codes([[[0, 0, 219]], [[21, 97, 255]]])
    np.testing.assert_array_equal(network_input(stored, S1_RAW), expected)


def test_s2_pixels_by_hand_with_a_fractional_boundary() -> None:
    # digital numbers 1500 in B2, B3, B4 and 0 in B10:
    # B2 (1500 + 309.91479209) / 3401.39273764 * 255 = 135.69 -> 135
    # B3 (1500 + 435.25669550) / 3500.25938944 * 255 = 140.99 -> 140
    # B4 (1500 + 914.17468547) / 4555.39828184 * 255 = 135.14 -> 135
    # B10 (0 + 80.20510995) / 204.61724632 * 255 = 99.954 -> 99 (rounding would give 100)
    # 10000 in B4: 610.9 -> 255
    stored = np.zeros((13, 1, 2), np.uint16)
    stored[1:4, 0, 0] = 1500
    stored[3, 0, 1] = 10000
    out = network_input(stored, S2_RAW)
    assert out.dtype == np.float32 and out.shape == stored.shape
    np.testing.assert_array_equal(out[[1, 2, 3, 10], 0, 0], _codes([135, 140, 135, 99]))
    assert out[3, 0, 1] == 1.0


def test_a_band_subset_takes_its_bands_statistics() -> None:
    rgb = S2_RAW.with_bands(("B4", "B3", "B2"))
    stored = np.full((2, 3, 1, 1), 1500, np.uint16)
    np.testing.assert_array_equal(network_input(stored, rgb)[:, :, 0, 0], _codes([[135, 140, 135]] * 2))
    full = network_input(np.full((13, 1, 1), 1500, np.uint16), S2_RAW)
    np.testing.assert_array_equal(network_input(stored, rgb)[0], full[[3, 2, 1]])


def test_released_v8_codes_are_only_divided_by_255() -> None:
    stored = np.arange(0, 256, 20, dtype=np.uint8).reshape(13, 1, 1)
    np.testing.assert_array_equal(network_input(stored, S2_V8), _codes(stored))


def test_synthetic_physical_uint8_goes_through_the_rule() -> None:
    # stored 0 and 255 are -30 and 5 dB (scale 35 / 255, offset -30): the S1 pixels above
    stored = np.array([[[0, 255]], [[0, 255]]], np.uint8)
    np.testing.assert_array_equal(network_input(stored, S1_SYNTH), _codes([[[0, 255]], [[21, 255]]]))


def test_nan_codes_zero() -> None:
    stored = np.array([[[np.nan]], [[-20.0]]], np.float32)
    assert network_input(stored, S1_RAW)[0, 0, 0] == 0.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModalitySpec(dtype="float32", bands=("VV", "HH"), unit="dB", representation="physical"), "'HH'"),
        (ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB"), "does not declare its representation"),
        (ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="linear", representation="physical"), "'linear'"),
    ],
)
def test_specs_the_rule_cannot_take_are_errors(spec: ModalitySpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        network_input(np.zeros((2, 1, 1), np.float32), spec)


def test_the_band_axis_must_hold_the_bands() -> None:
    with pytest.raises(ValueError, match="does not hold the 2 bands"):
        network_input(np.zeros((3, 1, 1), np.float32), S1_RAW)
    with pytest.raises(ValueError, match="already holds v8 codes"):
        v8_codes(np.zeros((13, 1, 1), np.uint8), S2_V8)


def test_converted_storage_by_hand() -> None:
    # a code's middle value: mu - 2 sigma + (code + 0.5) / 255 * 4 sigma; VV (above):
    # code 0: -23.06242707 + 0.5 / 255 * 21.02790868 = -23.02119588
    # code 127: -23.06242707 + 127.5 / 255 * 21.02790868 = -12.54847273, the mean (MEAN_CODE)
    # code 255: -23.06242707 + 255.5 / 255 * 21.02790868 = -1.99328720
    codes = np.array([[[0, MEAN_CODE, 255]], [[0, 0, 0]]], np.uint8)
    physical = convert_storage(codes, S1_V8, S1_RAW)
    assert physical.dtype == np.float32
    np.testing.assert_allclose(physical[0, 0], [-23.02119588, -12.54847273, -1.99328720], rtol=1e-6)
    # synthetic uint8 255 is 5 dB (code 255 in VV); stored alike, values pass unchanged (NaN too)
    np.testing.assert_allclose(convert_storage(np.full((2, 1, 1), 255, np.uint8), S1_SYNTH, S1_RAW)[0], [[-1.9932872]], rtol=1e-6)
    values = np.array([[[np.nan]], [[-3.25]]], np.float32)
    np.testing.assert_array_equal(convert_storage(values, S1_RAW, S1_RAW), values)
    np.testing.assert_array_equal(convert_storage(np.full((2, 1, 1), -5.0, np.float32), S1_RAW, S1_V8)[0], [[219]])


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([S1_RAW, S1_SYNTH, S1_V8]),
    st.sampled_from([S1_RAW, S1_V8]),
    hnp.arrays(np.float32, (2, 3, 4), elements=st.floats(-60, 30, width=32)),
)
def test_converted_s1_storage_gives_the_same_network_input(
    source: ModalitySpec, target: ModalitySpec, values: np.ndarray
) -> None:
    stored = values if source.dtype == "float32" else np.clip(values + 60, 0, 255).astype(np.uint8)
    converted = convert_storage(stored, source, target)
    np.testing.assert_array_equal(network_input(converted, target), network_input(stored, source))


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([S2_RAW, S2_SYNTH, S2_V8]),
    st.sampled_from([S2_RAW, S2_V8]),
    hnp.arrays(np.uint16, (13, 2, 3)),
    st.sampled_from([13, 12, 9, 3]),
)
def test_converted_s2_storage_gives_the_same_network_input(
    source: ModalitySpec, target: ModalitySpec, values: np.ndarray, bands: int
) -> None:
    names = s2_subset_names(bands)
    stored = (values if source.dtype == "uint16" else values.astype(np.uint8))[:bands]
    source, target = source.with_bands(names), target.with_bands(names)
    converted = convert_storage(stored, source, target)
    np.testing.assert_array_equal(network_input(converted, target), network_input(stored, source))


def _same_bits(stored: np.ndarray, spec: ModalitySpec, device: str = "cpu") -> None:
    expected = network_input(stored, spec)
    tensor = torch.from_numpy(stored.astype(np.int32) if stored.dtype == np.uint16 else stored).to(device)
    on_device = network_input_tensor(tensor, spec).cpu().numpy()
    np.testing.assert_array_equal(on_device.view(np.uint32), expected.view(np.uint32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_numpy_bits() -> None:
    """Training runs on GPUs: their division and rounding must give the same codes."""
    rng = np.random.default_rng(5)
    _same_bits(rng.integers(0, 2**16, (4, 13, 64, 64)).astype(np.uint16), S2_RAW, "cuda")
    _same_bits(rng.normal(-15, 10, (4, 2, 64, 64)).astype(np.float32), S1_RAW, "cuda")
    _same_bits(rng.integers(0, 256, (4, 2, 64, 64)).astype(np.uint8), S1_SYNTH, "cuda")
    _same_bits(rng.integers(0, 256, (4, 13, 64, 64)).astype(np.uint8), S2_V8, "cuda")


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, (3, 2, 4, 5), elements=st.floats(-60, 30, width=32) | st.just(float("nan"))))
def test_device_path_gives_the_numpy_bits_for_s1(stored: np.ndarray) -> None:
    _same_bits(stored, S1_RAW)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint16, (2, 13, 3, 3)), st.sampled_from([13, 12, 9, 3]))
def test_device_path_gives_the_numpy_bits_for_s2(stored: np.ndarray, bands: int) -> None:
    subset = S2_RAW.with_bands(s2_subset_names(bands))
    _same_bits(stored[:, :bands], subset)
    _same_bits(stored[:, :bands].astype(np.uint8), subset.model_copy(update={"dtype": "uint8", "representation": "v8"}))
    _same_bits(stored[:, :2].astype(np.uint8), S1_SYNTH)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, (2, 40), elements=st.floats(-80, 40, width=32)),
    hnp.arrays(np.uint16, (13, 40)),
)
def test_outputs_are_codes_over_255_and_monotone_per_band(s1: np.ndarray, s2: np.ndarray) -> None:
    for stored, spec in ((s1, S1_RAW), (s2, S2_RAW)):
        order = np.argsort(stored, axis=-1, kind="stable")
        ordered = np.take_along_axis(stored, order, axis=-1)[:, None, :]
        out = network_input(ordered, spec)
        codes = np.rint(out * 255)
        assert codes.min() >= 0 and codes.max() <= 255
        np.testing.assert_array_equal(out, _codes(codes))
        assert (np.diff(out, axis=-1) >= 0).all()
