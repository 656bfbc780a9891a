"""The shard schema: class schemes, band subsets, shapes and metadata (spec 9, 10)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from cromss_ray.data.schema import (
    CLASS_SCHEMES,
    METADATA_KEY,
    SCHEMA_VERSION,
    NODATA,
    S1_BAND_NAMES,
    S2_BAND_NAMES,
    S2_BAND_SUBSETS,
    Manifest,
    ModalitySpec,
    ShardFile,
    ShardMetadata,
    canonical_band_name,
    read_metadata,
)


def _pretrain_meta(**overrides: object) -> ShardMetadata:
    fields = {
        "kind": "pretrain",
        "classes": CLASS_SCHEMES["pretrain"],
        "s1": ModalitySpec(dtype="uint8", bands=S1_BAND_NAMES, scale=1 / 255, unit="normalized", representation="v8"),
        "s2": ModalitySpec(dtype="uint8", bands=S2_BAND_NAMES, scale=1 / 255, unit="normalized", representation="v8"),
        "has_clean_label": True,
    }
    fields.update(overrides)
    return ShardMetadata(**fields)


def test_class_schemes_match_spec_10() -> None:
    assert len(CLASS_SCHEMES["pretrain"]) == 9
    assert CLASS_SCHEMES["pretrain"][0] == "water" and CLASS_SCHEMES["pretrain"][8] == "snow and ice"
    assert CLASS_SCHEMES["dw"] == CLASS_SCHEMES["pretrain"]
    assert len(CLASS_SCHEMES["osm"]) == 13
    assert CLASS_SCHEMES["dfc2020"] == (
        "water",
        "forest",
        "grassland",
        "wetland",
        "cropland",
        "shrubland",
        "urban",
        "barren",
    )
    assert NODATA == 255


def test_band_subsets_match_spec_9() -> None:
    assert S2_BAND_SUBSETS[13] == tuple(range(13))
    assert S2_BAND_SUBSETS[12] == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12)
    assert [S2_BAND_NAMES[i] for i in S2_BAND_SUBSETS[9]] == ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B11", "B12"]
    assert [S2_BAND_NAMES[i] for i in S2_BAND_SUBSETS[3]] == ["B4", "B3", "B2"]
    assert "B10" not in [S2_BAND_NAMES[i] for i in S2_BAND_SUBSETS[12]]


def test_band_names_are_read_in_their_common_spellings() -> None:
    spellings = {"B02": "B2", "b8a": "B8A", "B08A": "B8A", " B12 ": "B12", "B1": "B1", "B10": "B10"}
    assert {name: canonical_band_name(name, "s2") for name in spellings} == spellings
    assert canonical_band_name("vh", "s1") == "VH"
    for name, modality in (("B13", "s2"), ("B0", "s2"), ("red", "s2"), ("VV", "s2"), ("B2", "s1"), ("HH", "s1")):
        assert canonical_band_name(name, modality) is None


def test_shapes_with_four_seasons_and_with_one() -> None:
    meta = _pretrain_meta()
    assert meta.image_shape("s1", 264, 264) == (4, 2, 264, 264)
    assert meta.image_shape("s2", 264, 260) == (4, 13, 264, 260)
    assert meta.label_shape(264, 264) == (4, 264, 264)
    single = _pretrain_meta(kind="dw", seasons=1, has_clean_label=False)
    assert single.image_shape("s2", 64, 64) == (13, 64, 64)
    assert single.label_shape(64, 64) == (64, 64)
    assert meta.numpy_dtype("s2") == np.dtype("<u1")


def test_metadata_round_trips_through_the_arrow_schema() -> None:
    meta = _pretrain_meta()
    schema = meta.arrow_schema()
    assert schema.names == ["id", "dates", "height", "width", "s1", "s2", "label", "clean_label"]
    assert read_metadata(schema, "x.parquet") == meta
    assert "clean_label" not in _pretrain_meta(has_clean_label=False).arrow_schema().names


def test_read_metadata_names_the_file_when_missing_or_invalid() -> None:
    with pytest.raises(ValueError, match=r"a\.parquet: no 'cromss' metadata"):
        read_metadata(pa.schema([pa.field("id", pa.string())]), "a.parquet")
    bad = pa.schema([pa.field("id", pa.string())], metadata={METADATA_KEY: json.dumps({"kind": "moon"}).encode()})
    with pytest.raises(ValueError, match=r"b\.parquet: invalid shard metadata"):
        read_metadata(bad, "b.parquet")


def test_unknown_dtype_is_rejected() -> None:
    with pytest.raises(ValueError):
        ModalitySpec(dtype="int64", bands=S1_BAND_NAMES)


def test_manifest_round_trips_as_json() -> None:
    meta = _pretrain_meta()
    manifest = Manifest(
        kind="pretrain",
        metadata=meta,
        files=[ShardFile(name="part-00000.parquet", rows=3, bytes=100)],
        total_rows=3,
        class_histogram=[1] * 9,
        nodata_pixels=0,
        provenance={"source": "test"},
    )
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest


def _footer(data: dict[str, object]) -> pa.Schema:
    return pa.schema([pa.field("id", pa.string())], metadata={METADATA_KEY: json.dumps(data).encode()})


def _schema_1(s1: dict[str, object], s2: dict[str, object]) -> dict[str, object]:
    """Metadata as schema-1 writers wrote it: no representation."""
    return {"schema_version": 1, "kind": "dw", "classes": list(CLASS_SCHEMES["dw"]), "seasons": 1, "s1": s1, "s2": s2}


RAW_S1_V1 = {"dtype": "float32", "bands": list(S1_BAND_NAMES), "scale": 1.0, "offset": 0.0, "unit": "dB"}
RAW_S2_V1 = {"dtype": "uint16", "bands": list(S2_BAND_NAMES), "scale": 1e-4, "offset": 0.0, "unit": "reflectance"}
RELEASED_V1 = {"dtype": "uint8", "bands": list(S2_BAND_NAMES), "scale": 1 / 255, "offset": 0.0, "unit": "normalized"}


def test_schema_1_metadata_is_read_where_its_representation_is_certain() -> None:
    raw = read_metadata(_footer(_schema_1(RAW_S1_V1, RAW_S2_V1)), "old.parquet")
    assert raw.schema_version == SCHEMA_VERSION
    assert (raw.s1.representation, raw.s2.representation) == ("physical", "physical")
    released = read_metadata(_footer(_schema_1(RAW_S1_V1, RELEASED_V1)), "old.parquet")
    assert released.s2.representation == "v8"


@pytest.mark.parametrize(
    "s2",
    [
        {**RAW_S2_V1, "unit": ""},
        {**RELEASED_V1, "dtype": "float32"},
        {**RELEASED_V1, "scale": 1.0},
    ],
)
def test_schema_1_metadata_of_unknown_representation_names_the_file_and_the_fix(s2: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"old\.parquet: .*s2 .*cromss data migrate DIR --s1 physical\|v8"):
        read_metadata(_footer(_schema_1(RAW_S1_V1, s2)), "old.parquet")


def test_metadata_without_a_representation_names_the_file() -> None:
    current = {**_schema_1(RAW_S1_V1, {**RAW_S2_V1, "representation": "physical"}), "schema_version": SCHEMA_VERSION}
    with pytest.raises(ValueError, match=r"new\.parquet: .*s1 does not say which representation it holds"):
        read_metadata(_footer(current), "new.parquet")
    with pytest.raises(ValueError, match=r"future\.parquet: .*schema_version 9"):
        read_metadata(_footer({**current, "schema_version": 9}), "future.parquet")


@pytest.mark.parametrize(
    ("modality", "bands", "message"),
    [
        ("s1", ["VV", "HH"], "s1 band 'HH' is not one of VV, VH"),
        ("s2", ["B2", "B13"], "s2 band 'B13' is not one of B1"),
    ],
)
def test_bands_outside_s1_and_s2_name_the_file_and_band(modality: str, bands: list[str], message: str) -> None:
    specs = {
        "s1": {**RAW_S1_V1, "representation": "physical"},
        "s2": {**RAW_S2_V1, "representation": "physical"},
    }
    specs[modality]["bands"] = bands
    data = {**_schema_1(specs["s1"], specs["s2"]), "schema_version": SCHEMA_VERSION}
    with pytest.raises(ValueError, match=rf"odd\.parquet: .*{message}"):
        read_metadata(_footer(data), "odd.parquet")


def test_physical_values_need_their_modality_unit_and_v8_needs_uint8() -> None:
    with pytest.raises(ValueError, match="s2 physical values must be in 'reflectance', not 'dB'"):
        _pretrain_meta(s2=ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, unit="dB", representation="physical"))
    with pytest.raises(ValueError, match="v8 codes are stored as uint8, not uint16"):
        ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, representation="v8")
