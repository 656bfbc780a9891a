"""Class-map GeoTIFFs of any size from Sentinel-1/2 GeoTIFFs, on the input's grid and CRS (spec 1, 11).

The images are read strip by strip and predicted by :func:`~cromss_ray.models.segmenter.iter_probability_rows`
(tiled, overlapping, blended windows), so memory grows with the image width, not its size.
The model's bands are picked by name when the bands are named (given names, else the band
descriptions), by position otherwise (:meth:`~cromss_ray.models.segmenter.Segmenter.band_indexes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from cromss_ray.data.schema import NODATA, ModalitySpec, class_colors
from cromss_ray.models.segmenter import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_TILE,
    BandNames,
    Segmenter,
    class_map,
    iter_probability_rows,
)


@dataclass(frozen=True)
class _Source:
    """An open input GeoTIFF and the 1-based band indexes the model reads from it."""

    path: Path
    dataset: rasterio.DatasetReader
    indexes: list[int]


def _open_source(segmenter: Segmenter, modality: str, path: Path, names: Sequence[str] | None) -> _Source:
    """Open ``path`` and pick the model's bands (by ``names``, else by its band descriptions, else by
    position), checked against the storage the segmenter's inputs declare."""
    try:
        dataset = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise ValueError(f"{path}: cannot open as a GeoTIFF ({exc})") from None
    try:
        positions = segmenter.band_indexes(modality, dataset.count, names or _descriptions(dataset, path), str(path))
        indexes = [position + 1 for position in positions]
        _check_storage(dataset, path, indexes, segmenter.inputs[modality], modality)
    except ValueError:
        dataset.close()
        raise
    return _Source(path, dataset, indexes)


def _descriptions(dataset: rasterio.DatasetReader, path: Path) -> list[str] | None:
    """The band descriptions of ``dataset``: None when no band has one; all bands must have one otherwise."""
    described = [bool(description and description.strip()) for description in dataset.descriptions]
    if not any(described):
        return None
    if not all(described):
        bare = [str(index + 1) for index, has in enumerate(described) if not has]
        bands = f"bands {', '.join(bare)} have" if len(bare) > 1 else f"band {bare[0]} has"
        raise ValueError(f"{path}: {bands} no description, the others do; describe every band or give the names")
    return [str(description) for description in dataset.descriptions]


def _check_storage(
    dataset: rasterio.DatasetReader, path: Path, indexes: Sequence[int], spec: ModalitySpec, modality: str
) -> None:
    """The read bands hold ``spec``'s dtype, and declare no scale, offset or unit other than ``spec``'s."""
    stored_as = f"{spec.dtype} ({spec.representation} values{f' in {spec.unit}' if spec.unit else ''})"
    dtypes = {dataset.dtypes[index - 1] for index in indexes}
    if dtypes != {spec.dtype}:
        raise ValueError(
            f"{path}: holds {'/'.join(sorted(dtypes))} values, a {modality.upper()} input of this model is {stored_as}"
        )
    for index in indexes:
        scale, offset, unit = dataset.scales[index - 1], dataset.offsets[index - 1], dataset.units[index - 1]
        if (scale, offset) not in ((1.0, 0.0), (spec.scale, spec.offset)):
            raise ValueError(
                f"{path}: band {index} declares value x {scale:g} + {offset:g}; a {modality.upper()} input of this "
                f"model is {stored_as}, value x {spec.scale:g} + {spec.offset:g}"
            )
        if unit and unit.strip().lower() != spec.unit.lower():
            raise ValueError(
                f"{path}: band {index} declares the unit {unit!r}; a {modality.upper()} input of this model is {stored_as}"
            )


