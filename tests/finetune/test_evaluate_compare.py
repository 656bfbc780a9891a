"""``cromss evaluate`` and ``cromss compare`` on the session's transfer runs (spec 11)."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from finetune_helpers import ENCODER, PRETRAINED_BANDS, TEST_TILE, TILE, Pretrained, ResumedRun, Shards
from mlflow import MlflowClient

from cromss_ray.cli import main
from cromss_ray.data.device import to_device
from cromss_ray.data.schema import DW_CLASSES
from cromss_ray.data.storage import TileSet, scan_shards
from cromss_ray.data.transforms import band_indices
from cromss_ray.inference.evaluate import EvaluationResult, evaluate_model, format_evaluation
from cromss_ray.method import ConfusionMatrix, build_segmentation_model
from cromss_ray.models.scoring import score_tiles
from cromss_ray.models.segmenter import Segmenter
from cromss_ray.tracking.compare import (
    ComparisonRow,
    TransferScore,
    format_table,
    pretraining_label,
    summarise,
    to_csv,
)
from cromss_ray.train.finetune import FinetuneResult


def test_evaluation_reproduces_the_runs_test_scores(
    frozen_run: FinetuneResult, store: str, dw_shards: Shards, tmp_path: Path
):
    """The run trained and validated on 32 px crops but scored its 64 px test tiles whole, as
    ``cromss evaluate`` does: the same confusion matrix, so the same registered scores."""
    uri = f"models:/{frozen_run.registry_name}/{frozen_run.version}"
    result = evaluate_model(uri, str(dw_shards.test), tracking_uri=store)
    assert result.tiles == 3 and result.class_names == DW_CLASSES
    assert result.labelled_pixels > 3 * TILE * TILE, "whole 64 px tiles, not 32 px crops"
    client = MlflowClient(store, registry_uri=store)
    logged = json.loads(
        Path(client.download_artifacts(frozen_run.run_id, "confusion/test/s2.json", str(tmp_path))).read_text()
    )
    assert logged["matrix"] == result.scores["matrix"].tolist()
    tags = client.get_model_version(frozen_run.registry_name, str(frozen_run.version)).tags
    for key, value in result.metrics().items():
        assert value == pytest.approx(frozen_run.test_metrics[key], rel=1e-12, abs=1e-12), key
        assert float(tags[key]) == pytest.approx(value, rel=1e-5), key


def test_evaluate_command_prints_the_registered_test_scores(
    frozen_run: FinetuneResult, store: str, dw_shards: Shards, capsys: pytest.CaptureFixture[str]
):
    uri = f"models:/{frozen_run.registry_name}/{frozen_run.version}"
    assert main(["evaluate", "--model", uri, "--data", str(dw_shards.test), "--tracking-uri", store]) == 0
    names = ("oa", "miou", "mf1", "miou_ref", "mf1_ref")
    scores = {name: 100 * frozen_run.test_metrics[f"test/s2/{name}"] for name in names}
    out = capsys.readouterr().out
    assert f"OA {scores['oa']:.2f}  mIoU {scores['miou']:.2f}  mF1 {scores['mf1']:.2f}  (%)" in out
    assert f"mIoU {scores['miou_ref']:.2f}  mF1 {scores['mf1_ref']:.2f}  (%)" in out.splitlines()[-1]


def test_evaluate_command_prints_the_table(
    frozen_run: FinetuneResult, store: str, dw_shards: Shards, capsys: pytest.CaptureFixture[str]
):
    uri = f"models:/{frozen_run.registry_name}@latest"
    assert main(["evaluate", "--model", uri, "--data", str(dw_shards.test), "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "SSL4EO-S12@DW, 3 tiles" in out and "mIoU" in out
    assert all(name in out for name in DW_CLASSES)


def test_evaluate_refuses_shards_of_other_classes(
    frozen_run: FinetuneResult, store: str, dfc_shards: Shards, capsys: pytest.CaptureFixture[str]
):
    uri = f"models:/{frozen_run.registry_name}/{frozen_run.version}"
    assert main(["evaluate", "--model", uri, "--data", str(dfc_shards.test), "--tracking-uri", store]) == 1
    assert "classes" in capsys.readouterr().err


def test_pretrained_model_is_evaluated_fused_on_dw_classes(pretrained: Pretrained, store: str, dw_shards: Shards):
    result = evaluate_model(f"models:/{pretrained.name}@best", str(dw_shards.test), tracking_uri=store, tile=64)
    assert result.branch == "fused" and 0.0 <= result.scores["oa"] <= 1.0
    assert result.labelled_pixels == sum(int(row) for row in result.scores["matrix"].sum(dim=1))


def test_evaluate_checks_the_shards_as_training_does(
    pretrained: Pretrained, store: str, dw_shards: Shards, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A test split without its manifest, one row with a label outside the classes: refused unless allowed,
    then the bad row named, or skipped and reported."""
    shutil.copytree(dw_shards.test, tmp_path / "test")
    (tmp_path / "test" / "manifest.json").unlink()
    path = sorted((tmp_path / "test").glob("*.parquet"))[0]
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[1] = bytes([9]) + labels[1][1:]
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.binary()))
    pq.write_table(table, path, write_page_checksum=True)
    bad_id = table.column("id")[1].as_py()
    model = f"models:/{pretrained.name}@best"

    code = main(["evaluate", "--model", model, "--data", str(tmp_path / "test"), "--tracking-uri", store])
    assert code == 1 and "manifest.json: missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match=rf"row '{bad_id}', field 'label': values \[9\] outside 0..8"):
        evaluate_model(model, str(tmp_path / "test"), tracking_uri=store, tile=64, allow_incomplete=True)
    code = main(
        ["evaluate", "--model", model, "--data", str(tmp_path / "test"), "--tracking-uri", store, "--tile", "64",
         "--allow-incomplete", "--on-bad-row", "skip"]
    )
    captured = capsys.readouterr()
    assert code == 0 and f"skipped: {path}" in captured.err and f"row '{bad_id}'" in captured.err
    assert "2 tiles" in captured.out and "1 bad row skipped" in captured.out


