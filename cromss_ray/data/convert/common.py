"""What every converter shares: source errors, GeoTIFF reading, patching and the write loop.

A converter lists its samples as :class:`SourceSample` (a human-readable ``where`` and a
loader returning the sample's rows) and hands them to :func:`convert_samples`, which
validates each sample's rows as a whole before writing any of them. A bad sample stops the
conversion with an error naming it, or with ``skip_bad`` is skipped and counted in the
manifest; rows already written always stay valid (``docs/data.md``). The rasters of one
sample must lie on the same ground: :func:`check_same_grid` refuses a CRS or footprint
mismatch, naming both files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cromss_ray.data.schema import NODATA, Manifest, ShardMetadata
from cromss_ray.data.shards import RowValidationError, ShardWriter, validate_row

ProgressCallback = Callable[[int, int], None]
Row = dict[str, Any]
SKIPPED_LISTED = 100
"""How many skipped samples the manifest names (all are counted)."""
GRID_TOLERANCE = 0.05
"""How far the footprints of one sample's rasters may differ, as a share of the tile's extent.
The SSL4EO-S12 exports do not share a grid exactly (in location 0000200, S1 is offset from
S2 by 1.5 % of the tile, and the 60 m bands by 1 %); a wrong tile or transform is off by more."""


class SourceError(ValueError):
    """Source data that cannot be converted; the message names the file, id or row."""


@dataclass(frozen=True)
class SourceSample:
    """One unit of source data (a location, a tile) and how to turn it into rows."""

    where: str
    load: Callable[[], list[Row]]


@dataclass
class ConversionSummary:
    """What a conversion wrote and what it skipped."""

    out_dir: Path
    manifest: Manifest
    skipped: list[str] = field(default_factory=list)

    def line(self, command: str) -> str:
        """The one-line summary a command ends with."""
        size_mb = sum(entry.bytes for entry in self.manifest.files) / 2**20
        return (
            f"{command}: wrote {self.manifest.total_rows} rows in {len(self.manifest.files)} files "
            f"({size_mb:.1f} MB) to {self.out_dir}; skipped {len(self.skipped)} bad samples"
        )


def convert_samples(
    out_dir: str | os.PathLike[str],
    meta: ShardMetadata,
    samples: Sequence[SourceSample],
    *,
    skip_bad: bool = False,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
    target_bytes: int = 256 * 2**20,
) -> ConversionSummary:
    """Load, validate and write every sample; see the module docstring for bad samples."""
    skipped: list[str] = []
    with ShardWriter(out_dir, meta, overwrite=overwrite, provenance=provenance, target_bytes=target_bytes) as writer:
        for done, sample in enumerate(samples, start=1):
            try:
                rows = sample.load()
                for row in rows:
                    validate_row(meta, row)
            except (SourceError, RowValidationError) as exc:
                message = str(exc) if isinstance(exc, SourceError) else f"{sample.where}: {exc}"
                if not skip_bad:
                    raise SourceError(message) from None
                skipped.append(message)
            else:
                for row in rows:
                    writer.write(row)
            if progress is not None:
                progress(done, len(samples))
        writer.provenance["skipped"] = {"count": len(skipped), "samples": skipped[:SKIPPED_LISTED]}
        manifest = writer.close()
    return ConversionSummary(out_dir=Path(out_dir), manifest=manifest, skipped=skipped)


@dataclass(frozen=True)
class Grid:
    """Where a raster lies: its CRS (None when it has none) and bounds (left, bottom, right, top)."""

    crs: Any
    bounds: tuple[float, float, float, float]


class Raster(NamedTuple):
    """A GeoTIFF's (bands, H, W) pixels, declared no-data value and grid."""

    pixels: np.ndarray
    nodata: float | None
    grid: Grid


def check_same_grid(rasters: Sequence[tuple[Path, Grid]]) -> None:
    """Refuse rasters of one sample that lie elsewhere than the first: another CRS, or a footprint
    off by more than :data:`GRID_TOLERANCE` of the tile (a mismatched transform). Names both files."""
    first_path, first = rasters[0]
    left, bottom, right, top = first.bounds
    extents = (right - left, top - bottom) * 2
    for path, grid in rasters[1:]:
        if grid.crs != first.crs:
            raise SourceError(f"{path}: CRS {grid.crs} differs from {first.crs} of {first_path}")
        offset = max(abs(ours - theirs) / extent for ours, theirs, extent in zip(grid.bounds, first.bounds, extents))
        if offset > GRID_TOLERANCE:
            bounds = ", ".join(f"{value:.6g}" for value in grid.bounds)
            first_bounds = ", ".join(f"{value:.6g}" for value in first.bounds)
            raise SourceError(
                f"{path}: footprint ({bounds}) is off that of {first_path} ({first_bounds}) by {offset:.1%} of the "
                f"tile, more than the {GRID_TOLERANCE:.0%} accepted: their transforms do not match"
            )


