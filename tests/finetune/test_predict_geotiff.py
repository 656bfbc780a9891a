"""GeoTIFF class maps (cromss_ray.models.geotiff.predict_geotiff and ``cromss predict``): grid, CRS, the input
rule of spec 9 on raw products and v8 codes, no-data, bad inputs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from finetune_helpers import PRETRAINED_BANDS, Pretrained
from rasterio.crs import CRS
from rasterio.transform import Affine

from cromss_ray.cli import build_parser, main
from cromss_ray.data.scaling import network_input
from cromss_ray.data.scaling import S1_MEAN, S2_MEAN
from cromss_ray.data.schema import CLASS_SCHEMES, DW_CLASSES, NODATA, S2_BAND_NAMES, S2_BAND_SUBSETS, s2_subset_names
from cromss_ray.method import build_model, build_segmentation_model
from cromss_ray.models.geotiff import predict_geotiff
from cromss_ray.models import MODEL_TILE
from cromss_ray.models.segmenter import PRODUCT_INPUTS, Segmenter, predict_array, product_input
from cromss_ray.train.finetune import FinetuneResult

HEIGHT, WIDTH = 70, 90
CRS_UTM = CRS.from_epsg(32632)
TRANSFORM = Affine(10.0, 0.0, 399960.0, 0.0, -10.0, 5300040.0)


def _write(
    path: Path,
    pixels: np.ndarray,
    *,
    transform: Affine = TRANSFORM,
    nodata: float | None = None,
    descriptions: Sequence[str | None] = (),
) -> Path:
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
        for index, description in enumerate(descriptions, start=1):
            if description is not None:
                dataset.set_band_description(index, description)
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
    subset = s2[list(S2_BAND_SUBSETS[PRETRAINED_BANDS])]
    model_input = network_input(subset, PRODUCT_INPUTS["s2"].with_bands(s2_subset_names(PRETRAINED_BANDS)))
    expected = predict_array(segmenter, s2=model_input, tile=32, overlap=8)
    np.testing.assert_array_equal(classes, expected.classes)


def _v8(raw: np.ndarray, modality: str) -> np.ndarray:
    """The released uint8 codes of a raw product: the network input times 255."""
    codes = network_input(raw, PRODUCT_INPUTS[modality]) * 255
    np.testing.assert_array_equal(codes, np.rint(codes))
    return np.rint(codes).astype(np.uint8)


@pytest.fixture(scope="module")
def fused() -> Segmenter:
    torch.manual_seed(2)
    return Segmenter(build_model("mid", "resnet18", s2_bands=13).eval(), "fused", 13, DW_CLASSES)


def test_raw_products_and_their_v8_codes_give_the_same_class_map(fused: Segmenter, tmp_path: Path):
    """Spec 9: S1 dB float32 and S2 L1C uint16 go through the rule; the v8 uint8 codes are only divided by 255."""
    s1, s2 = _s1_db(), _s2_digital_numbers()
    s2[:, :5] = 12000  # above mu + 2 sigma of every band: code 255
    s1[:, -3:] = -40.0  # below mu - 2 sigma: code 0
    raw = predict_geotiff(
        fused, tmp_path / "raw.tif", s1=_write(tmp_path / "s1.tif", s1), s2=_write(tmp_path / "s2.tif", s2), tile=64
    )
    v8_inputs = {modality: product_input(modality, "v8") for modality in ("s1", "s2")}
    v8 = predict_geotiff(
        replace(fused, inputs=v8_inputs),
        tmp_path / "v8.tif",
        s1=_write(tmp_path / "s1-v8.tif", _v8(s1, "s1")),
        s2=_write(tmp_path / "s2-v8.tif", _v8(s2, "s2")),
        tile=64,
    )
    with rasterio.open(raw) as from_raw, rasterio.open(v8) as from_v8:
        raw_classes, v8_classes = from_raw.read(1), from_v8.read(1)
    np.testing.assert_array_equal(raw_classes, v8_classes)
    assert len(np.unique(raw_classes)) > 1


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
    with pytest.raises(ValueError, match=r"five.tif: has 5 unnamed bands; the model takes 9 S2 bands \(B2, .*\) or all 13"):
        predict_geotiff(segmenter, out, s2=five_bands)
    with pytest.raises(ValueError, match="needs the S2 GeoTIFF"):
        predict_geotiff(segmenter, out, s1=_write(tmp_path / "s1.tif", _s1_db()))
    with pytest.raises(ValueError, match="cannot open"):
        predict_geotiff(segmenter, out, s2=tmp_path / "missing.tif")
    codes = _write(tmp_path / "codes.tif", _s2_digital_numbers().astype(np.uint8))
    with pytest.raises(ValueError, match=r"codes.tif: holds uint8 values, a S2 input of this model is uint16 \(physical"):
        predict_geotiff(segmenter, out, s2=codes)
    v8_segmenter = replace(segmenter, inputs={"s2": product_input("s2", "v8")})
    with pytest.raises(ValueError, match=r"s2.tif: holds uint16 values, a S2 input of this model is uint8 \(v8"):
        predict_geotiff(v8_segmenter, out, s2=_write(tmp_path / "s2.tif", _s2_digital_numbers()))
    fused = Segmenter(
        build_model("mid", "resnet18", s2_bands=PRETRAINED_BANDS).eval(), "fused", PRETRAINED_BANDS, DW_CLASSES
    )
    shifted = _write(tmp_path / "s1-shifted.tif", _s1_db(), transform=TRANSFORM @ Affine.translation(5, 0))
    with pytest.raises(ValueError, match="not on the same grid"):
        predict_geotiff(fused, out, s1=shifted, s2=_write(tmp_path / "s2.tif", _s2_digital_numbers()))
    assert list(tmp_path.glob("*pred.tif*")) == []


L2A_BANDS = [name for name in S2_BAND_NAMES if name != "B10"]


def test_bands_are_picked_by_their_descriptions_or_given_names(segmenter: Segmenter, tmp_path: Path):
    """A 12-band L2A GeoTIFF (no B10) with band descriptions, or with names given, feeds the 9-band model as the
    13-band L1C one does; so does a 13-band one in another order."""
    s2 = _s2_digital_numbers()
    expected = predict_geotiff(segmenter, tmp_path / "l1c.tif", s2=_write(tmp_path / "s2.tif", s2), tile=64)
    l2a = s2[[S2_BAND_NAMES.index(name) for name in L2A_BANDS]]
    described = _write(tmp_path / "l2a.tif", l2a, descriptions=[f"B{name[1:].zfill(2)}" for name in L2A_BANDS])
    bare = _write(tmp_path / "l2a-bare.tif", l2a)
    order = np.arange(13)[::-1]
    reversed_l1c = _write(tmp_path / "reversed.tif", s2[order], descriptions=[S2_BAND_NAMES[i] for i in order])
    outputs = [
        predict_geotiff(segmenter, tmp_path / "described.tif", s2=described, tile=64),
        predict_geotiff(segmenter, tmp_path / "named.tif", s2=bare, tile=64, band_names={"s2": L2A_BANDS}),
        predict_geotiff(segmenter, tmp_path / "reversed-pred.tif", s2=reversed_l1c, tile=64),
    ]
    with rasterio.open(expected) as reference:
        classes = reference.read(1)
    for out in outputs:
        with rasterio.open(out) as written:
            np.testing.assert_array_equal(written.read(1), classes)


def test_band_names_the_model_cannot_use_are_named(segmenter: Segmenter, tmp_path: Path):
    out = tmp_path / "pred.tif"
    s2 = _s2_digital_numbers()
    rgb = _write(tmp_path / "rgb.tif", s2[[3, 2, 1]], descriptions=["B4", "B3", "B2"])
    with pytest.raises(ValueError, match=r"rgb.tif: lacks the S2 bands B5, B6, B7, B8, B11, B12 that the model"):
        predict_geotiff(segmenter, out, s2=rgb)
    red = _write(tmp_path / "red.tif", s2[:12], descriptions=[*L2A_BANDS[:11], "red edge"])
    with pytest.raises(ValueError, match=r"red.tif: band 'red edge' is not a S2 band"):
        predict_geotiff(segmenter, out, s2=red)
    with pytest.raises(ValueError, match=r"rgb.tif: band 'B13' is not a S2 band"):
        predict_geotiff(segmenter, out, s2=rgb, band_names={"s2": ["B4", "B3", "B13"]})
    partly = _write(tmp_path / "partly.tif", s2[:12], descriptions=["B1", None, *L2A_BANDS[2:]])
    with pytest.raises(ValueError, match=r"partly.tif: band 2 has no description, the others do"):
        predict_geotiff(segmenter, out, s2=partly)
    assert list(tmp_path.glob("*pred.tif*")) == []


def test_a_non_finite_pixel_is_nodata_and_leaves_the_others_alone(fused: Segmenter, tmp_path: Path):
    """One NaN (and one -inf) S1 pixel: 255 there; every other pixel as in the clean scene whose pixels there hold
    the band means, which the network sees in place of a masked pixel (in S1 and S2)."""
    s1, s2 = _s1_db(), _s2_digital_numbers()
    for image, means in ((s1, np.array(S1_MEAN, np.float32)), (s2, np.rint(S2_MEAN).astype(np.uint16))):
        image[:, 30, 40] = image[:, 50, 10] = means  # codes 127 (MEAN_CODE) in every band
    s2_path = _write(tmp_path / "s2.tif", s2)
    clean = predict_geotiff(fused, tmp_path / "clean.tif", s1=_write(tmp_path / "s1.tif", s1), s2=s2_path, tile=64)
    s1[0, 30, 40], s1[1, 50, 10] = np.nan, -np.inf
    masked = predict_geotiff(fused, tmp_path / "nan.tif", s1=_write(tmp_path / "s1-nan.tif", s1), s2=s2_path, tile=64)
    with rasterio.open(clean) as from_clean, rasterio.open(masked) as from_masked:
        expected, classes = from_clean.read(1), from_masked.read(1)
    assert classes[30, 40] == classes[50, 10] == NODATA
    expected[30, 40] = expected[50, 10] = NODATA
    np.testing.assert_array_equal(classes, expected)


def test_declared_scale_offset_or_unit_other_than_the_models_is_refused(segmenter: Segmenter, tmp_path: Path):
    """L2A digital numbers with the -1000 offset of processing baseline 04.00 are not L1C's."""
    s2 = _write(tmp_path / "l2a.tif", _s2_digital_numbers())
    with rasterio.open(s2, "r+") as dataset:
        dataset.scales = [1e-4] * 13
        dataset.offsets = [-0.1] * 13
    with pytest.raises(ValueError, match=r"l2a.tif: band 2 declares value x 0.0001 \+ -0.1; a S2 input of this model"):
        predict_geotiff(segmenter, tmp_path / "pred.tif", s2=s2)
    with rasterio.open(s2, "r+") as dataset:
        dataset.offsets = [0.0] * 13
        dataset.units = ["DN"] * 13
    with pytest.raises(ValueError, match=r"l2a.tif: band 2 declares the unit 'DN'"):
        predict_geotiff(segmenter, tmp_path / "pred.tif", s2=s2)
    with rasterio.open(s2, "r+") as dataset:
        dataset.units = ["reflectance"] * 13
    predict_geotiff(segmenter, tmp_path / "pred.tif", s2=s2, tile=64)


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


