"""Smoke test of ``bench/noise_robustness.py`` at its tiniest size: the report's sections and rows.

The scores of a one-epoch run on four 32 px locations mean nothing; only their presence
and range are checked. The noisy-label reference is checked where it is exact.
"""

from __future__ import annotations

import json

import pytest

from bench import noise_robustness
from cromss_ray.data.synth import synthesize

PRETRAIN_ROWS = {
    "noisy_labels.miou_pct",
    "s2_only.s2_miou_pct",
    "s2_only.frozen_miou_pct",
    "s2_only.finetuned_miou_pct",
    "mid.cromss.s2_miou_pct",
    "mid.cromss.fused_miou_pct",
    "mid.cromss.frozen_miou_pct",
    "mid.cromss.finetuned_miou_pct",
}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    report_path = tmp_path_factory.mktemp("noise-bench") / "report.json"
    flags = ["--quick", "--variants", "s2_only", "cromss", "--threads", "1", "--json", str(report_path)]
    code = noise_robustness.main(flags)
    assert code == 0
    return json.loads(report_path.read_text())


def test_report_has_a_section_per_noise_rate_and_the_random_baseline(quick_report):
    report = quick_report
    sections = report["sections"]
    assert list(sections) == ["machine", "setup", "noise 0.3", "random_init", "timing"]
    assert set(sections["noise 0.3"]) == PRETRAIN_ROWS
    assert set(sections["random_init"]) == {"frozen_miou_pct", "finetuned_miou_pct"}
    assert sections["setup"]["achieved_noise_rates"] == "0.3: 0.3000"


def test_every_run_is_recorded_with_scores_in_range(quick_report):
    report = quick_report
    assert report["complete"] is True
    runs = report["runs"]
    expected = [("-", "s2_only"), ("mid", "cromss"), ("-", "random_init")]
    assert [(run["fusion"], run["variant"]) for run in runs] == expected
    for run in runs:
        scores = [run[key] for key in ("s1_miou", "s2_miou", "fused_miou", "frozen_miou", "finetuned_miou")]
        assert all(score is None or 0.0 <= score <= 1.0 for score in scores)
    assert runs[1]["s1_miou"] is not None and runs[0]["s1_miou"] is None
    assert runs[0]["s2_miou"] is not None and runs[2]["s2_miou"] is None


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
    first = noise_robustness.RunResult(0.2, 1, "late", "cromss", 0.1, 0.2, 0.3, 0.4, 0.5, 6.0)
    noise_robustness.progress([first], path)
    second = noise_robustness.RunResult(-1.0, 1, "-", "random_init", None, None, None, 0.25, 0.5, 2.0)
    noise_robustness.progress([first, second], path)

    written = json.loads(path.read_text())
    assert written["complete"] is False
    assert [run["variant"] for run in written["runs"]] == ["cromss", "random_init"]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[noise_robustness] seed 1 noise 0.2 late/cromss: s2 0.200, fused 0.300, frozen 0.400, finetuned 0.500 (6 s)",
        "[noise_robustness] seed 1 random init: frozen 0.250, finetuned 0.500 (2 s)",
    ]


def test_summary_is_mean_and_sample_std_over_seeds():
    assert noise_robustness.summarise([0.5, 0.7, None]) == "60.00 ± 14.14 (n=2)"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--size", "40"], "--size 40: must be a positive multiple of 32"),
        (["--noise-rates", "0.2", "1.5"], r"--noise-rates \[0.2, 1.5\]: every rate must lie in \[0, 1\]"),
        (["--epochs", "0"], "must be at least 1"),
    ],
)
def test_bad_sizes_are_rejected_before_any_work(flags, message):
    with pytest.raises(SystemExit, match=message):
        noise_robustness.main(flags)