def read_raster(
    path: Path,
    *,
    out_shape: tuple[int, int] | None = None,
    resampling: str = "bilinear",
    bands: Sequence[int] | None = None,
) -> Raster:
    """(bands, H, W) pixels of a GeoTIFF, its declared no-data value and its grid.

    With ``out_shape`` the raster is resampled over its own footprint to that grid
    (``resampling`` is a rasterio method name: 'bilinear', 'cubic', 'nearest').
    Raises :class:`SourceError` naming the file when it is missing or unreadable.
    """
    import rasterio
    from rasterio.enums import Resampling

    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    try:
        with rasterio.open(path) as dataset:
            indexes = list(bands) if bands is not None else list(range(1, dataset.count + 1))
            if max(indexes) > dataset.count:
                raise SourceError(f"{path}: has {dataset.count} bands, band {max(indexes)} was asked for")
            shape = None if out_shape is None else (len(indexes), *out_shape)
            pixels = dataset.read(indexes, out_shape=shape, resampling=Resampling[resampling])
            return Raster(pixels, dataset.nodata, Grid(dataset.crs, tuple(dataset.bounds)))
    except rasterio.errors.RasterioError as exc:
        raise SourceError(f"{path}: unreadable GeoTIFF ({exc})") from None


def as_uint16(pixels: np.ndarray, where: Path) -> np.ndarray:
    """Integer S2 digital numbers as uint16; other dtypes or out-of-range values are errors."""
    if pixels.dtype.kind not in "ui":
        raise SourceError(f"{where}: S2 pixels are {pixels.dtype}, expected integer digital numbers")
    if pixels.size and (pixels.min() < 0 or pixels.max() > np.iinfo(np.uint16).max):
        raise SourceError(f"{where}: S2 values outside 0..65535")
    return pixels.astype(np.uint16)


def as_float32(pixels: np.ndarray, where: Path) -> np.ndarray:
    """S1 backscatter (dB) as float32; integer rasters are not backscatter in dB."""
    if pixels.dtype.kind != "f":
        raise SourceError(f"{where}: S1 pixels are {pixels.dtype}, expected float backscatter in dB")
    return pixels.astype(np.float32)


def remap_labels(values: np.ndarray, mapping: dict[int, int], nodata: float | None, where: Path) -> np.ndarray:
    """Source label values -> class indices (``NODATA`` for ignored values) via ``mapping``.

    Pixels equal to the raster's declared ``nodata`` become ``NODATA``; any other value not
    in ``mapping`` is an error naming the file and the values.
    """
    values = np.asarray(values)
    ignored = np.zeros(values.shape, dtype=bool) if nodata is None else values == nodata
    present = np.unique(values[~ignored])
    unknown = [int(value) for value in present if int(value) not in mapping or value != int(value)]
    if unknown:
        raise SourceError(f"{where}: label values {unknown[:10]} are not in the class mapping {sorted(mapping)}")
    lookup_keys = np.array(sorted(mapping), dtype=np.int64)
    lookup_values = np.array([mapping[key] for key in lookup_keys], dtype=np.uint8)
    labels = np.full(values.shape, NODATA, dtype=np.uint8)
    valid = ~ignored
    labels[valid] = lookup_values[np.searchsorted(lookup_keys, values[valid].astype(np.int64))]
    return labels


def cut_patches(
    arrays: dict[str, np.ndarray], patch_size: int, label_field: str = "label"
) -> list[tuple[tuple[int, int], dict[str, np.ndarray]]]:
    """Cut (…, H, W) arrays into ``patch_size`` patches on a regular grid.

    A tile that is not a multiple of ``patch_size`` is padded at the bottom and right:
    images by edge replication, the label with ``NODATA`` (so padding is never scored).
    Returns ``((grid row, grid col), patch arrays)`` for each patch with a labelled pixel.
    """
    height, width = arrays[label_field].shape[-2:]
    rows, cols = -(-height // patch_size), -(-width // patch_size)
    pad_h, pad_w = rows * patch_size - height, cols * patch_size - width
    padded = {}
    for name, array in arrays.items():
        widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
        if name == label_field:
            padded[name] = np.pad(array, widths, mode="constant", constant_values=NODATA)
        else:
            padded[name] = np.pad(array, widths, mode="edge")
    patches = []
    for row in range(rows):
        for col in range(cols):
            window = (
                ...,
                slice(row * patch_size, (row + 1) * patch_size),
                slice(col * patch_size, (col + 1) * patch_size),
            )
            patch = {name: np.ascontiguousarray(array[window]) for name, array in padded.items()}
            if (patch[label_field] != NODATA).any():
                patches.append(((row, col), patch))
    return patches


ISO_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")


def iso_date(compact: str) -> str:
    """'20200604' (or a name starting with it) -> '2020-06-04'; '' when there is no date."""
    match = ISO_DATE.match(compact)
    return f"{match.group(1)}-{match.group(2)}-{match.group(3)}" if match else ""
