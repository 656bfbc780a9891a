"""Noise diagnostics of sample selection: scores worked by hand, exact merging, AUROC against a pairwise count."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cromss_ray.method import CromSSLoss, NoiseDiagnostics, entangle, label_confidence

NODATA = 255


def _diagnostics(noisy, clean, weights, trust, classes=3, bits=4) -> dict[str, float]:
    diagnostics = NoiseDiagnostics(classes, NODATA, bits=bits)
    diagnostics.update(torch.tensor(noisy), torch.tensor(clean), torch.tensor(weights), torch.tensor(trust))
    return diagnostics.compute()


def test_scores_by_hand_with_a_tie_and_no_data_pixels():
    # Pixels 0-4 count; pixel 5 has no noisy label, pixel 6 no clean label: both are left out.
    # Corrupted (noisy != clean): pixels 0, 1 with trust 0.25, 0.5 and weights 0, 0.5.
    # Right: pixels 2, 3, 4 with trust 0.5, 0.75, 1.0 and weights 1, 1, 0.
    noisy = [0, 1, 2, 2, 1, NODATA, 0]
    clean = [1, 0, 2, 2, 1, 0, NODATA]
    weights = [0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0]
    trust = [0.25, 0.5, 0.5, 0.75, 1.0, 0.0, 0.0]
    scores = _diagnostics(noisy, clean, weights, trust)
    # Weight on right labels (1 + 1 + 0) over all weight (0 + 0.5 + 1 + 1 + 0).
    assert scores["selected_precision"] == pytest.approx(2 / 2.5)
    # Of the two corrupted pixels, pixel 0 alone has weight 0.
    assert scores["noise_recall"] == 0.5
    # Pairs (corrupted, right): 0.25 lies below all three right pixels (3); 0.5 ties 0.5 (1/2)
    # and lies below 0.75 and 1.0 (2): 5.5 of 6 pairs. Every trust is a multiple of 2^-4,
    # so the binned AUROC is the raw one; the tie is inside one bin: bound 0.5 / 6.
    assert scores["noise_auroc"] == 5.5 / 6
    assert scores["noise_auroc_bin_bound"] == 0.5 / 6
    assert scores["base_rate"] == 3 / 5
    assert (scores["pixels"], scores["corrupted_pixels"]) == (5.0, 2.0)


def test_precision_recall_curve_by_hand():
    # The pixels of the hand-worked case above, trust bins of 2^-4: 0.25 holds one corrupted pixel,
    # 0.5 one corrupted and one right, 0.75 and 1.0 one right each; the no-data pixels are left out.
    diagnostics = NoiseDiagnostics(3, NODATA, bits=4)
    diagnostics.update(
        torch.tensor([0, 1, 2, 2, 1, NODATA, 0]),
        torch.tensor([1, 0, 2, 2, 1, 0, NODATA]),
        torch.zeros(7),
        torch.tensor([0.25, 0.5, 0.5, 0.75, 1.0, 0.0, 0.0]),
    )
    precision, recall = diagnostics.precision_recall()
    # Flagging trust <= 0.25: 1 of 1 corrupted; <= 0.5: 2 of 3; <= 0.75: 2 of 4; all: 2 of 5.
    assert precision.tolist() == [1.0, 2 / 3, 0.5, 0.4]
    assert recall.tolist() == [0.5, 1.0, 1.0, 1.0]
    clean_only = NoiseDiagnostics(3, NODATA, bits=4)
    clean_only.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2), torch.tensor([0.5, 1.0]))
    assert [curve.numel() for curve in clean_only.precision_recall()] == [0, 0]


def test_a_perfect_and_a_reversed_detector():
    # Corrupted pixels all below the right ones: AUROC 1; all above: 0.
    noisy, clean, weights = [0, 0, 1, 1], [1, 1, 1, 1], [0.0, 0.0, 1.0, 1.0]
    assert _diagnostics(noisy, clean, weights, [0.0, 0.125, 0.5, 0.875])["noise_auroc"] == 1.0
    assert _diagnostics(noisy, clean, weights, [0.5, 0.875, 0.0, 0.125])["noise_auroc"] == 0.0


def test_all_labels_right():
    # Base rate 1 and all weight on right labels; no corrupted pixel: recall and AUROC are NaN.
    scores = _diagnostics([0, 1, 2], [0, 1, 2], [1.0, 0.5, 0.0], [0.5, 0.25, 0.0])
    assert (scores["base_rate"], scores["selected_precision"], scores["corrupted_pixels"]) == (1.0, 1.0, 0.0)
    assert math.isnan(scores["noise_recall"]) and math.isnan(scores["noise_auroc"])
    assert math.isnan(scores["noise_auroc_bin_bound"])


def test_no_label_right():
    # Base rate 0, no weight on right labels: precision 0; 2 of 3 corrupted pixels at weight 0;
    # no right pixel to rank against: AUROC NaN.
    scores = _diagnostics([0, 1, 2], [1, 2, 0], [1.0, 0.0, 0.0], [0.5, 0.25, 0.0])
    assert (scores["base_rate"], scores["selected_precision"]) == (0.0, 0.0)
    assert scores["noise_recall"] == 2 / 3
    assert math.isnan(scores["noise_auroc"])


def test_no_weight_and_no_pixels_give_nan():
    no_weight = _diagnostics([0, 1], [0, 0], [0.0, 0.0], [0.5, 0.5])
    assert math.isnan(no_weight["selected_precision"]) and no_weight["noise_recall"] == 1.0
    empty = NoiseDiagnostics(3).compute()
    assert empty["pixels"] == 0.0
    assert all(math.isnan(empty[key]) for key in ("selected_precision", "noise_recall", "noise_auroc", "base_rate"))


def test_trust_within_one_bin_ties_and_the_bound_covers_the_raw_auroc():
    # bits = 2: bins [0, .25), [.25, .5), [.5, .75), [.75, 1]. Corrupted trust 0.3 and right
    # trust 0.4 share bin 1: a tie, 1/2, where the raw trust ranks them right (1).
    # Trust 1.0 joins bin 3 with 0.8: corrupted 0.8 and right 1.0 tie as well.
    scores = _diagnostics([0, 1], [1, 1], [1.0, 1.0], [0.3, 0.4], bits=2)
    assert (scores["noise_auroc"], scores["noise_auroc_bin_bound"]) == (0.5, 0.5)
    assert _diagnostics([0, 1], [1, 1], [1.0, 1.0], [0.8, 1.0], bits=2)["noise_auroc"] == 0.5
    # NaN and values outside [0, 1] are clamped: NaN and -1 fall in bin 0, 2 in the top bin.
    bins = NoiseDiagnostics(3, bits=2).trust_bins(torch.tensor([math.nan, -1.0, 0.0, 0.2499, 0.25, 0.9, 1.0, 2.0]))
    assert bins.tolist() == [0, 0, 0, 0, 1, 3, 3, 3]


def test_shapes_must_agree_and_merging_needs_the_same_grid():
    diagnostics = NoiseDiagnostics(3)
    with pytest.raises(ValueError, match=r"noisy \(2,\), clean \(3,\)"):
        diagnostics.update(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"cannot merge .* \(3, 255, 8\) into \(3, 255, 16\)"):
        diagnostics.merge(NoiseDiagnostics(3, bits=8))
    with pytest.raises(ValueError, match="bits must lie in 1 .. 24"):
        NoiseDiagnostics(3, bits=30)


def _pairwise_auroc(trust: list[float], corrupted: list[bool]) -> Fraction:
    """AUROC by definition: over all (corrupted, right) pairs, 1 if the corrupted trust is lower, 1/2 if equal."""
    low = [t for t, bad in zip(trust, corrupted) if bad]
    high = [t for t, bad in zip(trust, corrupted) if not bad]
    score = sum(Fraction(int(a < b) * 2 + int(a == b), 2) for a in low for b in high)
    return score / (len(low) * len(high))


@st.composite
def _pixels(draw, bits: int = 4):
    """Labels (some no-data), weights (some 0) and trust: on the 2^-bits grid below 1 or any float32 in [0, 1]."""
    size = draw(st.integers(1, 60))
    labels = st.lists(st.sampled_from([0, 1, 2, NODATA]), min_size=size, max_size=size)
    on_grid = draw(st.booleans())
    value = st.integers(0, 2**bits - 1).map(lambda k: k / 2**bits) if on_grid else st.floats(0, 1, width=32)
    weights = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0]), min_size=size, max_size=size))
    trust = draw(st.lists(value, min_size=size, max_size=size))
    return (
        torch.tensor(draw(labels)),
        torch.tensor(draw(labels)),
        torch.tensor(weights),
        torch.tensor(trust, dtype=torch.float32),
        on_grid,
    )


@settings(max_examples=200, deadline=None)
@given(_pixels())
def test_auroc_equals_the_pairwise_count_over_the_binned_trust(case):
    noisy, clean, weights, trust, on_grid = case
    diagnostics = NoiseDiagnostics(3, NODATA, bits=4)
    diagnostics.update(noisy, clean, weights, trust)
    scores = diagnostics.compute()
    valid = (noisy != NODATA) & (clean != NODATA)
    corrupted = (noisy != clean)[valid].tolist()
    binned = diagnostics.trust_bins(trust)[valid].tolist()
    if all(corrupted) or not any(corrupted):
        assert math.isnan(scores["noise_auroc"])
        return
    assert scores["noise_auroc"] == float(_pairwise_auroc(binned, corrupted))
    raw = _pairwise_auroc(trust[valid].tolist(), corrupted)
    assert abs(float(raw) - scores["noise_auroc"]) <= scores["noise_auroc_bin_bound"] + 1e-12
    if on_grid:
        assert scores["noise_auroc"] == float(raw)


@settings(max_examples=150, deadline=None)
@given(_pixels(), st.data())
def test_two_halves_merged_or_all_reduced_equal_the_whole(case, data):
    noisy, clean, weights, trust, _ = case
    cut = data.draw(st.integers(0, noisy.numel()))
    whole, first, second = (NoiseDiagnostics(3, NODATA, bits=4) for _ in range(3))
    whole.update(noisy, clean, weights, trust)
    first.update(noisy[:cut], clean[:cut], weights[:cut], trust[:cut])
    second.update(noisy[cut:], clean[cut:], weights[cut:], trust[cut:])
    reduced = NoiseDiagnostics(3, NODATA, bits=4)
    reduced.update(noisy[:cut], clean[:cut], weights[:cut], trust[:cut])
    addends = iter(second.state.values())  # all_reduce visits the state in its order, as a sum over ranks would
    reduced.all_reduce(lambda tensor: tensor + next(addends))
    first.merge(second)
    for merged in (first, reduced):
        assert torch.equal(merged.trust_histogram, whole.trust_histogram)
        assert torch.equal(merged.zero_weight_corrupted, whole.zero_weight_corrupted)
        torch.testing.assert_close(merged.weight_sums, whole.weight_sums)
        expected, scores = whole.compute(), merged.compute()
        for key in ("noise_auroc", "noise_recall", "base_rate", "pixels", "corrupted_pixels"):
            assert scores[key] == expected[key] or (math.isnan(scores[key]) and math.isnan(expected[key]))


def test_reset_starts_a_new_epoch():
    diagnostics = NoiseDiagnostics(3)
    diagnostics.update(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.1]))
    diagnostics.reset()
    assert diagnostics.compute()["pixels"] == 0.0


def test_the_loss_exposes_the_trust_and_weights_it_used_without_changing_the_loss():
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, 2, 3, 4, 4).unbind(0)
    y = torch.randint(0, 3, (2, 4, 4))
    y[0, 0, 0] = NODATA
    criterion = CromSSLoss(classes=3, ignore_index=NODATA, ramp_length=4)
    loss, diagnostics = criterion(z1, z2, y, epoch=2)
    same_loss, same_diagnostics, maps = criterion.forward_with_selection(z1, z2, y, epoch=2)
    assert torch.equal(loss, same_loss) and same_diagnostics.keys() == diagnostics.keys()
    labels = torch.where(y == NODATA, -1, y)
    for trust, expected in zip(maps.trust, entangle(label_confidence(z1, labels), label_confidence(z2, labels))):
        assert torch.equal(trust, expected)
    alone = criterion.selection_maps(z1, z2, y, epoch=2)
    for computed, expected in zip((*maps.trust, *maps.weights), (*alone.trust, *alone.weights)):
        assert torch.equal(computed, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_cuda_waits_for_nothing_and_matches_the_cpu():
    generator = torch.Generator().manual_seed(3)
    noisy, clean = torch.randint(0, 4, (2, 2, 64, 64), generator=generator).unbind(0)
    weights, trust = torch.rand(2, 2, 64, 64, generator=generator).unbind(0)
    on_cpu, on_cuda = NoiseDiagnostics(3, NODATA), NoiseDiagnostics(3, NODATA, device="cuda")
    on_cpu.update(noisy, clean, weights, trust)
    inputs = [tensor.cuda() for tensor in (noisy, clean, weights, trust)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_cuda.update(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(on_cuda.trust_histogram.cpu(), on_cpu.trust_histogram)
    assert on_cuda.compute()["noise_auroc"] == on_cpu.compute()["noise_auroc"]
