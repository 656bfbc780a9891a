"""The NoLDO-S12 Parquet schema: columns, class schemes and the metadata each shard declares.

A shard is a Parquet file with one row per location (pretraining) or per tile / patch
(downstream). Arrays are stored as raw little-endian bytes in binary columns; their
shape follows from ``height``/``width`` of the row and the band and season counts in
the shard's metadata, and their dtype and scaling are declared there too (spec 9, 10).
See ``docs/data.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 2
"""2: each modality declares its ``representation``; 1 did not (:func:`upgrade_metadata`)."""
METADATA_KEY = b"cromss"
MANIFEST_NAME = "manifest.json"
"""File next to the shards that lists them with row counts and class histograms."""
NODATA = 255
"""Label value for pixels without a label (pretraining no-data, downstream ignore)."""

S2_BAND_NAMES = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S1_BAND_NAMES = ("VV", "VH")
MODALITY_BANDS = {"s1": S1_BAND_NAMES, "s2": S2_BAND_NAMES}
PHYSICAL_UNITS = {"s1": "dB", "s2": "reflectance"}
"""Unit of each modality's physical values (reflectance = L1C digital number x 1e-4)."""

S2_BAND_SUBSETS: dict[int, tuple[int, ...]] = {
    13: tuple(range(13)),
    12: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12),
    9: (1, 2, 3, 4, 5, 6, 7, 11, 12),
    3: (3, 2, 1),
}
"""0-based indices into the 13 L1C bands for each S2 band count (spec 9)."""


def s2_subset_names(count: int) -> tuple[str, ...]:
    """Names of the ``count``-band S2 subset, in the order batches hold them (spec 9)."""
    if count not in S2_BAND_SUBSETS:
        raise ValueError(f"no {count}-band S2 subset: the subsets have {sorted(S2_BAND_SUBSETS)} bands")
    return tuple(S2_BAND_NAMES[index] for index in S2_BAND_SUBSETS[count])


def canonical_band_name(name: str, modality: str) -> str | None:
    """``name`` spelt as ``modality``'s band names are here ('B02', 'b8a', ' vv ' -> 'B2', 'B8A', 'VV');
    None when it names none of them (spec 9)."""
    spelt = name.strip().upper()
    if modality == "s2" and spelt.startswith("B"):
        spelt = "B" + (spelt[1:].lstrip("0") or "0")
    return spelt if spelt in MODALITY_BANDS[modality] else None


DW_CLASSES = (
    "water",
    "trees",
    "grass",
    "flooded vegetation",
    "crops",
    "shrub and scrub",
    "built area",
    "bare ground",
    "snow and ice",
)
OSM_CLASSES = (
    "urban fabric",
    "industrial, commercial and transport",
    "arable land",
    "artificial non-agricultural vegetation",
    "forest",
    "mine, dump and construction",
    "water bodies",
    "open spaces",
    "pastures",
    "shrub and herbaceous",
    "permanent crops",
    "wetlands",
    "coastal wetlands",
)
DFC2020_CLASSES = ("water", "forest", "grassland", "wetland", "cropland", "shrubland", "urban", "barren")

CLASS_SCHEMES: dict[str, tuple[str, ...]] = {
    "pretrain": DW_CLASSES,
    "dw": DW_CLASSES,
    "osm": OSM_CLASSES,
    "dfc2020": DFC2020_CLASSES,
}

ShardKind = Literal["pretrain", "dw", "osm", "dfc2020", "custom"]
Representation = Literal["physical", "v8"]
REPRESENTATIONS: tuple[Representation, ...] = ("physical", "v8")

DATASET_NAMES: dict[str, str] = {
    "pretrain": "SSL4EO-S12@NoL",
    "dw": "SSL4EO-S12@DW",
    "osm": "SSL4EO-S12@OSM",
    "dfc2020": "DFC2020",
    "custom": "custom shards",
}
"""Display names of the shard kinds (spec 10)."""

DYNAMIC_WORLD_COLORS = {
    "water": "#419bdf",
    "trees": "#397d49",
    "grass": "#88b053",
    "flooded vegetation": "#7a87c6",
    "crops": "#e49635",
    "shrub and scrub": "#dfc35a",
    "built area": "#c4281b",
    "bare ground": "#a59b8f",
    "snow and ice": "#b39fe1",
}
"""The Dynamic World legend, so pretraining labels look as they do in Earth Engine."""


