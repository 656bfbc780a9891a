"""Smoke test of ``bench/data_pipeline.py`` at toy size: the report's sections and rows, never its timings."""

from __future__ import annotations

import json

import pytest

from bench import data_pipeline

PIPELINES = (
    "reference_style",
    "cromss_prior_on_device",
    "cromss_rotation_on_this_cpu",
    "cromss_prior_on_cpu",
    "cromss_checksums_only_prior_on_device",
    "cromss_unchecked_prior_on_device",
)


def test_repeated_runs_report_medians_ranges_and_load(tmp_path):
    report_path = tmp_path / "pipeline.json"
    flags = ["--locations", "2", "--size", "40", "--crop", "32", "--repeats", "1", "--runs", "2"]
    assert data_pipeline.main([*flags, "--json", str(report_path)]) == 0

    sections = json.loads(report_path.read_text())["sections"]
    assert list(sections) == ["machine", "shards", "repeats", *PIPELINES, "prior_after_rotation"]
    assert sections["repeats"]["runs"] == 2 and sections["repeats"]["timed_passes_per_run"] == 1
    assert len(sections["repeats"]["load_average_1min_at_starts"].split(", ")) == 2
    assert sections["reference_style"]["samples_per_pass"] == 2
    assert sections["reference_style"]["samples_per_cpu_s_range"].endswith("over 2 runs")
    assert "speedup_per_core_x" not in sections["reference_style"]
    for name in PIPELINES[1:]:
        assert sections[name]["speedup_per_core_x"] > 0
        assert sections[name]["speedup_per_core_x_range"].endswith("over 2 runs")
    assert {"read_checks_cost_pct", "checksums_cost_pct"} == {
        key for section in sections.values() for key in section if key.endswith("_cost_pct")
    }


def test_median_over_runs_and_the_ratio_per_run():
    runs = [
        {"ref": {"samples_per_pass": 4, "samples_per_cpu_s": 10.0, "samples_per_wall_s": 5.0},
         "fast": {"samples_per_pass": 4, "samples_per_cpu_s": 80.0, "samples_per_wall_s": 40.0}},
        {"ref": {"samples_per_pass": 4, "samples_per_cpu_s": 20.0, "samples_per_wall_s": 6.0},
         "fast": {"samples_per_pass": 4, "samples_per_cpu_s": 100.0, "samples_per_wall_s": 50.0}},
        {"ref": {"samples_per_pass": 4, "samples_per_cpu_s": 12.0, "samples_per_wall_s": 7.0},
         "fast": {"samples_per_pass": 4, "samples_per_cpu_s": 120.0, "samples_per_wall_s": 60.0}},
    ]
    sections = data_pipeline.summarise_runs(runs, "ref")
    assert sections["ref"]["samples_per_cpu_s"] == 12.0
    assert sections["ref"]["samples_per_cpu_s_range"] == "10 .. 20 over 3 runs"
    # Ratios per run 8, 5 and 10: the median is 8, not the ratio of the medians (100 / 12).
    assert sections["fast"]["speedup_per_core_x"] == 8.0
    assert sections["fast"]["speedup_per_core_x_range"] == "5 .. 10 over 3 runs"
    assert sections["fast"]["samples_per_wall_s"] == 50.0


@pytest.mark.parametrize("flags", [["--runs", "0"], ["--repeats", "0"]])
def test_run_and_repeat_counts_must_be_positive(flags):
    with pytest.raises(SystemExit, match="both must be at least 1"):
        data_pipeline.main(flags)
