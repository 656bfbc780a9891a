"""SSL4EO-S12@DW / @OSM and DFC2020 GeoTIFFs -> patched one-season shards (spec 10)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cromss_ray.data.convert.common import SourceError, cut_patches
from cromss_ray.data.convert.downstream import convert_downstream
from cromss_ray.data.schema import NODATA
from cromss_ray.data.shards import iter_rows, list_shards, read_manifest

TILE = 20
WriteTif = Callable[..., Path]


def _images(seed: int, size: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s1 = rng.normal(-12.0, 3.0, (2, size, size)).astype(np.float32)
    s2 = rng.integers(0, 10000, (13, size, size)).astype(np.uint16)
    return s1, s2


def _labels(values: list[int], size: int = TILE) -> np.ndarray:
    """Every value of ``values`` in turn along the rows."""
    return np.resize(np.array(values, dtype=np.uint8), size * size).reshape(size, size)


def _ssl4eo_tile(root: Path, kind: str, name: str, labels: np.ndarray, write_tif: WriteTif, seed: int = 0) -> None:
    s1, s2 = _images(seed, labels.shape[-1])
    write_tif(root / "image_s1" / f"s1_{name}.tif", s1)
    write_tif(root / "image_s2" / f"s2_{name}.tif", s2)
    write_tif(root / f"label_{kind}" / f"{kind}_{name}.tif", labels)


def _rows(out: Path) -> list[dict[str, np.ndarray]]:
    return [row for path in list_shards(out) for row in iter_rows(path)]


def test_dw_labels_are_mapped_and_tiles_cut_into_padded_patches(tmp_path: Path, write_tif: WriteTif) -> None:
    split = tmp_path / "dw" / "dw_train"
    labels = _labels(list(range(11)))
    _ssl4eo_tile(split, "dw", "-0.05_32.9-20190816", labels, write_tif)
    summary = convert_downstream("dw", tmp_path / "dw", "train", tmp_path / "out", patch_size=8)
    rows = _rows(tmp_path / "out")
    assert [row["id"] for row in rows] == [f"-0.05_32.9-20190816_r{r}c{c}" for r in range(3) for c in range(3)]
    assert rows[0]["dates"] == ["2019-08-16"]
    expected = np.array([NODATA, 0, 1, 2, 3, 4, 5, 6, 7, 8, NODATA], dtype=np.uint8)[labels]
    np.testing.assert_array_equal(rows[0]["label"], expected[:8, :8])
    np.testing.assert_array_equal(rows[8]["label"][:4, :4], expected[16:, 16:])
    assert (rows[8]["label"][4:] == NODATA).all() and (rows[8]["label"][:, 4:] == NODATA).all()
    s1, s2 = _images(0)
    np.testing.assert_array_equal(rows[4]["s2"], s2[:, 8:16, 8:16])
    np.testing.assert_array_equal(rows[8]["s1"][:, 7, 7], s1[:, 19, 19])
    assert rows[0]["s1"].dtype == np.float32 and rows[0]["s2"].dtype == np.uint16
    manifest = read_manifest(tmp_path / "out")
    assert manifest.metadata.kind == "dw" and manifest.metadata.seasons == 1
    assert manifest.metadata.s1.representation == manifest.metadata.s2.representation == "physical"
    assert manifest.class_histogram == np.bincount(expected[expected != NODATA], minlength=9).tolist()
    assert summary.skipped == []


def test_dw_label_files_with_several_bands_use_band_two(tmp_path: Path, write_tif: WriteTif) -> None:
    split = tmp_path / "dw_test"
    _ssl4eo_tile(split, "dw", "tile", _labels([1]), write_tif)
    write_tif(split / "label_dw" / "dw_tile.tif", np.stack([_labels([7]), _labels([3])]))
    convert_downstream("dw", split, "test", tmp_path / "out", patch_size=TILE)
    [row] = _rows(tmp_path / "out")
    assert row["id"] == "tile" and (row["label"] == 2).all()


def test_osm_labels_map_zero_to_ignore_and_reject_unknown_values(tmp_path: Path, write_tif: WriteTif) -> None:
    split = tmp_path / "osm_test"
    _ssl4eo_tile(split, "osm", "a", _labels(list(range(14))), write_tif)
    convert_downstream("osm", tmp_path, "test", tmp_path / "out", patch_size=TILE)
    [row] = _rows(tmp_path / "out")
    expected = np.array([NODATA, *range(13)], dtype=np.uint8)[_labels(list(range(14)))]
    np.testing.assert_array_equal(row["label"], expected)
    _ssl4eo_tile(split, "osm", "b", _labels([1, 14]), write_tif, seed=1)
    with pytest.raises(SourceError, match=r"osm_b\.tif: label values \[14\] are not in the class mapping"):
        convert_downstream("osm", tmp_path, "test", tmp_path / "out2", patch_size=TILE)


def _dfc_patch(folders: dict[str, Path], split: str, index: int, labels: np.ndarray, write_tif: WriteTif) -> None:
    s1, s2 = _images(index, labels.shape[-1])
    write_tif(folders["s1"] / f"ROIs0000_{split}_s1_0_p{index}.tif", s1.astype(np.float64))
    write_tif(folders["s2"] / f"ROIs0000_{split}_s2_0_p{index}.tif", s2)
    write_tif(folders["dfc"] / f"ROIs0000_{split}_dfc_0_p{index}.tif", labels.astype(np.uint16))


def test_dfc2020_train_reads_the_validation_patches_with_the_spec_mapping(tmp_path: Path, write_tif: WriteTif) -> None:
    base = tmp_path / "dfc" / "ROIs0000_validation"
    folders = {name: base / f"{name}_0" for name in ("s1", "s2", "dfc")}
    for index in (10, 2):
        _dfc_patch(folders, "validation", index, _labels(list(range(1, 11)), 16), write_tif)
    convert_downstream("dfc2020", tmp_path / "dfc", "train", tmp_path / "out", patch_size=16)
    rows = _rows(tmp_path / "out")
    assert [row["id"] for row in rows] == ["ROIs0000_validation_0_p2", "ROIs0000_validation_0_p10"]
    mapping = np.zeros(11, dtype=np.uint8)
    mapping[1:] = [1, 5, NODATA, 2, 3, 4, 6, NODATA, 7, 0]
    np.testing.assert_array_equal(rows[0]["label"], mapping[_labels(list(range(1, 11)), 16)])
    s1, _ = _images(2, 16)
    np.testing.assert_array_equal(rows[0]["s1"], s1)
    assert read_manifest(tmp_path / "out").metadata.classes[0] == "water"


def test_dfc2020_test_split_in_the_reference_layout(tmp_path: Path, write_tif: WriteTif) -> None:
    folders = {name: tmp_path / "test" / f"{name}_test" for name in ("s1", "s2", "dfc")}
    _dfc_patch(folders, "test", 0, _labels([10, 1], 16), write_tif)
    convert_downstream("dfc2020", tmp_path, "test", tmp_path / "out", patch_size=8)
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4 and set(np.unique(rows[0]["label"])) == {0, 1}


def test_nan_backscatter_names_the_tile_or_is_skipped(tmp_path: Path, write_tif: WriteTif) -> None:
    split = tmp_path / "dw_train"
    _ssl4eo_tile(split, "dw", "good", _labels([1, 2]), write_tif)
    _ssl4eo_tile(split, "dw", "hole", _labels([1, 2]), write_tif)
    s1, _ = _images(0)
    s1[0, 3, 3] = np.nan
    write_tif(split / "image_s1" / "s1_hole.tif", s1)
    with pytest.raises(SourceError, match=r"dw_hole\.tif: row 'hole', field 's1': 1 NaN or infinite values"):
        convert_downstream("dw", tmp_path, "train", tmp_path / "out", patch_size=TILE)
    summary = convert_downstream("dw", tmp_path, "train", tmp_path / "skip", patch_size=TILE, skip_bad=True)
    assert [row["id"] for row in _rows(tmp_path / "skip")] == ["good"]
    assert len(summary.skipped) == 1


def test_missing_image_and_wrong_band_count_are_named(tmp_path: Path, write_tif: WriteTif) -> None:
    split = tmp_path / "dw_train"
    _ssl4eo_tile(split, "dw", "a", _labels([1]), write_tif)
    (split / "image_s2" / "s2_a.tif").unlink()
    with pytest.raises(SourceError, match=r"s2_a\.tif: file not found"):
        convert_downstream("dw", tmp_path, "train", tmp_path / "out")
    write_tif(split / "image_s2" / "s2_a.tif", _images(0)[1][:12])
    with pytest.raises(SourceError, match=r"s2_a\.tif: 12 bands, expected 13"):
        convert_downstream("dw", tmp_path, "train", tmp_path / "out2")


def test_a_missing_split_folder_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no osm train label folder"):
        convert_downstream("osm", tmp_path, "train", tmp_path / "out")
    with pytest.raises(SourceError, match="no DFC2020 validation label folder"):
        convert_downstream("dfc2020", tmp_path, "train", tmp_path / "out")


def test_fully_ignored_patches_are_dropped() -> None:
    label = np.full((8, 8), NODATA, dtype=np.uint8)
    label[:4, :4] = 1
    patches = cut_patches({"s2": np.zeros((13, 8, 8), np.uint16), "label": label}, 4)
    assert [position for position, _ in patches] == [(0, 0)]


def test_a_label_on_another_footprint_names_the_tile_files(tmp_path: Path, write_tif: WriteTif) -> None:
    split = tmp_path / "dw_train"
    _ssl4eo_tile(split, "dw", "a", _labels([1]), write_tif)
    write_tif(split / "label_dw" / "dw_a.tif", _labels([1]), pixel_size=20.0)
    message = r"dw_a\.tif: footprint .* is off that of .*s2_a\.tif .* by 100\.0% of the tile"
    with pytest.raises(SourceError, match=message):
        convert_downstream("dw", tmp_path, "train", tmp_path / "out")