def class_colors(class_names: Sequence[str]) -> list[tuple[float, float, float]]:
    """One RGB colour per class: the Dynamic World colour where the name has one, else tab20.

    matplotlib is imported here, on use, so reading a schema does not load it.
    """
    from matplotlib import colormaps
    from matplotlib.colors import to_rgb

    fallback = colormaps["tab20"]
    return [
        to_rgb(DYNAMIC_WORLD_COLORS.get(name.lower(), fallback(index % fallback.N)))
        for index, name in enumerate(class_names)
    ]


class ModalitySpec(BaseModel):
    """Storage of one image modality: physical value = stored * scale + offset.

    ``representation`` says what reaches the network (spec 9, ``data.scaling``):
    ``physical`` values (S1 in 'dB', S2 in 'reflectance' = L1C digital number x 1e-4) go
    through the reference's rule; ``v8`` codes (uint8, the released pretraining images)
    are only divided by 255. Every shard declares it; None only for specs outside shards.
    """

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["uint8", "uint16", "float32"]
    bands: tuple[str, ...]
    scale: float = 1.0
    offset: float = 0.0
    unit: str = Field(default="", description="Unit of the physical value: 'reflectance', 'dB' or 'normalized'.")
    representation: Representation | None = None

    @model_validator(mode="after")
    def _v8_is_uint8(self) -> ModalitySpec:
        if self.representation == "v8" and self.dtype != "uint8":
            raise ValueError(f"v8 codes are stored as uint8, not {self.dtype}")
        return self

    def with_bands(self, bands: tuple[str, ...]) -> ModalitySpec:
        """The same storage for a subset (or reordering) of the bands."""
        return self.model_copy(update={"bands": tuple(bands)})


S1_DB_RANGE = (-30.0, 5.0)
"""Backscatter in dB that the synthetic pretraining shards store as uint8 0 .. 255 (``data.synth``)."""


