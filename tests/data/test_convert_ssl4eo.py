"""SSL4EO-S12 folders -> pretraining shards, on the real fixture location 0000200 (spec 10)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.transform import Affine

from cromss_ray.cli import main
from cromss_ray.data import network_input
from cromss_ray.data.convert.common import SourceError
from cromss_ray.data.convert.ssl4eo import convert_ssl4eo, read_season_table
from cromss_ray.data.schema import METADATA_KEY, NODATA, S2_BAND_NAMES, SCHEMA_VERSION
from cromss_ray.data.shards import iter_rows, list_shards, open_shard, read_manifest

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "ssl4eo-s12"
JUNE = "20200604T054639_20200604T054831_T43RCP"
AUGUST = "20200823T054639_20200823T055618_T43RCP"
S1_JUNE = "S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457"
S1_SEPTEMBER = "S1A_IW_GRDH_1SDV_20200903T131212_20200903T131237_034195_03F8F5_AC1C"
SEASONS = [JUNE, AUGUST, JUNE, AUGUST]

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="shared SSL4EO-S12 fixture not available")


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as dataset:
        return dataset.read(1)


def _b2(product: str) -> Path:
    """The 10 m reference band of an S2 product: the labels lie on its footprint, as NoL labels do."""
    return FIXTURE / "s2c" / "0000200" / product / "B2.tif"


def _coarse_labels(product: str) -> np.ndarray:
    """A 66 x 66 label map (40 m, like the NoL labels) that differs per product."""
    rows, cols = np.mgrid[0:66, 0:66]
    offset = 0 if product == JUNE else 3
    return ((rows // 11 + cols // 13 + offset) % 9).astype(np.uint8)


@pytest.fixture
def labels_root(tmp_path: Path, write_tif: Callable[..., Path]) -> Path:
    root = tmp_path / "labels"
    for product in (JUNE, AUGUST):
        write_tif(root / "0000200" / product / "label.tif", _coarse_labels(product), like=_b2(product))
    return root


def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_real_location_converts_with_resampled_bands_and_nearest_labels(tmp_path: Path, labels_root: Path) -> None:
    ids = _csv(tmp_path / "ids.csv", ["ids,sub1,sub2,sub3,sub4", f"200,{','.join(SEASONS)}"])
    summary = convert_ssl4eo(FIXTURE, labels_root, ids, tmp_path / "out")
    [row] = list(iter_rows(list_shards(tmp_path / "out")[0]))
    assert row["id"] == "0000200"
    assert row["dates"] == ["2020-06-04", "2020-08-23", "2020-06-04", "2020-08-23"]
    assert row["s2"].shape == (4, 13, 264, 264) and row["s2"].dtype == np.uint16
    assert row["s1"].shape == (4, 2, 264, 264) and row["s1"].dtype == np.float32

    june = FIXTURE / "s2c" / "0000200" / JUNE
    np.testing.assert_array_equal(row["s2"][0, S2_BAND_NAMES.index("B2")], _read(june / "B2.tif"))
    np.testing.assert_array_equal(row["s2"][2], row["s2"][0])
    for band, factor in (("B5", 2), ("B11", 2), ("B1", 6), ("B10", 6)):
        native = _read(june / f"{band}.tif").astype(np.float64)
        resampled = row["s2"][0, S2_BAND_NAMES.index(band)].astype(np.float64)
        blocks = resampled.reshape(native.shape[0], factor, native.shape[1], factor).mean(axis=(1, 3))
        assert abs(resampled.mean() - native.mean()) < 0.01 * native.mean()
        assert np.corrcoef(blocks.ravel(), native.ravel())[0, 1] > 0.95

    np.testing.assert_array_equal(row["s1"][0, 0], _read(FIXTURE / "s1" / "0000200" / S1_JUNE / "VV.tif"))
    np.testing.assert_array_equal(row["s1"][1, 1], _read(FIXTURE / "s1" / "0000200" / S1_SEPTEMBER / "VH.tif"))

    np.testing.assert_array_equal(row["label"][0], np.kron(_coarse_labels(JUNE), np.ones((4, 4), np.uint8)))
    np.testing.assert_array_equal(row["label"][1], np.kron(_coarse_labels(AUGUST), np.ones((4, 4), np.uint8)))

    manifest = read_manifest(tmp_path / "out")
    assert manifest.metadata.s2.scale == 1e-4 and manifest.metadata.s1.unit == "dB"
    assert manifest.metadata.seasons == 4 and manifest.total_rows == 1
    assert summary.skipped == []


def test_headerless_csv_with_two_seasons(tmp_path: Path, labels_root: Path) -> None:
    ids = _csv(tmp_path / "ids.csv", [f"200,{JUNE},{AUGUST}"])
    convert_ssl4eo(FIXTURE, labels_root, ids, tmp_path / "out")
    [row] = list(iter_rows(list_shards(tmp_path / "out")[0]))
    assert row["s2"].shape == (2, 13, 264, 264) and row["label"].shape == (2, 264, 264)


def test_an_id_with_missing_image_folders_is_an_error_naming_it(tmp_path: Path, labels_root: Path) -> None:
    ids = _csv(
        tmp_path / "ids.csv", ["ids,sub1,sub2,sub3,sub4", f"200,{','.join(SEASONS)}", f"201,{','.join(SEASONS)}"]
    )
    with pytest.raises(SourceError, match=r"id 0000201: missing S2 folder .*s2c/0000201/20200604"):
        convert_ssl4eo(FIXTURE, labels_root, ids, tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest.total_rows == 1 and not manifest.complete


def test_skip_bad_skips_and_counts_the_missing_id(tmp_path: Path, labels_root: Path) -> None:
    ids = _csv(
        tmp_path / "ids.csv", ["ids,sub1,sub2,sub3,sub4", f"201,{','.join(SEASONS)}", f"200,{','.join(SEASONS)}"]
    )
    summary = convert_ssl4eo(FIXTURE, labels_root, ids, tmp_path / "out", skip_bad=True)
    assert summary.manifest.total_rows == 1 and len(summary.skipped) == 1
    assert "0000201" in summary.skipped[0]
    assert summary.manifest.provenance["skipped"]["count"] == 1
    assert "skipped 1 bad samples" in summary.line("convert")


def test_label_values_outside_the_classes_name_the_label_file(
    tmp_path: Path, labels_root: Path, write_tif: Callable[..., Path]
) -> None:
    bad = _coarse_labels(AUGUST)
    bad[5, 5] = 12
    write_tif(labels_root / "0000200" / AUGUST / "label.tif", bad, like=_b2(AUGUST))
    ids = _csv(tmp_path / "ids.csv", [f"200,{JUNE},{AUGUST}"])
    with pytest.raises(SourceError, match=rf"{AUGUST}/label.tif: label values \[12\] are not in the class mapping"):
        convert_ssl4eo(FIXTURE, labels_root, ids, tmp_path / "out")


def test_declared_label_nodata_becomes_no_data(
    tmp_path: Path, labels_root: Path, write_tif: Callable[..., Path]
) -> None:
    labels = _coarse_labels(JUNE)
    labels[:2] = 99
    write_tif(labels_root / "0000200" / JUNE / "label.tif", labels, nodata=99, like=_b2(JUNE))
    ids = _csv(tmp_path / "ids.csv", [f"200,{JUNE}"])
    convert_ssl4eo(FIXTURE, labels_root, ids, tmp_path / "out")
    [row] = list(iter_rows(list_shards(tmp_path / "out")[0]))
    assert row["label"].shape == (264, 264)
    assert (row["label"][:8] == NODATA).all() and (row["label"][8:] != NODATA).all()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["ids,sub1", "x2,a"], "line 2: id 'x2' is not a number"),
        (["ids,name", "1,a"], "line 1: header needs columns 'ids' and 'sub1'"),
        (["ids,sub1,sub2", "1,a"], "line 2: expected 3 columns, got 2"),
        (["ids,sub1", "1,"], "line 2: empty season column"),
        (["ids,sub1"], "no locations listed"),
    ],
)
def test_bad_csv_lines_are_named(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(SourceError, match=message):
        read_season_table(_csv(tmp_path / "ids.csv", lines))


def test_converted_shards_are_raw_and_schema_1_ones_migrate_in_place(
    tmp_path: Path, labels_root: Path, as_schema_1: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _csv(tmp_path / "ids.csv", ["ids,sub1,sub2,sub3,sub4", f"200,{','.join(SEASONS)}"])
    out = tmp_path / "out"
    convert_ssl4eo(FIXTURE, labels_root, ids, out)
    meta = read_manifest(out).metadata
    assert (meta.s1.representation, meta.s2.representation) == ("physical", "physical")
    [path] = list_shards(out)
    [row] = list(iter_rows(path))
    network = network_input(row["s2"], meta.s2)
    assert network.shape == (4, 13, 264, 264) and 0 <= network.min() and network.max() <= 1

    as_schema_1(out)
    assert json.loads(pq.read_schema(path).metadata[METADATA_KEY])["schema_version"] == 1
    assert open_shard(path)[1] == meta, "schema-1 dB and reflectance are certainly raw: read as they are"
    assert main(["data", "migrate", str(out)]) == 0
    assert "rewrote the metadata of 1 files" in capsys.readouterr().out
    footer = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert footer["schema_version"] == SCHEMA_VERSION and footer["s2"]["representation"] == "physical"
    assert read_manifest(out).metadata == meta and read_manifest(out).files[0].bytes == Path(path).stat().st_size
    [migrated] = list(iter_rows(path))
    np.testing.assert_array_equal(migrated["s2"], row["s2"])
    np.testing.assert_array_equal(migrated["s1"], row["s1"])
    assert main(["data", "check", str(out)]) == 0


def _altered_copy(tmp_path: Path, relative: str, change: Callable[[rasterio.io.DatasetWriter], None]) -> Path:
    """A copy of the fixture's images in which the raster at ``relative`` has ``change`` applied."""
    images = tmp_path / "images"
    shutil.copytree(FIXTURE, images, ignore=shutil.ignore_patterns("s2a"))
    with rasterio.open(images / relative, "r+") as dataset:
        change(dataset)
    return images


