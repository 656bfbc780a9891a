"""Shared fixtures of the data tests: small synthetic shard sets and raw-file writers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cromss_ray.data.schema import MANIFEST_NAME, METADATA_KEY, ShardMetadata
from cromss_ray.data.shards import encode_row
from cromss_ray.data.synth import synthesize

PRETRAIN_LOCATIONS = 12
DW_TILES = 12
SHARD_SIZE = 64


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic 4-season pretraining locations of 64 x 64 px with clean labels, in 2 files."""
    out = tmp_path_factory.mktemp("pretrain-shards")
    synthesize(out, "pretrain", locations=PRETRAIN_LOCATIONS, size=SHARD_SIZE, seed=7, target_bytes=3 * 2**19)
    return out


@pytest.fixture(scope="session")
def dw_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic one-season SSL4EO-S12@DW-like tiles of 64 x 64 px (9 classes, ignore 255)."""
    out = tmp_path_factory.mktemp("dw-shards")
    synthesize(out, "dw", locations=DW_TILES, size=SHARD_SIZE, seed=8)
    return out


def _write_raw_shard(
    path: Path, meta: ShardMetadata, rows: Sequence[dict[str, Any]], schema: pa.Schema | None = None
) -> Path:
    """Write rows (encoded without validation) or ready records as one Parquet file."""
    records = [row if isinstance(row.get("label"), bytes) else encode_row(meta, row) for row in rows]
    pq.write_table(pa.Table.from_pylist(records, schema=schema or meta.arrow_schema()), path)
    return path


def _write_tif(
    path: Path, pixels: np.ndarray, *, nodata: float | None = None, pixel_size: float = 10.0, like: Path | None = None
) -> Path:
    """Write a (bands, H, W) or (H, W) array as a GeoTIFF on a UTM grid, or with ``like`` on the
    CRS and footprint of that raster (at the array's own resolution)."""
    import rasterio
    from rasterio.transform import Affine, from_bounds

    array = pixels if pixels.ndim == 3 else pixels[None]
    crs, transform = "EPSG:32632", Affine(pixel_size, 0.0, 500000.0, 0.0, -pixel_size, 5300000.0)
    if like is not None:
        with rasterio.open(like) as reference:
            crs, transform = reference.crs, from_bounds(*reference.bounds, array.shape[2], array.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=array.shape[1],
        width=array.shape[2],
        count=array.shape[0],
        dtype=array.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dataset:
        dataset.write(array)
    return path


def _as_schema_1(directory: Path, **s2_changes: object) -> None:
    """Rewrite a shard set's metadata (files and manifest) as schema-1 writers wrote it: no
    representation, and ``s2_changes`` applied to the S2 spec."""

    def old(meta: dict[str, Any]) -> dict[str, Any]:
        modalities = {name: {k: v for k, v in meta[name].items() if k != "representation"} for name in ("s1", "s2")}
        modalities["s2"].update(s2_changes)
        return {**meta, **modalities, "schema_version": 1}

    for path in sorted(directory.glob("*.parquet")):
        table = pq.read_table(path)
        meta = old(json.loads(table.schema.metadata[METADATA_KEY]))
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), path)
    manifest_path = directory / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest.update(schema_version=1, metadata=old(manifest["metadata"]))
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture
def as_schema_1() -> Callable[..., None]:
    """``as_schema_1(directory, **s2_changes)``: the shard set's metadata as schema 1 wrote it."""
    return _as_schema_1


@pytest.fixture
def write_raw_shard() -> Callable[..., Path]:
    """``write_raw_shard(path, meta, rows, schema=None)``: a shard file written without validation."""
    return _write_raw_shard


@pytest.fixture
def write_tif() -> Callable[..., Path]:
    """``write_tif(path, pixels, nodata=None, pixel_size=10.0, like=None)``: a GeoTIFF (see ``_write_tif``)."""
    return _write_tif
