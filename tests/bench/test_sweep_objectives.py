"""``bench/sweep_objectives.py``: what each objective picks, on hand-made trial curves.

Trial ``memorises`` scores ever higher on the noisy validation labels while its clean
score falls after epoch 2; trial ``robust`` peaks later and higher on the clean labels
and in the transfer probe. The noisy objective must pick the first, the other two the
second, and the clean scores of each pick are read off the curves by hand.
"""

from __future__ import annotations

import math

import pytest

from bench.sweep_objectives import (
    OBJECTIVES,
    Peak,
    Pick,
    TrialCurves,
    best_epoch,
    build_parser,
    pick_rows,
    picks,
    resolve_arguments,
    trial_curves,
)

MEMORISES = {
    "epoch": [1, 2, 3],
    "val/s2/miou": [0.30, 0.35, 0.40],
    "val_clean/s2/miou": [0.30, 0.35, 0.20],
    "transfer/s2/miou": [0.20, 0.25, 0.25],
}
ROBUST = {
    "epoch": [1, 2, 3],
    "val/s2/miou": [0.30, 0.32, 0.33],
    "val_clean/s2/miou": [0.32, 0.38, 0.36],
    "transfer/s2/miou": [0.20, 0.30, 0.30],
}
CONFIGS = {"memorises": {"model.fusion": "late"}, "robust": {"model.fusion": "mid"}}


def two_trials() -> list[TrialCurves]:
    return trial_curves({"robust": ROBUST, "memorises": MEMORISES}, CONFIGS, ["model.fusion"])


def test_best_epoch_takes_the_first_maximum_and_skips_nan():
    assert best_epoch([1, 2, 3, 4], [0.2, math.nan, 0.5, 0.5]) == Peak(0.5, 3)


def test_best_epoch_of_no_finite_value_is_an_error():
    with pytest.raises(ValueError, match="no finite value"):
        best_epoch([1, 2], [math.nan, math.nan])


def test_trial_curves_read_every_objective_in_trial_id_order():
    memorises, robust = two_trials()
    assert (memorises.trial_id, robust.trial_id) == ("memorises", "robust")
    assert memorises.sampled == {"model.fusion": "late"}
    assert memorises.scores["noisy_validation"] == [0.30, 0.35, 0.40]
    assert robust.at("clean_validation", 2) == 0.38


def test_a_trial_without_an_objective_metric_is_named():
    partial = {key: values for key, values in ROBUST.items() if key != "transfer/s2/miou"}
    with pytest.raises(ValueError, match="trial robust reported no transfer/s2/miou"):
        trial_curves({"robust": partial}, CONFIGS, [])


def test_noisy_validation_picks_the_memorising_trial_the_others_the_robust_one():
    chosen = {pick.objective: pick for pick in picks(two_trials())}
    assert set(chosen) == set(OBJECTIVES)
    # memorises: noisy best 0.40 at epoch 3, where its clean score is 0.20; its clean best is 0.35.
    assert chosen["noisy_validation"] == Pick("noisy_validation", "memorises", 3, 0.40, 0.35, 0.20)
    # robust: clean best 0.38 at epoch 2; its transfer best 0.30 first reached at epoch 2 too.
    assert chosen["clean_validation"] == Pick("clean_validation", "robust", 2, 0.38, 0.38, 0.38)
    assert chosen["transfer"] == Pick("transfer", "robust", 2, 0.30, 0.38, 0.38)


def test_pick_rows_give_each_picks_clean_gap_to_the_clean_pick():
    rows = pick_rows(picks(two_trials()))
    assert rows["noisy_validation.trial"] == "memorises (epoch 3, 40.00 %)"
    assert rows["noisy_validation.clean_at_picked_epoch_pct"] == "20.00"
    assert rows["noisy_validation.clean_best_minus_clean_pick_pp"] == "-3.00"
    assert rows["transfer.clean_best_minus_clean_pick_pp"] == "+0.00"


def test_no_trial_is_an_error():
    with pytest.raises(ValueError, match="no trial"):
        picks([])


def test_selection_values_parse_as_booleans_and_anything_else_is_refused(capsys):
    parser = build_parser()
    assert parser.parse_args(["--selection", "True", "false"]).selection == [True, False]
    with pytest.raises(SystemExit):
        parser.parse_args(["--selection", "yes"])
    assert "'yes': expected true or false" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "40"], "--size 40: must be a positive multiple of 32"),
        (["--concurrent", "0"], "must be at least 1"),
        (["--probe-every", "0"], "must be at least 1"),
    ],
)
def test_sizes_the_sweep_cannot_take_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        resolve_arguments(build_parser().parse_args(argv))


def test_quick_shrinks_the_sweep_to_one_fusion_and_three_epochs():
    args = resolve_arguments(build_parser().parse_args(["--quick"]))
    assert (args.locations, args.size, args.epochs, args.fusions) == (4, 32, 3, ["mid"])