def test_summary_and_table_by_hand():
    scores = [
        TransferScore("a", "dw", "CromSS mid", "m/1", "s2", "Unet", "frozen", 0.40, 0.50, 0.70),
        TransferScore("b", "dw", "CromSS mid", "m/1", "s2", "Unet", "frozen", 0.50, 0.60, 0.80),
        TransferScore("c", "dw", "CromSS mid", "m/1", "s2", "Unet", "fine-tuned", 0.55, 0.55, 0.82),
        TransferScore("d", "dw", "random init", "random", "s2", "FPN", "fine-tuned", 0.30, math.nan, 0.60),
    ]
    rows = summarise(scores)
    mean = ComparisonRow(
        "dw", "CromSS mid", "m/1", "s2", "Unet", "frozen", 2, pytest.approx(0.45), pytest.approx(0.55), pytest.approx(0.75)
    )
    assert rows[:2] == [mean, ComparisonRow("dw", "CromSS mid", "m/1", "s2", "Unet", "fine-tuned", 1, 0.55, 0.55, 0.82)]
    assert rows[2].miou == 0.30 and math.isnan(rows[2].miou_ref) and rows[2].oa == 0.60
    table = format_table(rows).splitlines()
    assert table[0].split() == [
        "dataset",
        "pretraining",
        "initialisation",
        "input",
        "FPN",
        "fine-tuned",
        "Unet",
        "frozen",
        "Unet",
        "fine-tuned",
    ]
    assert (
        "45.00 / 55.00 / 75.00 (n=2)" in table[2]
        and "55.00 / 55.00 / 82.00" in table[2]
        and table[2].startswith("SSL4EO-S12@DW  CromSS mid   m/1")
    )
    assert "30.00 / - / 60.00" in table[3]
    assert table[-1].startswith("cells: test mIoU / mIoU_ref")
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert parsed[0]["runs"] == "2" and float(parsed[0]["miou"]) == pytest.approx(0.45)
    assert float(parsed[0]["miou_ref"]) == pytest.approx(0.55)


def test_cromss_and_its_baselines_are_labelled_rows_of_one_table():
    """The paper's comparison (spec 11): CromSS mid and late, the single-modality baseline and random
    initialisation, labelled from each run's source tags and ordered CromSS first, whatever the names."""
    assert [pretraining_label(*tags) for tags in [("a/1", "mid"), ("b/2", "late"), ("z/3", "single")]] == [
        "CromSS mid",
        "CromSS late",
        "single-modality",
    ]
    assert pretraining_label("random", None) == "random init" and pretraining_label("checkpoint x.ckpt", None) == "?"
    scores = [
        TransferScore(run, "osm", pretraining_label(init, fusion), init, "s2", "FPN", mode, miou, miou, 0.5)
        for run, init, fusion, mode, miou in [
            ("r", "random", None, "fine-tuned", 0.2764),
            ("s", "a-single/1", "single", "frozen", 0.40),
            ("s2", "a-single/1", "single", "fine-tuned", 0.45),
            ("l", "a-late/1", "late", "frozen", 0.48),
            ("m", "z-mid/1", "mid", "frozen", 0.4906),
            ("m2", "z-mid/1", "mid", "fine-tuned", 0.5011),
        ]
    ]
    rows = summarise(scores)
    assert [(row.pretraining, row.encoder_mode) for row in rows] == [
        ("CromSS mid", "frozen"),
        ("CromSS mid", "fine-tuned"),
        ("CromSS late", "frozen"),
        ("single-modality", "frozen"),
        ("single-modality", "fine-tuned"),
        ("random init", "fine-tuned"),
    ]
    table = format_table(rows).splitlines()
    assert [line.split()[1:3] for line in table[2:6]] == [
        ["CromSS", "mid"],
        ["CromSS", "late"],
        ["single-modality", "a-single/1"],
        ["random", "init"],
    ]
    assert "49.06 / 49.06 / 50.00" in table[2] and "50.11 / 50.11 / 50.00" in table[2]
    assert table[5].split()[-3:] == ["27.64", "/", "50.00"] and " - " in table[5]
    assert [row["pretraining"] for row in csv.DictReader(io.StringIO(to_csv(rows)))][-1] == "random init"


