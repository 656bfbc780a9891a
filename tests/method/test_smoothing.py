"""Spatial-temporal smoothing prior and smoothed targets (spec 2)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from cromss_ray.method import smoothed_target, smoothing_prior

CLASSES = 9
NODATA = 255


def _scipy_prior(labels: np.ndarray, season: int, kind: str, classes: int = CLASSES) -> np.ndarray:
    """The reference computation: per-class scipy gaussian_filter (sigma 3, truncate 4), then per-pixel norm."""
    onehot = np.stack([(labels == c).astype(np.float32) for c in range(classes)], axis=1)  # T, C, H, W

    def smooth(maps: np.ndarray) -> np.ndarray:
        filtered = np.stack([gaussian_filter(maps[c], sigma=3, truncate=4) for c in range(classes)])
        return filtered / filtered.sum(axis=0, keepdims=True)

    temporal, spatial = smooth(onehot.mean(axis=0)), smooth(onehot[season])
    return {"t": temporal, "s": spatial, "ts": (temporal + spatial) / 2}[kind]


def _labels(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, CLASSES, shape, generator=generator)


@pytest.mark.parametrize("kind", ["ts", "t", "s"])
def test_prior_matches_scipy_on_a_32px_image_where_the_radius_exceeds_half_the_size(kind):
    labels = _labels((4, 32, 32), seed=1)
    labels[2, 5:12, 20:30] = NODATA
    prior = smoothing_prior(labels, season=2, kind=kind)
    assert prior.shape == (CLASSES, 32, 32) and prior.dtype == torch.float32
    np.testing.assert_allclose(prior.numpy(), _scipy_prior(labels.numpy(), 2, kind), atol=1e-5)


def test_batched_prior_with_per_sample_seasons_matches_scipy():
    labels = _labels((3, 4, 40, 24), seed=2).to(torch.uint8)
    labels[1, :, :6, :] = NODATA
    seasons = torch.tensor([3, 0, 1])
    prior = smoothing_prior(labels, seasons)
    assert prior.shape == (3, CLASSES, 40, 24)
    for sample, season in enumerate(seasons.tolist()):
        expected = _scipy_prior(labels[sample].numpy(), season, "ts")
        np.testing.assert_allclose(prior[sample].numpy(), expected, atol=1e-5)


def test_prior_matches_scipy_when_the_radius_exceeds_the_whole_image():
    labels = _labels((4, 5, 7), seed=3)
    np.testing.assert_allclose(smoothing_prior(labels, 1).numpy(), _scipy_prior(labels.numpy(), 1, "ts"), atol=1e-5)


def test_prior_of_a_single_pixel_is_the_season_frequency_by_hand():
    # one pixel: every reflection is the pixel itself, so G is the identity.
    # seasons 0, 0, 1, no-data: F = (2/4, 1/4, 0) -> P_t = (2/3, 1/3, 0); season 2 -> P_s = (0, 1, 0)
    labels = torch.tensor([0, 0, 1, NODATA]).view(4, 1, 1)
    prior = smoothing_prior(labels, 2, kind="ts", classes=3)
    assert prior.flatten().tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_a_tile_without_labels_gets_the_uniform_prior():
    labels = torch.full((2, 4, 8, 8), NODATA, dtype=torch.uint8)
    prior = smoothing_prior(labels, 0, classes=4)
    assert torch.allclose(prior, torch.full_like(prior, 0.25))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 14),
    st.integers(1, 14),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["t", "s", "ts"]),
)
def test_prior_sums_to_one_per_pixel(seasons, height, width, seed, kind):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (2, seasons, height, width), generator=generator)
    labels[labels == 4] = NODATA
    season = torch.randint(0, seasons, (2,), generator=generator)
    prior = smoothing_prior(labels, season, kind=kind, classes=4)
    assert bool((prior >= 0).all())
    torch.testing.assert_close(prior.sum(dim=1), torch.ones(2, height, width), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("labels", "season", "message"),
    [
        (torch.zeros(4, 8, 8, dtype=torch.long), 4, "season must lie"),
        (torch.zeros(2, 4, 8, 8, dtype=torch.long), torch.tensor([0, 1, 2]), r"\(2,\) tensor"),
        (torch.zeros(4, 8, 8, dtype=torch.long), torch.tensor([0]), "int season"),
        (torch.zeros(8, 8, dtype=torch.long), 0, r"\(T, H, W\)"),
        (torch.zeros(4, 8, 8), 0, "integer tensor"),
    ],
)
def test_bad_prior_inputs_are_named(labels, season, message):
    with pytest.raises(ValueError, match=message):
        smoothing_prior(labels, season)


# Two pixels of one sample, three classes, labels 0 and 2, and a given prior.
Y = torch.tensor([[[0, 2]]])
PRIOR = torch.tensor([[0.5, 0.1], [0.3, 0.1], [0.2, 0.8]]).view(1, 3, 1, 2)


def test_two_factor_smoothing_by_hand():
    target = smoothed_target(Y, PRIOR, (0.15, 0.05), 3)
    # (1 - a - b) onehot + a P + b / C with a = 0.15, b = 0.05
    pixel0 = [0.8 + 0.15 * 0.5 + 0.05 / 3, 0.15 * 0.3 + 0.05 / 3, 0.15 * 0.2 + 0.05 / 3]
    pixel1 = [0.15 * 0.1 + 0.05 / 3, 0.15 * 0.1 + 0.05 / 3, 0.8 + 0.15 * 0.8 + 0.05 / 3]
    assert target[0, :, 0, 0].tolist() == pytest.approx(pixel0, abs=1e-6)
    assert target[0, :, 0, 1].tolist() == pytest.approx(pixel1, abs=1e-6)


def test_one_factor_smoothing_with_and_without_prior_by_hand():
    with_prior = smoothed_target(Y, PRIOR, (0.2,), 3)
    assert with_prior[0, :, 0, 0].tolist() == pytest.approx([0.8 + 0.2 * 0.5, 0.2 * 0.3, 0.2 * 0.2], abs=1e-6)
    uniform = smoothed_target(Y, None, (0.3,), 3)
    assert uniform[0, :, 0, 1].tolist() == pytest.approx([0.1, 0.1, 0.7 + 0.1], abs=1e-6)
    assert smoothed_target(Y, None, (), 3)[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]


def test_two_factors_without_prior_smooth_towards_the_uniform_prior_by_hand():
    # prior 'none' = uniform P = 1/3: (1 - 0.2 - 0.1) onehot + 0.2 / 3 + 0.1 / 3
    target = smoothed_target(Y, None, (0.2, 0.1), 3)
    assert target[0, :, 0, 0].tolist() == pytest.approx([0.7 + 0.1, 0.1, 0.1], abs=1e-6)
    uniform_prior = torch.full_like(PRIOR, 1 / 3)
    assert torch.allclose(target, smoothed_target(Y, uniform_prior, (0.2, 0.1), 3))


def test_unlabelled_pixels_carry_no_target():
    y = torch.tensor([[[0, NODATA]]])
    target = smoothed_target(y, PRIOR, (0.15, 0.05), 3)
    assert target[0, :, 0, 1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("prior", "factors", "message"),
    [
        (PRIOR, (0.6, 0.5), "at most two non-negative factors"),
        (PRIOR, (0.1, 0.1, 0.1), "at most two non-negative factors"),
        (PRIOR[:, :2], (0.2,), "does not match"),
    ],
)
def test_bad_smoothing_arguments_are_named(prior, factors, message):
    with pytest.raises(ValueError, match=message):
        smoothed_target(Y, prior, factors, 3)