def test_predict_command_takes_band_names(pretrained: Pretrained, store: str, tmp_path: Path):
    """--s2-bands names an L2A GeoTIFF's 12 bands; the 9-band model's class map equals the L1C one's."""
    s1, s2 = _write(tmp_path / "s1.tif", _s1_db()), _s2_digital_numbers()
    l2a = _write(tmp_path / "l2a.tif", s2[[S2_BAND_NAMES.index(name) for name in L2A_BANDS]])
    model = ["--model", f"models:/{pretrained.name}@best", "--tile", "64", "--tracking-uri", store, "--s1", str(s1)]
    named = ["--s2", str(l2a), "--s2-bands", ",".join(L2A_BANDS), "--s1-bands", "VV,VH"]
    assert main(["predict", *model, *named, "--out", str(tmp_path / "named.tif")]) == 0
    in_memory = Segmenter(pretrained.model, "fused", PRETRAINED_BANDS, CLASS_SCHEMES["pretrain"])
    l1c = predict_geotiff(in_memory, tmp_path / "l1c.tif", s1=s1, s2=_write(tmp_path / "s2.tif", s2), tile=64)
    with rasterio.open(l1c) as from_l1c, rasterio.open(tmp_path / "named.tif") as from_l2a:
        np.testing.assert_array_equal(from_l1c.read(1), from_l2a.read(1))
    assert main(["predict", *model, "--s2", str(l2a), "--out", str(tmp_path / "bare.tif")]) == 1
    assert not (tmp_path / "bare.tif").exists()


