"""``bench/noise_robustness.py``: the peak / final logic and the t-interval on hand-worked curves,
the paired summary, and the JSON report of a two-epoch smoke run.

The scores of the smoke run (four 32 px locations, two epochs) mean nothing; only their
presence, shape and range are checked. The noisy-label reference is checked where it is exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench import noise_robustness
from bench.noise_robustness import PeakFinal, RunResult, peak_and_final, t_interval
from cromss_ray.data.synth import synthesize

T_975_DF2 = 4.3027
"""Student's t quantile 0.975 with 2 degrees of freedom, from a printed table."""
T_975_DF1 = 12.7062


def test_peak_and_final_of_a_curve_that_rises_then_falls():
    # Trailing means of 2: 0.2, 0.4, 0.45, 0.3, 0.2 ending at epochs 2..6.
    scores = peak_and_final([0.1, 0.3, 0.5, 0.4, 0.2, 0.2], window=2)
    assert scores.peak == pytest.approx(0.45)
    assert scores.peak_epoch == 4
    assert scores.final == pytest.approx(0.2)
    assert scores.drop == pytest.approx(-0.25)


def test_a_rising_curve_peaks_at_its_end_with_no_drop():
    scores = peak_and_final([0.1, 0.2, 0.3, 0.4], window=3)
    assert scores == PeakFinal(pytest.approx(0.3), 4, pytest.approx(0.3))
    assert scores.drop == pytest.approx(0.0)


def test_the_first_of_equal_maxima_is_the_peak_and_a_short_curve_is_averaged_whole():
    assert peak_and_final([0.5, 0.1, 0.5, 0.1], window=1) == PeakFinal(0.5, 1, 0.1)
    assert peak_and_final([0.2, 0.4], window=5) == PeakFinal(pytest.approx(0.3), 2, pytest.approx(0.3))
    with pytest.raises(ValueError, match="empty curve"):
        peak_and_final([], window=3)


@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    st.integers(1, 8),
)
def test_the_peak_bounds_every_trailing_mean_and_the_drop_is_never_positive(values, window):
    scores = peak_and_final(values, window)
    width = min(window, len(values))
    means = [sum(values[end - width : end]) / width for end in range(width, len(values) + 1)]
    assert scores.peak == pytest.approx(max(means))
    assert scores.final == pytest.approx(means[-1])
    assert scores.drop <= 1e-12
    assert width <= scores.peak_epoch <= len(values)


def test_t_interval_of_three_differences():
    # mean 2, sample std 1, half width t(0.975, 2) * 1 / sqrt(3).
    interval = t_interval([1.0, 2.0, 3.0])
    half = T_975_DF2 / math.sqrt(3)
    assert interval.mean == pytest.approx(2.0)
    assert interval.low == pytest.approx(2.0 - half, rel=1e-4)
    assert interval.high == pytest.approx(2.0 + half, rel=1e-4)
    assert interval.n == 3


def test_t_interval_of_two_differences_and_of_one():
    # mean -0.1, sample std 0.1 * sqrt(2), half width t(0.975, 1) * 0.1.
    interval = t_interval([0.0, -0.2])
    assert (interval.low, interval.high) == (
        pytest.approx(-0.1 - 0.1 * T_975_DF1, rel=1e-4),
        pytest.approx(-0.1 + 0.1 * T_975_DF1, rel=1e-4),
    )
    single = t_interval([0.3])
    assert single.mean == 0.3 and math.isnan(single.low) and math.isnan(single.high) and single.n == 1


def test_every_multimodal_run_is_compared_with_the_baseline_and_each_variant_with_plain_multimodal():
    names = ["s2_only", "mid.multimodal", "mid.cromss", "late.multimodal", "late.selection"]
    assert noise_robustness.comparisons(names) == [
        ("mid.multimodal", "s2_only"),
        ("mid.cromss", "s2_only"),
        ("late.multimodal", "s2_only"),
        ("late.selection", "s2_only"),
        ("mid.cromss", "mid.multimodal"),
        ("late.selection", "late.multimodal"),
    ]
    assert noise_robustness.comparisons(["mid.cromss"]) == []


def curve(scores: list[float], auroc: float) -> list[dict[str, float]]:
    diagnostics = {"s2_selected_precision": 0.8, "s2_noise_recall": 0.1, "s2_noise_auroc": auroc, "s2_base_rate": 0.7}
    return [{"s2_clean_miou": score, **diagnostics} for score in scores]