def _check_same_grid(sources: Sequence[_Source]) -> None:
    first = sources[0]
    for other in sources[1:]:
        same = (
            other.dataset.shape == first.dataset.shape
            and other.dataset.transform == first.dataset.transform
            and other.dataset.crs == first.dataset.crs
        )
        if not same:
            raise ValueError(
                f"{other.path} and {first.path} are not on the same grid: shapes {other.dataset.shape} / "
                f"{first.dataset.shape}, CRS {other.dataset.crs} / {first.dataset.crs}, transforms "
                f"{tuple(other.dataset.transform)[:6]} / {tuple(first.dataset.transform)[:6]}"
            )


def _invalid(sources: Sequence[_Source], first: int, stop: int, width: int) -> np.ndarray:
    """Rows ``first:stop`` where any input is masked (its no-data value, alpha or internal mask)."""
    window = Window(0, first, width, stop - first)
    invalid = np.zeros((stop - first, width), dtype=bool)
    for source in sources:
        invalid |= source.dataset.dataset_mask(window=window) == 0
    return invalid


def _colormap(class_names: Sequence[str]) -> dict[int, tuple[int, int, int, int]]:
    """The GeoTIFF palette: the class colours of the run figures (Dynamic World where the names match)."""
    return {index: (*(round(255 * c) for c in colour), 255) for index, colour in enumerate(class_colors(class_names))}


def predict_geotiff(
    segmenter: Segmenter,
    out: str | os.PathLike[str],
    *,
    s1: str | os.PathLike[str] | None = None,
    s2: str | os.PathLike[str] | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tags: Mapping[str, str] | None = None,
    band_names: BandNames | None = None,
) -> Path:
    """Write the class map of Sentinel-1/2 GeoTIFFs to ``out``, on their grid and in their CRS.

    The inputs the segmenter needs must share size, transform and CRS and hold the dtype
    (and any declared scale, offset and unit) of ``segmenter.inputs``; their values become
    model inputs by the rule of spec 9. ``band_names`` (by modality) name a GeoTIFF's bands
    in place of its band descriptions. The output is a one-band uint8 GeoTIFF of class
    indices with the class colours and names (tag ``classes``), ``NODATA`` (255) where an
    input is masked (its no-data, or a value that is not finite). It is written under a
    temporary name and renamed when complete.
    """
    paths = {"s1": s1, "s2": s2}
    missing = [modality for modality in segmenter.modalities if paths[modality] is None]
    if missing:
        raise ValueError(
            f"the {segmenter.branch} prediction needs the {' and '.join(m.upper() for m in missing)} GeoTIFF"
        )
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    sources: list[_Source] = []
    try:
        for modality in segmenter.modalities:
            names = (band_names or {}).get(modality)
            sources.append(_open_source(segmenter, modality, Path(paths[modality]), names))
        _check_same_grid(sources)
        reference = sources[0].dataset
        height, width = reference.height, reference.width

        def read_rows(first: int, stop: int) -> dict[str, np.ndarray]:
            window = Window(0, first, width, stop - first)
            return {
                modality: segmenter.network_input(modality, source.dataset.read(source.indexes, window=window))
                for modality, source in zip(segmenter.modalities, sources, strict=True)
            }

        profile = {
            "driver": "GTiff",
            "dtype": "uint8",
            "count": 1,
            "height": height,
            "width": width,
            "crs": reference.crs,
            "transform": reference.transform,
            "nodata": NODATA,
            "compress": "deflate",
        }
        with rasterio.open(partial, "w", **profile) as target:
            target.write_colormap(1, _colormap(segmenter.class_names))
            target.update_tags(classes=json.dumps(list(segmenter.class_names)), **dict(tags or {}))
            for top, block in iter_probability_rows(
                segmenter, read_rows, height, width, tile=tile, overlap=overlap, batch_size=batch_size
            ):
                stop = top + block.shape[1]
                classes = class_map(block).astype(np.uint8)
                classes[_invalid(sources, top, stop, width)] = NODATA
                target.write(classes, 1, window=Window(0, top, width, stop - top))
        os.replace(partial, out)
    finally:
        for source in sources:
            source.dataset.close()
        partial.unlink(missing_ok=True)
    return out