def test_an_s1_raster_on_another_footprint_is_refused_naming_both_files(tmp_path: Path, labels_root: Path) -> None:
    def shift_a_quarter_tile(dataset: rasterio.io.DatasetWriter) -> None:
        transform = dataset.transform
        dataset.transform = transform * Affine.translation(dataset.width / 4, 0)

    images = _altered_copy(tmp_path, f"s1/0000200/{S1_JUNE}/VH.tif", shift_a_quarter_tile)
    ids = _csv(tmp_path / "ids.csv", [f"200,{JUNE}"])
    message = rf"{S1_JUNE}/VH.tif: footprint .* is off that of .*{JUNE}/B1.tif .* by 2\d\.\d% of the tile"
    with pytest.raises(SourceError, match=message):
        convert_ssl4eo(images, labels_root, ids, tmp_path / "out")


def test_a_band_in_another_crs_is_refused_naming_both_files(tmp_path: Path, labels_root: Path) -> None:
    def another_crs(dataset: rasterio.io.DatasetWriter) -> None:
        dataset.crs = rasterio.crs.CRS.from_epsg(32643)

    images = _altered_copy(tmp_path, f"s2c/0000200/{AUGUST}/B8A.tif", another_crs)
    ids = _csv(tmp_path / "ids.csv", [f"200,{JUNE},{AUGUST}"])
    message = rf"{AUGUST}/B8A.tif: CRS EPSG:32643 differs from EPSG:4326 of .*{JUNE}/B1.tif"
    with pytest.raises(SourceError, match=message):
        convert_ssl4eo(images, labels_root, ids, tmp_path / "out")


def test_a_label_on_another_grid_is_refused(
    tmp_path: Path, labels_root: Path, write_tif: Callable[..., Path]
) -> None:
    write_tif(labels_root / "0000200" / JUNE / "label.tif", _coarse_labels(JUNE), pixel_size=40.0)
    ids = _csv(tmp_path / "ids.csv", [f"200,{JUNE}"])
    with pytest.raises(SourceError, match=rf"{JUNE}/label.tif: CRS EPSG:32632 differs from EPSG:4326"):
        convert_ssl4eo(FIXTURE, labels_root, ids, tmp_path / "out")
