"""Ramp and selection-ratio schedules against hand-worked values (spec 5)."""

import math

import pytest

from cromss_ray.method import ramp, selection_ratio


def test_exp_ramp_starts_at_exp_minus_five_and_reaches_one_at_length():
    assert ramp(0, 80, "exp") == pytest.approx(math.exp(-5.0))
    assert ramp(80, 80, "exp") == 1.0
    assert ramp(200, 80, "exp") == 1.0
    # e = 40, E = 80: phase 0.5, r = exp(-5 * 0.25)
    assert ramp(40, 80, "exp") == pytest.approx(math.exp(-1.25))


def test_zero_length_ramp_is_one():
    assert ramp(0, 0, "exp") == 1.0
    assert ramp(0, 0, "linear") == 1.0


def test_linear_and_none_ramps():
    assert ramp(0, 80, "linear") == 0.0
    assert ramp(20, 80, "linear") == 0.25
    assert ramp(120, 80, "linear") == 1.0
    assert ramp(0, 80, "none") == 1.0


def test_selection_ratio_falls_from_near_one_to_final():
    # rho(0) = 1 - exp(-5) * (1 - 0.5)
    assert selection_ratio(0, 80, 0.5, "exp") == pytest.approx(1 - 0.5 * math.exp(-5.0))
    assert selection_ratio(80, 80, 0.5, "exp") == pytest.approx(0.5)
    assert selection_ratio(81, 80, 0.5, "exp") == 0.5
    assert selection_ratio(20, 80, 0.2, "linear") == pytest.approx(1 - 0.25 * 0.8)
    assert selection_ratio(0, 80, 0.5, "none") == 0.5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ramp(0, 80, "cosine"), "ramp kind"),
        (lambda: ramp(-1, 80, "exp"), "non-negative"),
        (lambda: selection_ratio(0, 80, 1.5, "exp"), r"\[0, 1\]"),
    ],
)
def test_bad_schedule_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