def test_noise_section_pairs_runs_by_seed():
    # Window 1: peak = max, final = last. Baseline peaks 0.5 / 0.4 and ends 0.3 / 0.4;
    # CromSS peaks 0.5 / 0.6 and ends 0.5 / 0.5: paired differences peak 0 / +0.2,
    # final +0.2 / +0.1, final minus peak +0.2 / -0.1.
    results = [
        RunResult(0.4, 0, "-", "s2_only", curve([0.5, 0.3], 0.8)),
        RunResult(0.4, 1, "-", "s2_only", curve([0.4, 0.4], 0.9)),
        RunResult(0.4, 1, "mid", "cromss", curve([0.6, 0.5], 0.7)),
        RunResult(0.4, 0, "mid", "cromss", curve([0.5, 0.5], 0.7)),
    ]
    summary, paired = noise_robustness.noise_section(results, 0.385, window=1)
    assert summary["noisy_labels.miou_pct"] == "38.50"
    assert summary["s2_only.peak_pct"] == "45.00 ± 7.07 (n=2)"
    assert summary["s2_only.peak_epoch"] == "1.0"
    assert summary["s2_only.final_minus_peak_pct"] == "-10.00 ± 14.14 (n=2)"
    assert summary["mid.cromss.final_pct"] == "50.00 ± 0.00 (n=2)"
    assert summary["s2_only.s2_noise_auroc"] == "0.8500"
    assert summary["mid.cromss.s2_base_rate"] == "0.7000"
    # Peak: mean +10 pp, half width t(0.975, 1) * 0.1 * sqrt(2) / sqrt(2) = 127.06 pp.
    assert paired["mid.cromss - s2_only.peak_pp"] == "+10.00 [-117.06, +137.06] (n=2)"
    assert paired["mid.cromss - s2_only.final_pp"].startswith("+15.00 [")
    assert paired["mid.cromss - s2_only.final_minus_peak_pp"].startswith("+5.00 [")


QUICK_FLAGS = ["--quick", "--threads", "1", "--jobs", "2"]


@pytest.fixture(scope="module")
def quick_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("noise-bench")


@pytest.fixture(scope="module")
def quick_report(quick_work: Path) -> dict:
    """The quick comparison, its runs two at a time in worker processes."""
    report_path = quick_work / "report.json"
    flags = [*QUICK_FLAGS, "--work-dir", str(quick_work / "shards"), "--json", str(report_path)]
    assert noise_robustness.main(flags) == 0
    return json.loads(report_path.read_text())


