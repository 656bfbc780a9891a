"""The CromSS objective: each term by hand, the assembled loss, gradients and robustness (spec 8)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cromss_ray.method import (
    CromSSLoss,
    SingleModalityLoss,
    consistency_loss,
    entangle,
    label_confidence,
    prediction_confidence,
    segmentation_loss,
    selection_weights,
    smoothing_prior,
    weighted_cross_entropy,
    weighted_dice,
    weighted_focal,
)

LN = math.log
NODATA = 255


def _log_probs(*pixels: tuple[float, ...]) -> torch.Tensor:
    """(1, C, 1, P) log-probabilities whose pixel i has probabilities ``pixels[i]``."""
    return torch.tensor(pixels, dtype=torch.float32).log().T.reshape(1, len(pixels[0]), 1, len(pixels))


# Two pixels, two classes: p1 = (0.5, 0.5) and (0.75, 0.25); labels 0 and 1.
LOG_P1 = _log_probs((0.5, 0.5), (0.75, 0.25))
LOG_P2 = _log_probs((0.25, 0.75), (0.5, 0.5))
ONEHOT = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
W = torch.tensor([[[1.0, 0.5]]])


def test_weighted_cross_entropy_by_hand():
    # (1 * -log 0.5 + 0.5 * -log 0.25) / 1.5
    expected = (LN(2) + 0.5 * LN(4)) / 1.5
    assert weighted_cross_entropy(LOG_P1, ONEHOT, W).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_with_soft_targets_by_hand():
    target = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).view(1, 2, 1, 2)
    pixel0 = -(0.9 * LN(0.5) + 0.1 * LN(0.5))
    pixel1 = -(0.2 * LN(0.75) + 0.8 * LN(0.25))
    expected = (pixel0 + 0.5 * pixel1) / 1.5
    assert weighted_cross_entropy(LOG_P1, target, W).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_dice_by_hand():
    # class 0: I = 1*0.5*1 + 0.5*0.75*0 = 0.5, U = 1*(0.5+1) + 0.5*(0.75+0) = 1.875
    # class 1: I = 1*0.5*0 + 0.5*0.25*1 = 0.125, U = 1*(0.5+0) + 0.5*(0.25+1) = 1.125
    expected = ((1 - 1.0 / 1.875) + (1 - 0.25 / 1.125)) / 2
    assert weighted_dice(LOG_P1.exp(), ONEHOT, W).item() == pytest.approx(expected, rel=1e-6)


def test_dice_counts_a_class_without_target_mass_as_zero_but_averages_over_all_classes():
    probs = torch.tensor([[0.5, 0.75], [0.5, 0.25], [0.0, 0.0]]).view(1, 3, 1, 2)
    target = torch.cat([ONEHOT, torch.zeros(1, 1, 1, 2)], dim=1)
    expected = ((1 - 1.0 / 1.875) + (1 - 0.25 / 1.125) + 0.0) / 3
    assert weighted_dice(probs, target, W).item() == pytest.approx(expected, rel=1e-6)


def test_dice_with_all_weights_zero_is_one_per_present_class():
    # U_c = 0 -> dice 0 / max(0, 1e-7) = 0 -> loss 1 for both present classes
    assert weighted_dice(LOG_P1.exp(), ONEHOT, torch.zeros(1, 1, 2)).item() == pytest.approx(1.0)


def test_weighted_focal_by_hand_and_equal_to_cross_entropy_at_gamma_zero():
    # FL = -(1 - p_y)^2 log p_y: 0.25 log 2 and 0.5625 log 4
    expected = (0.25 * LN(2) + 0.5 * 0.5625 * LN(4)) / 1.5
    assert weighted_focal(LOG_P1, ONEHOT, W, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    assert weighted_focal(LOG_P1, ONEHOT, W, gamma=0.0).item() == pytest.approx(
        weighted_cross_entropy(LOG_P1, ONEHOT, W).item(), rel=1e-6
    )


# Consistency weights of the two modalities, deliberately different.
V1 = torch.tensor([[[1.0, 0.25]]])
V2 = torch.tensor([[[0.5, 1.0]]])


def test_ce_consistency_by_hand_each_modality_weighted_by_the_other():
    # l12 (z1 learns p2): -(0.25 log 0.5 + 0.75 log 0.5), -(0.5 log 0.75 + 0.5 log 0.25), weighted by v2
    l12 = [LN(2), -(0.5 * LN(0.75) + 0.5 * LN(0.25))]
    # l21 (z2 learns p1): -(0.5 log 0.25 + 0.5 log 0.75), -(0.75 log 0.5 + 0.25 log 0.5), weighted by v1
    l21 = [-(0.5 * LN(0.25) + 0.5 * LN(0.75)), LN(2)]
    expected = (0.5 * l12[0] + 1.0 * l12[1]) / 1.5 + (1.0 * l21[0] + 0.25 * l21[1]) / 1.25
    assert consistency_loss(LOG_P1, LOG_P2, V1, V2, "ce").item() == pytest.approx(expected, rel=1e-6)


def test_kl_consistency_by_hand():
    l12 = [0.25 * LN(0.25 / 0.5) + 0.75 * LN(0.75 / 0.5), 0.5 * LN(0.5 / 0.75) + 0.5 * LN(0.5 / 0.25)]
    l21 = [0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75), 0.75 * LN(0.75 / 0.5) + 0.25 * LN(0.25 / 0.5)]
    expected = (0.5 * l12[0] + l12[1]) / 1.5 + (l21[0] + 0.25 * l21[1]) / 1.25
    assert consistency_loss(LOG_P1, LOG_P2, V1, V2, "kl").item() == pytest.approx(expected, rel=1e-5)


def test_mse_consistency_sums_over_classes_and_normalises_by_pixel_weights():
    # every pixel: (0.25)^2 + (0.25)^2 = 0.125 summed over classes; a weighted mean of 0.125
    # over pixels is 0.125 per direction (a class mean or a class-broadcast weight sum would halve it)
    assert consistency_loss(LOG_P1, LOG_P2, V1, V2, "mse").item() == pytest.approx(0.25, rel=1e-6)
    assert consistency_loss(LOG_P1, LOG_P2, V1, V2, "none").item() == 0.0


def test_consistency_target_is_detached():
    log_p1 = LOG_P1.clone().requires_grad_()
    log_p2 = LOG_P2.clone().requires_grad_()
    # v1 = 0 removes l21, so only l12 = CE(z1, stopgrad(p2)) remains
    for kind in ("ce", "kl", "mse"):
        log_p1.grad = log_p2.grad = None
        consistency_loss(log_p1, log_p2, torch.zeros_like(V1), V2, kind).backward()
        assert bool((log_p2.grad == 0).all()), kind
        assert bool((log_p1.grad != 0).any()), kind


def test_assembled_loss_without_selection_or_smoothing_by_hand():
    loss = CromSSLoss(loss_terms="cd", consistency="ce", consistency_weight=0.5, smoothing_factors=(), selection=False,
                      classes=2)
    y = torch.tensor([[[0, 1]]])
    total, diagnostics = loss(LOG_P1.clone(), LOG_P2.clone(), y)  # log-probabilities are valid logits
    ce1 = (LN(2) + LN(4)) / 2
    ce2 = (LN(4) + LN(2)) / 2
    dice1 = ((1 - 2 * 0.5 / 2.25) + (1 - 2 * 0.25 / 1.75)) / 2  # w = 1: U0 = 0.5+1+0.75, U1 = 0.5+0.25+1
    dice2 = ((1 - 2 * 0.25 / 1.75) + (1 - 2 * 0.5 / 2.25)) / 2  # U0 = 0.25+1+0.5, U1 = 0.75+0.5+1
    l12 = (LN(2) - (0.5 * LN(0.75) + 0.5 * LN(0.25))) / 2
    l21 = (-(0.5 * LN(0.25) + 0.5 * LN(0.75)) + LN(2)) / 2
    assert total.item() == pytest.approx(ce1 + dice1 + ce2 + dice2 + 0.5 * (l12 + l21), rel=1e-6)
    assert diagnostics["loss/ce/s1"].item() == pytest.approx(ce1, rel=1e-6)
    assert diagnostics["loss/dice/s2"].item() == pytest.approx(dice2, rel=1e-6)
    assert diagnostics["loss/consistency"].item() == pytest.approx(l12 + l21, rel=1e-6)
    assert diagnostics["s1/selected_share"].item() == 1.0
    assert diagnostics["selection/ratio"].item() == 1.0


def test_selection_weights_and_consistency_weights_follow_the_spec_composition():
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    y = torch.randint(0, 4, (2, 8, 8), generator=generator)
    y[0, 0] = NODATA
    loss = CromSSLoss(smoothing_factors=(), classes=4, ramp_length=10, consistency="ce")
    epoch = 12  # after the ramp: rho = 0.5, v = entangled prediction confidence
    maps = loss.selection_maps(z1, z2, y, epoch)
    w1, w2 = maps.weights
    c1, c2 = entangle(label_confidence(z1, y), label_confidence(z2, y))
    torch.testing.assert_close(maps.trust, (c1, c2))
    torch.testing.assert_close(w1, selection_weights(c1, y, 0.5, 4))
    torch.testing.assert_close(w2, selection_weights(c2, y, 0.5, 4))
    v1, v2 = entangle(prediction_confidence(z1), prediction_confidence(z2))
    labelled = (y != NODATA).float()
    log_p1, log_p2 = z1.log_softmax(1), z2.log_softmax(1)
    onehot = torch.nn.functional.one_hot(y.clamp(max=3), 4).permute(0, 3, 1, 2).float() * labelled[:, None]
    expected = (
        weighted_cross_entropy(log_p1, onehot, w1)
        + weighted_dice(log_p1.exp(), onehot, w1)
        + weighted_cross_entropy(log_p2, onehot, w2)
        + weighted_dice(log_p2.exp(), onehot, w2)
        + consistency_loss(log_p1, log_p2, v1 * labelled, v2 * labelled, "ce")
    )
    total, diagnostics = loss(z1, z2, y, epoch=epoch)
    torch.testing.assert_close(total, expected)
    assert diagnostics["selection/ratio"].item() == 0.5
    labelled_w1 = w1[y != NODATA]
    assert diagnostics["s1/selected_share"].item() == pytest.approx((labelled_w1 == 1).float().mean().item())
    assert diagnostics["s1/weight_mean"].item() == pytest.approx(labelled_w1.mean().item(), rel=1e-6)


def test_no_gradient_flows_through_confidences_or_weights():
    generator = torch.Generator().manual_seed(1)
    z1 = torch.randn(2, 3, 6, 6, generator=generator, requires_grad=True)
    z2 = torch.randn(2, 3, 6, 6, generator=generator, requires_grad=True)
    y = torch.randint(0, 3, (2, 6, 6), generator=generator)
    loss = CromSSLoss(smoothing_factors=(0.1,), classes=3, ramp_length=4)
    total, _ = loss(z1, z2, y, epoch=2)
    grads = torch.autograd.grad(total, (z1, z2))
    # the same objective with weights computed on detached copies as constants
    w1, w2 = loss.selection_maps(z1.detach(), z2.detach(), y, 2).weights
    c1, c2 = entangle(prediction_confidence(z1), prediction_confidence(z2))
    r = math.exp(-5 * (1 - 2 / 4) ** 2)
    v1, v2 = (1 - r) + r * c1, (1 - r) + r * c2
    target = 0.9 * torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() + 0.1 / 3
    log_p1, log_p2 = z1.log_softmax(1), z2.log_softmax(1)
    reference = (
        weighted_cross_entropy(log_p1, target, w1)
        + weighted_dice(log_p1.exp(), target, w1)
        + weighted_cross_entropy(log_p2, target, w2)
        + weighted_dice(log_p2.exp(), target, w2)
        + consistency_loss(log_p1, log_p2, v1, v2, "ce")
    )
    torch.testing.assert_close(total, reference)
    for got, expected in zip(grads, torch.autograd.grad(reference, (z1, z2))):
        torch.testing.assert_close(got, expected)


def test_ignored_pixels_are_left_out_of_every_term():
    generator = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(1, 3, 4, 4, generator=generator), torch.randn(1, 3, 4, 4, generator=generator)
    y = torch.randint(0, 3, (1, 4, 4), generator=generator)
    prior = smoothing_prior(torch.randint(0, 3, (1, 4, 4, 4), generator=generator), 0, classes=3)
    y_ignored = y.clone()
    y_ignored[0, :, 2:] = NODATA
    # changing the logits of ignored pixels must not change the loss
    z1_changed, z2_changed = z1.clone(), z2.clone()
    z1_changed[0, :, :, 2:] += 5.0
    z2_changed[0, :, :, 2:] -= 3.0
    loss = CromSSLoss(loss_terms="cdf", classes=3)
    for call in (lambda a, b: loss(a, b, y_ignored, prior, epoch=3)[0], lambda a, b: loss.evaluate(a, b, y_ignored)[0]):
        torch.testing.assert_close(call(z1, z2), call(z1_changed, z2_changed))


def test_validation_loss_is_unweighted_and_unsmoothed():
    generator = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    y = torch.randint(0, 3, (2, 4, 4), generator=generator)
    loss = CromSSLoss(classes=3, consistency="kl")
    plain = CromSSLoss(classes=3, consistency="kl", smoothing_factors=(), selection=False)
    validation, terms = loss.evaluate(z1, z2, y)
    torch.testing.assert_close(validation, plain(z1, z2, y)[0])
    assert set(terms) == {"loss/ce/s1", "loss/dice/s1", "loss/ce/s2", "loss/dice/s2", "loss/consistency"}


def test_two_smoothing_factors_without_prior_use_the_uniform_prior():
    generator = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(2, 1, 2, 4, 4, generator=generator)
    y = torch.randint(0, 2, (1, 4, 4), generator=generator)
    criterion = CromSSLoss(classes=2, selection=False)
    without_prior, _ = criterion(z1, z2, y)
    uniform, _ = criterion(z1, z2, y, prior=torch.full((1, 2, 4, 4), 0.5))
    sharp, _ = criterion(z1, z2, y, prior=torch.nn.functional.one_hot(1 - y, 2).permute(0, 3, 1, 2).float())
    assert float(without_prior) == pytest.approx(float(uniform), abs=1e-6)
    assert float(sharp) != pytest.approx(float(uniform), abs=1e-3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss_terms": "cx"}, "loss_terms"),
        ({"loss_terms": ""}, "loss_terms"),
        ({"consistency": "js"}, "consistency"),
        ({"ramp": "cosine"}, "ramp"),
        ({"confidence": "margin"}, "confidence"),
        ({"final_ratio": 1.2}, "final_ratio"),
        ({"smoothing_factors": (0.7, 0.7)}, "smoothing_factors"),
        ({"classes": 1}, "classes"),
    ],
)
def test_bad_loss_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        CromSSLoss(**options)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["ce", "kl", "mse"]),
    st.sampled_from(["ce", "gini"]),
    st.integers(0, 100),
    st.booleans(),
)
def test_loss_is_finite_for_extreme_logits_and_a_single_class_batch(seed, consistency, confidence, epoch, one_class):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 4, 5, 5)
    z1 = (torch.randint(0, 2, shape, generator=generator) * 2 - 1).float() * 1e4
    z2 = (torch.randint(0, 2, shape, generator=generator) * 2 - 1).float() * 1e4
    z1.requires_grad_()
    y = torch.full((2, 5, 5), 2) if one_class else torch.randint(0, 4, (2, 5, 5), generator=generator)
    prior = smoothing_prior(torch.randint(0, 4, (2, 4, 5, 5), generator=generator), 1, classes=4)
    loss = CromSSLoss(loss_terms="cdf", consistency=consistency, confidence=confidence, classes=4, ramp_length=50)
    total, diagnostics = loss(z1, z2, y, prior, epoch=epoch)
    assert math.isfinite(total.item())
    assert all(math.isfinite(value.item()) for value in diagnostics.values())
    total.backward()
    assert bool(torch.isfinite(z1.grad).all())
    assert math.isfinite(loss.evaluate(z1, z2, y)[0].item())


# Three classes, two labelled pixels and one ignored; class 2 is absent from the labels.
# Pixel a: p = (1/4, 1/2, 1/4), label 1; pixel b: p = (1/2, 1/4, 1/4), label 0. Logits are
# log-probabilities (softmax gives them back).
TRANSFER_LOGITS = _log_probs((0.25, 0.5, 0.25), (0.5, 0.25, 0.25), (0.9, 0.05, 0.05))
TRANSFER_LABELS = torch.tensor([[[1, 0, NODATA]]])
# Dice: class 0 I = 1/2, U = (1/4 + 1/2) + 1 = 7/4, loss 1 - 4/7 = 3/7; class 1 the same;
# class 2 has no target mass (loss 0) but counts: (3/7 + 3/7 + 0) / 3 = 2/7.
TRANSFER_DICE = 2 / 7
TRANSFER_CE = LN(2)  # -ln(1/2) at both labelled pixels
TRANSFER_FOCAL = (1 - 0.5) ** 2 * LN(2)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("ce", TRANSFER_CE),
        ("dice", TRANSFER_DICE),
        ("ce+dice", TRANSFER_CE + TRANSFER_DICE),
        ("focal", TRANSFER_FOCAL),
    ],
)
def test_transfer_losses_by_hand(kind: str, expected: float):
    loss = segmentation_loss(TRANSFER_LOGITS, TRANSFER_LABELS, kind, ignore_index=NODATA)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_transfer_cross_entropy_is_torchs_with_the_ignore_index():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=generator)
    labels = torch.randint(0, 4, (2, 5, 6), generator=generator)
    labels[0, :2] = NODATA
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=NODATA)
    assert float(segmentation_loss(logits, labels, "ce")) == pytest.approx(float(expected), rel=1e-5)


def test_unknown_transfer_loss_is_named():
    with pytest.raises(ValueError, match=r"segmentation loss must be one of .*'ce\+dice'.*got 'bce'"):
        segmentation_loss(TRANSFER_LOGITS, TRANSFER_LABELS, "bce")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["ce", "dice", "ce+dice", "focal"]),
    scale=st.floats(0.0, 50.0),
)
def test_transfer_losses_ignore_what_ignored_pixels_predict(seed: int, kind: str, scale: float):
    """Ignored pixels leave every loss and its gradient alone, and losses are finite and non-negative."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (2, 4, 4), generator=generator)
    labels[:, 0] = NODATA
    other = logits.clone()
    other[:, :, 0] = scale * torch.randn(2, 3, 4, generator=generator)
    other.requires_grad_(True)
    loss = segmentation_loss(other, labels, kind)
    loss.backward()
    value = float(loss.detach())
    assert math.isfinite(value) and value >= 0.0
    assert value == pytest.approx(float(segmentation_loss(logits, labels, kind)), rel=1e-5, abs=1e-7)
    assert torch.count_nonzero(other.grad[:, :, 0]) == 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_confident_correct_predictions_approach_zero_dice_and_focal_stays_below_cross_entropy(seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (1, 4, 4), generator=generator)
    perfect = 30.0 * torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
    assert float(segmentation_loss(perfect, labels, "dice")) < 1e-6
    logits = torch.randn(1, 3, 4, 4, generator=generator)
    assert float(segmentation_loss(logits, labels, "focal")) <= float(segmentation_loss(logits, labels, "ce"))


