"""GeoTIFF class maps (cromss_ray.models.geotiff.predict_geotiff and ``cromss predict``): grid, CRS, scaling, no-data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from finetune_helpers import PRETRAINED_BANDS, Pretrained
from rasterio.crs import CRS
from rasterio.transform import Affine

from cromss_ray.cli import build_parser, main
from cromss_ray.data.schema import DW_CLASSES, NODATA, S2_BAND_SUBSETS
from cromss_ray.method import build_model, build_segmentation_model
from cromss_ray.models.geotiff import predict_geotiff
from cromss_ray.models import MODEL_TILE
from cromss_ray.models.segmenter import PRODUCT_SCALING, Segmenter, predict_array
from cromss_ray.train.finetune import FinetuneResult

HEIGHT, WIDTH = 70, 90
CRS_UTM = CRS.from_epsg(32632)
TRANSFORM = Affine(10.0, 0.0, 399960.0, 0.0, -10.0, 5300040.0)


def _write(path: Path, pixels: np.ndarray, *, transform: Affine = TRANSFORM, nodata: float | None = None) -> Path:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=pixels.shape[1],
        width=pixels.shape[2],
        count=pixels.shape[0],
        dtype=pixels.dtype,
        crs=CRS_UTM,
        transform=transform,
        nodata=nodata,
    ) as dataset:
        dataset.write(pixels)
    return path


def _s2_digital_numbers(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 4000, size=(13, HEIGHT, WIDTH)).astype(np.uint16)


def _s1_db(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-25, 0, size=(2, HEIGHT, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    torch.manual_seed(0)
    network = build_segmentation_model("Unet", "resnet18", PRETRAINED_BANDS, len(DW_CLASSES)).eval()
    return Segmenter(network, "s2", PRETRAINED_BANDS, DW_CLASSES)


def test_class_map_keeps_grid_and_crs_and_matches_the_array_prediction(segmenter: Segmenter, tmp_path: Path):
    s2 = _s2_digital_numbers()
    out = predict_geotiff(segmenter, tmp_path / "pred.tif", s2=_write(tmp_path / "s2.tif", s2), tile=32, overlap=8)
    with rasterio.open(out) as written:
        assert written.crs == CRS_UTM and written.transform == TRANSFORM
        assert (written.height, written.width, written.count) == (HEIGHT, WIDTH, 1)
        assert written.dtypes == ("uint8",) and written.nodata == NODATA
        assert json.loads(written.tags()["classes"]) == list(DW_CLASSES)
        assert written.colormap(1)[0][:3] == (0x41, 0x9B, 0xDF)
        classes = written.read(1)
    expected = predict_array(segmenter, s2=PRODUCT_SCALING["s2"].apply(s2), tile=32, overlap=8)
    np.testing.assert_array_equal(classes, expected.classes)


def test_masked_input_pixels_become_nodata(segmenter: Segmenter, tmp_path: Path):
    s2 = _s2_digital_numbers()
    s2[:, 10:20, 30:45] = 0
    out = predict_geotiff(segmenter, tmp_path / "pred.tif", s2=_write(tmp_path / "s2.tif", s2, nodata=0), tile=64)
    with rasterio.open(out) as written:
        classes = written.read(1)
    assert (classes[10:20, 30:45] == NODATA).all()
    assert (np.delete(classes, np.s_[10:20], axis=0) < len(DW_CLASSES)).all()


def test_bad_inputs_are_named_and_leave_no_output(segmenter: Segmenter, tmp_path: Path):
    out = tmp_path / "pred.tif"
    five_bands = _write(tmp_path / "five.tif", _s2_digital_numbers()[:5])
    with pytest.raises(ValueError, match=r"five.tif: has 5 bands, a S2 input needs 9 or 13"):
        predict_geotiff(segmenter, out, s2=five_bands)
    with pytest.raises(ValueError, match="needs the S2 GeoTIFF"):
        predict_geotiff(segmenter, out, s1=_write(tmp_path / "s1.tif", _s1_db()))
    with pytest.raises(ValueError, match="cannot open"):
        predict_geotiff(segmenter, out, s2=tmp_path / "missing.tif")
    fused = Segmenter(
        build_model("mid", "resnet18", s2_bands=PRETRAINED_BANDS).eval(), "fused", PRETRAINED_BANDS, DW_CLASSES
    )
    shifted = _write(tmp_path / "s1-shifted.tif", _s1_db(), transform=TRANSFORM @ Affine.translation(5, 0))
    with pytest.raises(ValueError, match="not on the same grid"):
        predict_geotiff(fused, out, s1=shifted, s2=_write(tmp_path / "s2.tif", _s2_digital_numbers()))
    assert list(tmp_path.glob("*pred.tif*")) == []


def test_predict_command_with_a_fine_tuned_model(frozen_run: FinetuneResult, store: str, tmp_path: Path):
    s2 = _write(tmp_path / "s2.tif", _s2_digital_numbers())
    out = tmp_path / "pred.tif"
    uri = f"models:/{frozen_run.registry_name}/{frozen_run.version}"
    code = main(
        ["predict", "--model", uri, "--s2", str(s2), "--out", str(out), "--tile", "64", "--tracking-uri", store]
    )
    assert code == 0
    with rasterio.open(out) as written:
        assert written.crs == CRS_UTM and written.transform == TRANSFORM and written.shape == (HEIGHT, WIDTH)
        assert written.tags()["model"] == uri
        assert written.read(1).max() < len(DW_CLASSES)
    code = main(
        ["predict", "--model", uri, "--s2", str(s2), "--out", str(out), "--branch", "s1", "--tracking-uri", store]
    )
    assert code == 1


@pytest.mark.parametrize("branch", ["fused", "s1"])
def test_predict_command_with_a_pretrained_model(pretrained: Pretrained, store: str, tmp_path: Path, branch: str):
    s1 = _write(tmp_path / "s1.tif", _s1_db())
    s2 = _write(tmp_path / "s2.tif", _s2_digital_numbers()[list(S2_BAND_SUBSETS[PRETRAINED_BANDS])])
    out = tmp_path / f"{branch}.tif"
    args = ["predict", "--model", f"models:/{pretrained.name}@best", "--s1", str(s1), "--out", str(out)]
    args += ["--s2", str(s2)] if branch == "fused" else ["--branch", "s1"]
    assert main([*args, "--tile", "64", "--overlap", "16", "--tracking-uri", store]) == 0
    with rasterio.open(out) as written:
        assert written.crs == CRS_UTM and written.transform == TRANSFORM and written.shape == (HEIGHT, WIDTH)
        assert written.tags()["branch"] == branch


def test_predict_command_names_a_missing_model(store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    s2 = _write(tmp_path / "s2.tif", _s2_digital_numbers())
    args = ["predict", "--model", "models:/no-such-model@best", "--s2", str(s2), "--out", str(tmp_path / "p.tif")]
    code = main([*args, "--tracking-uri", store])
    assert code == 1
    assert "no registered model 'no-such-model'" in capsys.readouterr().err


def test_evaluate_and_predict_default_to_the_registered_models_windows():
    """``cromss predict``, ``cromss evaluate``, the pyfunc and a run's test split use the same windows."""
    parser = build_parser()
    predict = parser.parse_args(["predict", "--model", "m", "--out", "p.tif"])
    evaluate = parser.parse_args(["evaluate", "--model", "m", "--data", "d"])
    assert predict.tile == evaluate.tile == MODEL_TILE
    assert predict.overlap is evaluate.overlap is None