def test_a_run_in_a_worker_process_gives_the_curve_it_gives_in_this_one(quick_report, quick_work: Path):
    args = noise_robustness.resolve_arguments(noise_robustness.build_parser().parse_args(QUICK_FLAGS))
    sizes = {"locations": args.locations, "heldout": args.heldout, "size": args.size}
    sets = noise_robustness.synthesize_sets(quick_work / "shards", args.noise_rates, **sizes)
    cromss = next(variant for variant in noise_robustness.MULTIMODAL_VARIANTS if variant.name == "cromss")
    spec = noise_robustness.RunSpec(0.3, 1, "mid", cromss)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = noise_robustness.run_one(spec, args, sets, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    [there] = [run for run in quick_report["runs"] if (run["seed"], run["variant"]) == (1, "cromss")]
    assert json.dumps(here.curve) == json.dumps(there["curve"])


def test_report_has_runs_paired_differences_and_timing(quick_report):
    sections = quick_report["sections"]
    assert list(sections) == ["machine", "setup", "noise 0.3", "noise 0.3 paired", "timing"]
    assert sections["setup"]["achieved_noise_rates"] == "0.3: 0.3000"
    assert sections["setup"]["setting"] == "cpu (quick)"
    runs = sections["noise 0.3"]
    for name in ("s2_only", "mid.multimodal", "mid.cromss"):
        for row in ("peak_pct", "peak_epoch", "final_pct", "final_minus_peak_pct", "s2_noise_auroc", "s2_base_rate"):
            assert f"{name}.{row}" in runs
    assert runs["mid.cromss.final_pct"].endswith("(n=2)")
    assert set(sections["noise 0.3 paired"]) == {
        f"{name} - {reference}.{metric}_pp"
        for name, reference in [
            ("mid.multimodal", "s2_only"),
            ("mid.cromss", "s2_only"),
            ("mid.cromss", "mid.multimodal"),
        ]
        for metric in ("peak", "final", "final_minus_peak")
    }
    assert set(sections["timing"]) == {"total_s"} | {
        f"{name}.{unit}" for name in ("s2_only", "mid.multimodal", "mid.cromss") for unit in ("epoch_s", "epoch_cpu_s")
    }


def test_every_run_keeps_its_per_epoch_curve(quick_report):
    assert quick_report["complete"] is True
    runs = quick_report["runs"]
    assert [(run["seed"], run["fusion"], run["variant"]) for run in runs] == [
        (seed, fusion, variant)
        for seed in (0, 1)
        for fusion, variant in [("-", "s2_only"), ("mid", "multimodal"), ("mid", "cromss")]
    ]
    diagnostics = {f"s2_{name}" for name in noise_robustness.DIAGNOSTICS}
    for run in runs:
        assert len(run["curve"]) == 2
        for epoch in run["curve"]:
            expected = {"s2_clean_miou"} | diagnostics
            if run["variant"] != "s2_only":
                expected |= {"fused_clean_miou"} | {f"s1_{name}" for name in noise_robustness.DIAGNOSTICS}
            assert set(epoch) == expected
            assert 0.0 <= epoch["s2_clean_miou"] <= 1.0
            assert 0.0 <= epoch["s2_base_rate"] <= 1.0
    baseline_epoch = runs[0]["curve"][0]
    assert baseline_epoch["s2_noise_recall"] == 0.0
    assert baseline_epoch["s2_selected_precision"] == pytest.approx(baseline_epoch["s2_base_rate"])


@pytest.mark.parametrize(("noise", "exact"), [(0.0, True), (0.3, False)])
def test_noisy_label_reference_scores_the_noise_against_the_truth(tmp_path, noise, exact):
    synthesize(tmp_path, "pretrain", locations=2, size=40, seed=5, noise_rate=noise)
    miou = noise_robustness.noisy_label_miou(noise_robustness.evaluation_shard(str(tmp_path), 32))
    if exact:
        assert miou == 1.0
    else:
        assert 0.0 < miou < 1.0


def test_each_finished_run_is_written_at_once(tmp_path, capsys):
    path = tmp_path / "partial.json"
    first = RunResult(0.2, 1, "late", "cromss", curve([0.1, 0.4, 0.2], 0.75), 6.0)
    noise_robustness.progress([first], 1, path)
    second = RunResult(0.2, 1, "-", "s2_only", curve([0.3], 0.5), 2.0)
    noise_robustness.progress([first, second], 1, path)

    written = json.loads(path.read_text())
    assert written["complete"] is False
    assert [run["variant"] for run in written["runs"]] == ["cromss", "s2_only"]
    assert written["runs"][0]["curve"][1]["s2_clean_miou"] == 0.4
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[noise_robustness] noise 0.2 seed 1 late.cromss: S2 clean mIoU peak 0.400 (epoch 2), final 0.200, "
        "S2 noise AUROC 0.750 (6 s)",
        "[noise_robustness] noise 0.2 seed 1 s2_only: S2 clean mIoU peak 0.300 (epoch 1), final 0.300, "
        "S2 noise AUROC 0.500 (2 s)",
    ]


def test_settings_fill_unset_sizes_and_flags_override_them():
    args = noise_robustness.resolve_arguments(noise_robustness.build_parser().parse_args(["--epochs", "7"]))
    cpu = noise_robustness.SETTINGS["cpu"]
    assert (args.epochs, args.locations, args.seeds) == (7, cpu.locations, list(cpu.seeds))
    assert args.fusions == ["mid", "late"]
    gpu = noise_robustness.build_parser().parse_args(["--setting", "gpu", "--fusions", "late"])
    resolved = noise_robustness.resolve_arguments(gpu)
    assert (resolved.noise_rates, resolved.fusions) == (list(noise_robustness.SETTINGS["gpu"].noise_rates), ["late"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--size", "40"], "--size 40: must be a positive multiple of 32"),
        (["--noise-rates", "0.2", "1.5"], r"--noise-rates \[0.2, 1.5\]: every rate must lie in \[0, 1\]"),
        (["--epochs", "0"], "must be at least 1"),
        (["--window", "0"], "must be at least 1"),
        (["--jobs", "0"], "--jobs 0: must be at least 1"),
        (["--seeds", "1", "1"], r"--seeds \[1, 1\]: the paired comparison needs distinct seeds"),
    ],
)
def test_bad_sizes_are_rejected_before_any_work(flags, message):
    with pytest.raises(SystemExit, match=message):
        noise_robustness.main(flags)
