"""The synthetic generator: determinism, shapes, physics of the imagery and the noise model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cromss_ray.data.schema import CLASS_SCHEMES, NODATA, S2_BAND_NAMES
from cromss_ray.data.shards import iter_rows, list_shards, read_manifest
from cromss_ray.data.synth import (
    DW_BUILT,
    DW_CROPS,
    DW_SNOW,
    DW_TREES,
    DW_WATER,
    SCHEME_MODELS,
    SUMMER,
    WINTER,
    smooth_fields,
    synth_metadata,
    synthesize,
    synthesize_row,
)

B3, B4, B8, B11 = (S2_BAND_NAMES.index(band) for band in ("B3", "B4", "B8", "B11"))


@pytest.fixture(scope="module")
def pretrain_rows() -> list[dict[str, np.ndarray]]:
    return [synthesize_row("pretrain", index, 96, 3, 0.2)[0] for index in range(10)]


def _physical_s2(row: dict[str, np.ndarray]) -> np.ndarray:
    meta = synth_metadata("pretrain")
    return row["s2"].astype(np.float32) * meta.s2.scale + meta.s2.offset


def _physical_s1(row: dict[str, np.ndarray]) -> np.ndarray:
    meta = synth_metadata("pretrain")
    return row["s1"].astype(np.float32) * meta.s1.scale + meta.s1.offset


def _pooled(
    rows: list[dict[str, np.ndarray]], cls: int, season: int, band: int, physical: Callable[[dict], np.ndarray]
) -> np.ndarray:
    """Physical values of ``band`` over the pixels of clean class ``cls`` in ``season``, all rows."""
    return np.concatenate([physical(row)[season, band][row["clean_label"][season] == cls] for row in rows])


def test_class_models_follow_the_class_schemes() -> None:
    for kind, models in SCHEME_MODELS.items():
        assert tuple(model.name for model in models) == CLASS_SCHEMES[kind]


def test_rows_depend_only_on_seed_and_index() -> None:
    first, _ = synthesize_row("pretrain", 4, 32, 11, 0.2)
    again, _ = synthesize_row("pretrain", 4, 32, 11, 0.2)
    other, _ = synthesize_row("pretrain", 4, 32, 12, 0.2)
    for name in ("s1", "s2", "label", "clean_label"):
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["s2"], other["s2"])


def test_pretraining_rows_have_the_released_shapes_and_dtypes(pretrain_rows: list[dict[str, np.ndarray]]) -> None:
    row = pretrain_rows[0]
    assert row["s1"].shape == (4, 2, 96, 96) and row["s1"].dtype == np.uint8
    assert row["s2"].shape == (4, 13, 96, 96) and row["s2"].dtype == np.uint8
    meta = synth_metadata("pretrain")
    assert meta.s1.representation == meta.s2.representation == "physical", "quantised physical values, not v8"
    assert row["label"].shape == row["clean_label"].shape == (4, 96, 96)
    assert max(int(r["label"].max()) for r in pretrain_rows) <= 8
    assert len(row["dates"]) == 4 and [int(date[5:7]) for date in row["dates"]] == sorted(
        int(d[5:7]) for d in row["dates"]
    )


def test_spectra_are_class_specific(pretrain_rows: list[dict[str, np.ndarray]]) -> None:
    water_nir = _pooled(pretrain_rows, DW_WATER, SUMMER, B8, _physical_s2)
    trees_nir = _pooled(pretrain_rows, DW_TREES, SUMMER, B8, _physical_s2)
    trees_red = _pooled(pretrain_rows, DW_TREES, SUMMER, B4, _physical_s2)
    assert water_nir.mean() < 0.08 < 0.2 < trees_nir.mean()
    ndvi = (trees_nir - trees_red) / (trees_nir + trees_red)
    assert ndvi.mean() > 0.5
    snow_green = _pooled(pretrain_rows, DW_SNOW, WINTER, B3, _physical_s2)
    snow_swir = _pooled(pretrain_rows, DW_SNOW, WINTER, B11, _physical_s2)
    assert snow_green.size > 100 and snow_green.mean() > 0.5 > 0.2 > snow_swir.mean()


def test_crops_are_greener_in_summer_than_in_winter(pretrain_rows: list[dict[str, np.ndarray]]) -> None:
    def ndvi(season: int) -> float:
        nir = _pooled(pretrain_rows, DW_CROPS, season, B8, _physical_s2)
        red = _pooled(pretrain_rows, DW_CROPS, season, B4, _physical_s2)
        return float(((nir - red) / (nir + red)).mean())

    assert ndvi(SUMMER) > ndvi(WINTER) + 0.2


def test_backscatter_separates_built_area_from_water_and_has_speckle(
    pretrain_rows: list[dict[str, np.ndarray]],
) -> None:
    built_vv = _pooled(pretrain_rows, DW_BUILT, SUMMER, 0, _physical_s1)
    water_vv = _pooled(pretrain_rows, DW_WATER, SUMMER, 0, _physical_s1)
    assert np.median(built_vv) > np.median(water_vv) + 10.0
    trees_vh = _pooled(pretrain_rows, DW_TREES, SUMMER, 1, _physical_s1)
    assert 1.5 < trees_vh.std() < 5.0
    assert trees_vh.mean() < _pooled(pretrain_rows, DW_TREES, SUMMER, 0, _physical_s1).mean() - 3.0


@settings(max_examples=12, deadline=None)
@given(noise_rate=st.floats(0.0, 0.6), index=st.integers(0, 50))
def test_each_season_has_exactly_the_noise_rate(noise_rate: float, index: int) -> None:
    row, counts = synthesize_row("pretrain", index, 32, 5, noise_rate)
    corrupted = (row["label"] != row["clean_label"]).reshape(4, -1).sum(axis=1)
    assert corrupted.tolist() == [round(noise_rate * 32 * 32)] * 4
    assert sum(counts.values()) == corrupted.sum()


def test_noise_changes_clean_labels_only_to_other_classes(pretrain_rows: list[dict[str, np.ndarray]]) -> None:
    flips = set()
    for row in pretrain_rows:
        changed = row["label"] != row["clean_label"]
        flips |= set(zip(row["clean_label"][changed].tolist(), row["label"][changed].tolist(), strict=True))
    assert (DW_WATER, 3) in flips or (3, DW_WATER) in flips
    assert all(clean != noisy for clean, noisy in flips)


def test_zero_noise_gives_the_clean_labels() -> None:
    row, counts = synthesize_row("pretrain", 2, 32, 5, 0.0)
    np.testing.assert_array_equal(row["label"], row["clean_label"])
    assert sum(counts.values()) == 0


@pytest.mark.parametrize("kind", ["dw", "osm", "dfc2020"])
def test_downstream_rows_have_one_season_and_a_few_percent_ignored(kind: str) -> None:
    shares = []
    for index in range(4):
        row, _ = synthesize_row(kind, index, 64, 9, 0.2)
        assert row["s1"].shape == (2, 64, 64) and row["s1"].dtype == np.float32
        assert row["s2"].shape == (13, 64, 64) and row["s2"].dtype == np.uint16
        labels = row["label"]
        assert labels.shape == (64, 64) and "clean_label" not in row
        assert set(np.unique(labels)) <= {*range(len(CLASS_SCHEMES[kind])), NODATA}
        shares.append(float((labels == NODATA).mean()))
    assert all(0.005 < share < 0.06 for share in shares)


def test_synthesize_writes_shards_and_reports_the_noise(tmp_path: Path) -> None:
    manifest = synthesize(tmp_path, "pretrain", locations=3, size=32, seed=1, noise_rate=0.25)
    assert manifest.total_rows == 3 and manifest.metadata.has_clean_label
    noise = manifest.provenance["noise"]
    assert noise["target_rate"] == 0.25
    assert noise["achieved_rate"] == pytest.approx(round(0.25 * 32 * 32) / (32 * 32))
    assert sum(noise["by_mechanism"].values()) == pytest.approx(noise["achieved_rate"])
    assert read_manifest(tmp_path) == manifest
    rows = list(iter_rows(list_shards(tmp_path)[0]))
    expected, _ = synthesize_row("pretrain", 2, 32, 1, 0.25)
    np.testing.assert_array_equal(rows[2]["s2"], expected["s2"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"kind": "moon"}, "unknown kind"),
        ({"locations": 0}, "locations must be at least 1"),
        ({"size": 4}, "size must be at least 8"),
        ({"noise_rate": 1.5}, r"noise_rate must be in \[0, 1\]"),
    ],
)
def test_invalid_parameters_are_refused(tmp_path: Path, arguments: dict[str, object], message: str) -> None:
    parameters = {"kind": "pretrain", "locations": 1, "size": 16, "seed": 0, **arguments}
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path, **parameters)


def test_smooth_fields_are_standardised_and_smoother_for_longer_lengths() -> None:
    fields = smooth_fields(np.random.default_rng(0), 128, [4, 32])
    assert fields.shape == (2, 128, 128)
    np.testing.assert_allclose(fields.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(fields.std(axis=(1, 2)), 1.0, atol=1e-4)
    roughness = np.abs(np.diff(fields, axis=2)).mean(axis=(1, 2))
    assert roughness[1] < roughness[0] / 4
