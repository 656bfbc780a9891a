"""Class-map GeoTIFFs of any size from Sentinel-1/2 GeoTIFFs, on the input's grid and CRS (spec 1, 11).

The images are read strip by strip and predicted by :func:`~cromss_ray.models.segmenter.iter_probability_rows`
(tiled, overlapping, blended windows), so memory grows with the image width, not its size.
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

from cromss_ray.data.schema import NODATA, S2_BAND_SUBSETS, class_colors
from cromss_ray.models.segmenter import (
    ALL_S2_BANDS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_TILE,
    Segmenter,
    iter_probability_rows,
)


@dataclass(frozen=True)
class _Source:
    """An open input GeoTIFF and the 1-based band indexes the model reads from it."""

    path: Path
    dataset: rasterio.DatasetReader
    indexes: list[int]


def _open_source(segmenter: Segmenter, modality: str, path: Path) -> _Source:
    """Open ``path`` and pick its bands: S1 needs 2, S2 the model's subset or all 13, of the dtype the
    segmenter's inputs declare."""
    try:
        dataset = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise ValueError(f"{path}: cannot open as a GeoTIFF ({exc})") from None
    count, wanted = dataset.count, segmenter.bands(modality)
    if count == wanted:
        indexes = list(range(1, count + 1))
    elif modality == "s2" and count == ALL_S2_BANDS:
        indexes = [index + 1 for index in S2_BAND_SUBSETS[wanted]]
    else:
        dataset.close()
        expected = f"{wanted} or {ALL_S2_BANDS}" if modality == "s2" else str(wanted)
        raise ValueError(f"{path}: has {count} bands, a {modality.upper()} input needs {expected}")
    spec = segmenter.inputs[modality]
    dtypes = set(dataset.dtypes)
    if dtypes != {spec.dtype}:
        dataset.close()
        raise ValueError(
            f"{path}: holds {'/'.join(sorted(dtypes))} values, a {modality.upper()} input of this model is "
            f"{spec.dtype} ({spec.representation} values{f' in {spec.unit}' if spec.unit else ''})"
        )
    return _Source(path, dataset, indexes)


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
) -> Path:
    """Write the class map of Sentinel-1/2 GeoTIFFs to ``out``, on their grid and in their CRS.

    The inputs the segmenter needs must share size, transform and CRS and hold the dtype
    of ``segmenter.inputs``; their values become model inputs by the rule of spec 9. The
    output is a one-band uint8 GeoTIFF of class indices with the class colours and names
    (tag ``classes``), ``NODATA`` (255) where an input is masked. It is written under a temporary name and renamed when complete.
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
            sources.append(_open_source(segmenter, modality, Path(paths[modality])))
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
                classes = block.argmax(axis=0).astype(np.uint8)
                classes[_invalid(sources, top, stop, width)] = NODATA
                target.write(classes, 1, window=Window(0, top, width, stop - top))
        os.replace(partial, out)
    finally:
        for source in sources:
            source.dataset.close()
        partial.unlink(missing_ok=True)
    return out