def test_predict_command_reads_v8_codes_when_told(pretrained: Pretrained, store: str, tmp_path: Path):
    """The registered model scales raw products itself; --s1/--s2-representation v8 reads the released
    codes of the same scene to the same class map."""
    s1, s2 = _s1_db(), _s2_digital_numbers()[list(S2_BAND_SUBSETS[PRETRAINED_BANDS])]
    model = ["--model", f"models:/{pretrained.name}@best", "--tile", "64", "--tracking-uri", store]
    raw = ["--s1", str(_write(tmp_path / "s1.tif", s1)), "--s2", str(_write(tmp_path / "s2.tif", s2))]
    assert main(["predict", *model, *raw, "--out", str(tmp_path / "raw.tif")]) == 0
    v8_s2 = np.rint(network_input(s2, PRODUCT_INPUTS["s2"].with_bands(s2_subset_names(PRETRAINED_BANDS))) * 255)
    codes = [
        *("--s1", str(_write(tmp_path / "s1-v8.tif", _v8(s1, "s1")))),
        *("--s2", str(_write(tmp_path / "s2-v8.tif", v8_s2.astype(np.uint8)))),
    ]
    assert main(["predict", *model, *codes, "--out", str(tmp_path / "v8.tif")]) == 1, "uint8 is not the raw product"
    told = ["--s1-representation", "v8", "--s2-representation", "v8"]
    assert main(["predict", *model, *codes, *told, "--out", str(tmp_path / "v8.tif")]) == 0
    with rasterio.open(tmp_path / "raw.tif") as from_raw, rasterio.open(tmp_path / "v8.tif") as from_codes:
        np.testing.assert_array_equal(from_raw.read(1), from_codes.read(1))


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