def test_single_modality_loss_is_the_unweighted_unsmoothed_segmentation_terms_by_hand():
    # LOG_P1 plus a third pixel without a label: its logits must change nothing
    z = torch.cat([LOG_P1, torch.tensor([9.0, -9.0]).view(1, 2, 1, 1)], dim=-1)
    y = torch.tensor([[[0, 1, NODATA]]])
    criterion = SingleModalityLoss("s2", loss_terms="cd", classes=2)
    total, diagnostics, maps = criterion.forward_with_selection(z, y, prior=torch.full((1, 2, 1, 3), 0.5), epoch=7)
    ce = (LN(2) + LN(4)) / 2
    dice = ((1 - 2 * 0.5 / 2.25) + (1 - 2 * 0.25 / 1.75)) / 2  # as in the assembled two-branch test, w = 1
    assert total.item() == pytest.approx(ce + dice, rel=1e-6)
    assert diagnostics["loss/ce/s2"].item() == pytest.approx(ce, rel=1e-6)
    assert diagnostics["loss/dice/s2"].item() == pytest.approx(dice, rel=1e-6)
    assert diagnostics["s2/confidence_label"].item() == pytest.approx((0.5 + 0.25) / 2, rel=1e-6)
    assert diagnostics["s2/selected_share"].item() == 1.0 and diagnostics["selection/ratio"].item() == 1.0
    assert not any(key.startswith("s1/") or key == "loss/consistency" for key in diagnostics)
    # trust: the branch's own label confidence p_y; weights: 1 where labelled
    torch.testing.assert_close(maps.trust, (torch.tensor([[[0.5, 0.25, 0.0]]]),))
    torch.testing.assert_close(maps.weights, (torch.tensor([[[1.0, 1.0, 0.0]]]),))
    torch.testing.assert_close(criterion.selection_maps(z, y), maps)
    torch.testing.assert_close(criterion.evaluate(z, y)[0], total)


def test_single_modality_loss_equals_one_branch_of_cromss_without_selection_or_smoothing():
    generator = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(2, 2, 3, 8, 8, generator=generator)
    y = torch.randint(0, 3, (2, 8, 8), generator=generator)
    y[1, :2] = NODATA
    plain = CromSSLoss(loss_terms="cdf", consistency="none", smoothing_factors=(), selection=False, classes=3)
    _, terms = plain(z1, z2, y)
    single, single_terms = SingleModalityLoss("s1", loss_terms="cdf", classes=3)(z1, y)
    torch.testing.assert_close(single, terms["loss/ce/s1"] + terms["loss/dice/s1"] + terms["loss/focal/s1"])
    assert set(single_terms) >= {"loss/ce/s1", "loss/dice/s1", "loss/focal/s1"}
    with pytest.raises(ValueError, match="modality"):
        SingleModalityLoss("s12")