class ShardMetadata(BaseModel):
    """What every shard declares in its Parquet schema metadata under ``cromss``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: ShardKind
    classes: tuple[str, ...]
    nodata: int = Field(default=NODATA, ge=0, le=255, description="Label value that is no-data / ignored.")
    seasons: int = Field(default=4, ge=1, description="Seasons per row (1 for downstream tiles).")
    s1: ModalitySpec
    s2: ModalitySpec
    has_clean_label: bool = False

    @model_validator(mode="before")
    @classmethod
    def _upgraded(cls, data: Any) -> Any:
        """Schema-1 metadata is read where its representation is certain (:func:`upgrade_metadata`)."""
        return upgrade_metadata(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _declared_modalities(self) -> ShardMetadata:
        """Each modality says which representation it holds and stores only S1 / S2 bands (spec 9)."""
        for modality, names in MODALITY_BANDS.items():
            spec = getattr(self, modality)
            if spec.representation is None:
                raise ValueError(
                    f"{modality} does not say which representation it holds ({' or '.join(REPRESENTATIONS)})"
                )
            unknown = [band for band in spec.bands if band not in names]
            if unknown:
                raise ValueError(f"{modality} band {unknown[0]!r} is not one of {', '.join(names)}")
            if spec.representation == "physical" and spec.unit != PHYSICAL_UNITS[modality]:
                raise ValueError(f"{modality} physical values must be in {PHYSICAL_UNITS[modality]!r}, not {spec.unit!r}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ShardMetadata:
        return cls.model_validate(json.loads(raw))

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of a shard of this kind, with this metadata attached."""
        fields = [
            pa.field("id", pa.string(), nullable=False),
            pa.field("dates", pa.list_(pa.string()), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("s1", pa.binary(), nullable=False),
            pa.field("s2", pa.binary(), nullable=False),
            pa.field("label", pa.binary(), nullable=False),
        ]
        if self.has_clean_label:
            fields.append(pa.field("clean_label", pa.binary(), nullable=False))
        return pa.schema(fields, metadata={METADATA_KEY: self.to_bytes()})

    def image_shape(self, modality: Literal["s1", "s2"], height: int, width: int) -> tuple[int, ...]:
        """Shape of one row's ``s1`` / ``s2`` array: (T, B, H, W), or (B, H, W) with one season."""
        bands = len(getattr(self, modality).bands)
        return (self.seasons, bands, height, width) if self.seasons > 1 else (bands, height, width)

    def label_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one row's ``label`` / ``clean_label`` array: (T, H, W), or (H, W)."""
        return (self.seasons, height, width) if self.seasons > 1 else (height, width)

    def numpy_dtype(self, modality: Literal["s1", "s2"]) -> np.dtype:
        return np.dtype(getattr(self, modality).dtype).newbyteorder("<")


MIGRATE_HINT = "cromss data migrate DIR --s1 physical|v8 --s2 physical|v8"


def inferred_representation(spec: dict[str, Any]) -> Representation | None:
    """The representation a schema-1 modality certainly held, else None.

    Schema-1 writers stored backscatter in 'dB' and S2 in 'reflectance' (both physical)
    and the released uint8 images as 'normalized' x 1/255 (the reference's v8 codes).
    """
    unit = spec.get("unit", "")
    if unit in ("dB", "reflectance"):
        return "physical"
    is_v8 = spec.get("dtype") == "uint8" and spec.get("offset", 0.0) == 0.0
    if unit == "normalized" and is_v8 and abs(spec.get("scale", 1.0) * 255.0 - 1.0) < 1e-9:
        return "v8"
    return None


def upgrade_metadata(data: dict[str, Any], declared: dict[str, Representation] | None = None) -> dict[str, Any]:
    """Schema-1 shard metadata as schema 2: each modality's representation inferred, or ``declared``.

    Metadata of the current schema is returned as it is. A modality whose representation
    neither follows for certain nor is declared is an error naming the fix (``cromss data
    migrate``): guessing would feed the network a different input distribution.
    """
    version = data.get("schema_version", SCHEMA_VERSION)
    if version == SCHEMA_VERSION:
        return data
    if version != 1:
        raise ValueError(f"schema_version {version} is not one this code reads (1 or {SCHEMA_VERSION})")
    declared = declared or {}
    upgraded = {**data, "schema_version": SCHEMA_VERSION}
    for modality in ("s1", "s2"):
        spec = data.get(modality)
        if not isinstance(spec, dict):
            continue
        representation = declared.get(modality) or inferred_representation(spec)
        if representation is None:
            raise ValueError(
                f"schema-1 metadata: {modality} ({spec.get('dtype')}, unit {spec.get('unit', '')!r}) may hold "
                f"physical values or the reference's v8 codes; declare which with `{MIGRATE_HINT}`"
            )
        upgraded[modality] = {**spec, "representation": representation}
    return upgraded


def read_metadata(schema: pa.Schema, where: str) -> ShardMetadata:
    """The shard metadata of an Arrow schema; ``where`` (a file name) is named in errors."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{where}: no '{METADATA_KEY.decode()}' metadata in the Parquet schema: not a cromss shard")
    try:
        return ShardMetadata.from_bytes(raw)
    except ValidationError as exc:
        raise ValueError(f"{where}: invalid shard metadata: {validation_problems(exc)}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: invalid shard metadata: {exc}") from None


def validation_problems(exc: ValidationError) -> str:
    """A pydantic error as one line: each problem with the field it concerns."""
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        location = ".".join(str(part) for part in error["loc"])
        problems.append(f"{location}: {message}" if location else message)
    return "; ".join(problems)


class ShardFile(BaseModel):
    """One shard file of a manifest: its name relative to the manifest, rows and size."""

    model_config = ConfigDict(extra="forbid")

    name: str
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    """``manifest.json``: what a shard directory holds (see ``docs/data.md``).

    ``class_histogram[c]`` counts the pixels of class ``c`` in ``label`` over all rows and
    seasons; ``nodata_pixels`` counts the no-data pixels. ``complete`` is false when the
    writer was closed by an error: the listed files are valid, the conversion stopped early.
    ``provenance`` says how the shards were made (source, parameters, noise statistics,
    skipped rows).
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    kind: ShardKind
    metadata: ShardMetadata
    files: list[ShardFile]
    total_rows: int = Field(ge=0)
    class_histogram: list[int]
    nodata_pixels: int = Field(ge=0)
    clean_class_histogram: list[int] | None = None
    clean_nodata_pixels: int | None = None
    complete: bool = True
    provenance: dict[str, Any] = Field(default_factory=dict)
