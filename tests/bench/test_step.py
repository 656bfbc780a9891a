"""Smoke test of ``bench/step.py`` at its tiniest size: the report's sections and rows, never its timings."""

from __future__ import annotations

import json

import pytest
import torch

from bench import step

FUSION_ROWS = {
    "images_per_s",
    "step_ms",
    "step_spread",
    "network_ms",
    "objective_ms",
    "objective_share_pct",
    "prior_ms",
    "weights_ms",
    "loss_terms_ms",
    "noise_diagnostics_ms",
    "noise_diagnostics_share_pct",
    "model_gflop_per_step",
    "model_gflop_per_image",
    "achieved_tflop_per_s",
    "mfu_pct",
    "step_cpu_s",
    "images_per_cpu_s",
    "objective_share_cpu_pct",
    "noise_diagnostics_share_cpu_pct",
}


def test_quick_report_lists_every_row_for_both_fusions(tmp_path, capsys):
    report_path = tmp_path / "step.json"
    code = step.main(["--quick", "--device", "cpu", "--threads", "1", "--peak-tflops", "1", "--json", str(report_path)])

    assert code == 0
    printed = capsys.readouterr().out
    sections = json.loads(report_path.read_text())["sections"]
    assert list(sections) == ["machine", "setup", "mid", "late"]
    assert sections["setup"]["size_px"] == 32 and sections["setup"]["encoder"] == "resnet18"
    for fusion in ("mid", "late"):
        assert set(sections[fusion]) == FUSION_ROWS
        assert f"[{fusion}]" in printed
    for key in FUSION_ROWS:
        assert f"  {key} " in printed
    # Both fusions run two encoders and the decoder twice: the same model FLOPs.
    assert sections["mid"]["model_gflop_per_step"] == sections["late"]["model_gflop_per_step"] > 0
    assert sections["mid"]["model_gflop_per_image"] == pytest.approx(sections["mid"]["model_gflop_per_step"] / 2)


def test_size_must_be_a_multiple_of_the_output_stride():
    with pytest.raises(SystemExit, match="--size 48: must be a positive multiple of 32"):
        step.main(["--device", "cpu", "--size", "48", "--fusion", "mid"])


def test_thread_count_must_be_positive():
    with pytest.raises(SystemExit, match="--threads 0: must be at least 1"):
        step.main(["--quick", "--threads", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="--device cuda: this machine has no CUDA device"):
        step.main(["--quick", "--device", "cuda"])