def test_evaluation_prints_both_conventions_by_hand():
    """Three classes, the last absent from the truth and never predicted (spec 11): ours averages over the
    two scored classes, the reference's scores the third 1 and averages over all three."""
    matrix = ConfusionMatrix(3, 255)
    matrix.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    result = EvaluationResult("models:/m/1", "data", "s2", "dw", ("a", "b", "c"), 1, matrix.compute())
    # IoU a = 1/2, b = 2/3; F1 a = 2/3, b = 4/5; c: NaN (ours), 1 (reference)
    metrics = result.metrics()
    assert metrics["test/s2/miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert metrics["test/s2/miou_ref"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["test/s2/mf1_ref"] == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    lines = format_evaluation(result).splitlines()
    assert lines[-2] == "OA 75.00  mIoU 58.33  mF1 73.33  (%)"
    assert lines[-1].endswith("mIoU 72.22  mF1 82.22  (%)") and "reference convention" in lines[-1]


def test_evaluation_scores_the_inputs_training_batches_give(dw_shards: Shards):
    """Whole-tile scoring (``cromss evaluate`` and a run's test split) feeds the network the same inputs
    as the training batches (spec 9): with one window per tile, the same class maps."""
    torch.manual_seed(4)
    network = build_segmentation_model("Unet", ENCODER, PRETRAINED_BANDS, len(DW_CLASSES)).eval()
    tiles = TileSet(scan_shards(str(dw_shards.test)))
    meta = tiles.meta
    assert meta.s2.representation == "physical" and meta.s2.dtype == "uint16"
    segmenter = Segmenter(network, "s2", PRETRAINED_BANDS, DW_CLASSES, {"s1": meta.s1, "s2": meta.s2})
    scores = score_tiles(segmenter, tiles.rows(), meta, tile=TEST_TILE)
    expected = ConfusionMatrix(meta.num_classes, meta.nodata)
    bands = band_indices(meta, PRETRAINED_BANDS)
    rows = list(tiles.rows())
    for row in rows:
        batch = {
            name: torch.from_numpy(np.array(row[name][bands] if name == "s2" else row[name]))[None]
            for name in ("s1", "s2", "label")
        }
        inputs = to_device(batch, meta, "cpu", prior="none")
        with torch.no_grad():
            expected.update(network(inputs.x2).argmax(dim=1), inputs.y)
    assert scores.tiles == 3
    assert torch.equal(scores.matrix.matrix, expected.matrix)
    assert scores.example.dtype == np.float32, "the registered model's example: stored values, as it takes them"
    np.testing.assert_array_equal(scores.example[0], rows[0]["s2"][bands])


def test_compare_command_tabulates_and_logs_the_runs(
    frozen_run: FinetuneResult,
    warmup_run: ResumedRun,
    store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    assert main(["compare", "cromss-finetune", "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "Unet frozen" in out and "DeepLabV3Plus fine-tuned after a 1-epoch frozen warm-up" in out
    assert f"{frozen_run.source.label}" in out and "SSL4EO-S12@DW" in out and "DFC2020" in out
    run_id = out.strip().rsplit("MLflow run ", 1)[1]
    client = MlflowClient(store)
    assert client.get_run(run_id).data.tags["cromss.task"] == "compare"
    logged = Path(client.download_artifacts(run_id, "comparison.csv", str(tmp_path))).read_text()
    rows = list(csv.DictReader(io.StringIO(logged)))
    frozen = next(row for row in rows if row["decoder"] == "Unet" and row["encoder_mode"] == "frozen")
    assert float(frozen["miou"]) == pytest.approx(frozen_run.test_metrics["test/s2/miou"])
    assert float(frozen["miou_ref"]) == pytest.approx(frozen_run.test_metrics["test/s2/miou_ref"])
    assert frozen["pretraining"] == f"CromSS {frozen_run.source.fusion}" and frozen_run.source.fusion in ("mid", "late")
    out_file = tmp_path / "comparison.csv"
    assert main(["compare", "cromss-finetune", "--tracking-uri", store, "--out", str(out_file)]) == 0
    assert out_file.read_text() == logged


def test_compare_names_a_missing_experiment(store: str, capsys: pytest.CaptureFixture[str]):
    assert main(["compare", "no-such-experiment", "--tracking-uri", store]) == 1
    assert "no MLflow experiment 'no-such-experiment'" in capsys.readouterr().err
