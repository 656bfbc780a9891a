"""Downstream GeoTIFF datasets -> one-season shards cut into patches (spec 10).

Accepted layouts (``docs/data.md``)::

    SSL4EO-S12@DW / @OSM  <root>/<dw|osm>_<train|test>/image_s1/s1_<name>.tif   2 bands, float32 dB
                                                   /image_s2/s2_<name>.tif   13 bands, uint16 L1C
                                                   /label_<dw|osm>/<dw|osm>_<name>.tif
    DFC2020               <root>/ROIs0000_<validation|test>/{s1_0,s2_0,dfc_0}/ROIs0000_<split>_<s1|s2|dfc>_0_p<i>.tif
                     or   <root>/<validation|test>/{s1_<split>,s2_<split>,dfc_<split>}/ (same file names)

``--root`` may also be the split folder itself. DFC2020 trains on its 'validation' patches
and tests on its 'test' patches. Label mappings (spec 10): DW 0 (unlabelled) and 10
(cloud) ignored, the others minus 1; OSM 0 ignored, the others minus 1; DFC2020 1, 2, 4,
5, 6, 7, 9, 10 -> 1, 5, 2, 3, 4, 6, 7, 0 and 3 (savanna), 8 (snow) ignored. Any other label
value is an error. Tiles are cut into ``patch_size`` patches (see :func:`cut_patches`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cromss_ray.data.convert.common import (
    ConversionSummary,
    ProgressCallback,
    Raster,
    Row,
    SourceError,
    SourceSample,
    as_float32,
    as_uint16,
    check_same_grid,
    convert_samples,
    cut_patches,
    iso_date,
    read_raster,
    remap_labels,
)
from cromss_ray.data.schema import CLASS_SCHEMES, NODATA, S1_BAND_NAMES, S2_BAND_NAMES, ModalitySpec, ShardMetadata

DownstreamKind = Literal["dw", "osm", "dfc2020"]
Split = Literal["train", "test"]

DW_LABEL_MAPPING = {0: NODATA, 10: NODATA, **{value: value - 1 for value in range(1, 10)}}
OSM_LABEL_MAPPING = {0: NODATA, **{value: value - 1 for value in range(1, 14)}}
DFC2020_LABEL_MAPPING = {1: 1, 2: 5, 3: NODATA, 4: 2, 5: 3, 6: 4, 7: 6, 8: NODATA, 9: 7, 10: 0}
LABEL_MAPPINGS: dict[str, dict[int, int]] = {
    "dw": DW_LABEL_MAPPING,
    "osm": OSM_LABEL_MAPPING,
    "dfc2020": DFC2020_LABEL_MAPPING,
}
DFC2020_SPLITS = {"train": "validation", "test": "test"}
DW_LABEL_BAND = 2
"""Multi-band DW label files carry the label in band 2, as the reference reads them."""
NAME_DATE = re.compile(r"-(\d{8})$")
DFC_PATCH = re.compile(r"_p(\d+)$")


@dataclass(frozen=True)
class Tile:
    """The three files of one downstream tile and the name its rows are called by."""

    name: str
    s1: Path
    s2: Path
    label: Path
    date: str


def downstream_metadata(kind: DownstreamKind) -> ShardMetadata:
    """One-season shards in the raw dtypes: S2 L1C uint16 (x 1e-4), S1 float32 dB."""
    return ShardMetadata(
        kind=kind,
        classes=CLASS_SCHEMES[kind],
        seasons=1,
        s1=ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB", representation="physical"),
        s2=ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, scale=1e-4, unit="reflectance", representation="physical"),
    )


def find_ssl4eo_tiles(root: Path, kind: Literal["dw", "osm"], split: Split) -> list[Tile]:
    """The tiles of SSL4EO-S12@DW or @OSM, listed from the label folder."""
    split_dir = root if (root / f"label_{kind}").is_dir() else root / f"{kind}_{split}"
    label_dir = split_dir / f"label_{kind}"
    if not label_dir.is_dir():
        raise SourceError(f"no {kind} {split} label folder; looked for {root / f'label_{kind}'}, {label_dir}")
    tiles = []
    for label in sorted(label_dir.glob(f"{kind}_*.tif")):
        name = label.stem[len(kind) + 1 :]
        match = NAME_DATE.search(name)
        tiles.append(
            Tile(
                name=name,
                s1=split_dir / "image_s1" / f"s1_{name}.tif",
                s2=split_dir / "image_s2" / f"s2_{name}.tif",
                label=label,
                date=iso_date(match.group(1)) if match else "",
            )
        )
    return tiles


def find_dfc2020_tiles(root: Path, split: Split) -> list[Tile]:
    """The patches of DFC2020's 'validation' (train) or 'test' split, in patch order."""
    name = DFC2020_SPLITS[split]
    layouts = [
        (root / f"ROIs0000_{name}", "{}_0"),
        (root / name, f"{{}}_{name}"),
        (root, f"{{}}_{name}"),
        (root, "{}_0"),
    ]
    found = [(base, pattern) for base, pattern in layouts if (base / pattern.format("dfc")).is_dir()]
    if not found:
        looked = ", ".join(str(base / pattern.format("dfc")) for base, pattern in layouts)
        raise SourceError(f"no DFC2020 {name} label folder; looked for {looked}")
    base, pattern = found[0]
    numbered = []
    for label in (base / pattern.format("dfc")).glob(f"ROIs0000_{name}_dfc_0_p*.tif"):
        match = DFC_PATCH.search(label.stem)
        if match is None:
            continue
        tile = Tile(
            name=label.stem.replace("_dfc_", "_"),
            s1=base / pattern.format("s1") / label.name.replace("_dfc_", "_s1_"),
            s2=base / pattern.format("s2") / label.name.replace("_dfc_", "_s2_"),
            label=label,
            date="",
        )
        numbered.append((int(match.group(1)), tile))
    return [tile for _, tile in sorted(numbered, key=lambda pair: pair[0])]


def _read_label(kind: DownstreamKind, raster: Raster, path: Path) -> np.ndarray:
    values = raster.pixels
    band = values[DW_LABEL_BAND - 1] if kind == "dw" and values.shape[0] >= DW_LABEL_BAND else values[0]
    return remap_labels(band, LABEL_MAPPINGS[kind], raster.nodata, path)


def load_tile(kind: DownstreamKind, tile: Tile, patch_size: int) -> list[Row]:
    """The rows (patches with a labelled pixel) of one tile; its three rasters must share CRS and footprint."""
    rasters = {path: read_raster(path) for path in (tile.s2, tile.s1, tile.label)}
    check_same_grid([(path, raster.grid) for path, raster in rasters.items()])
    s2 = as_uint16(rasters[tile.s2].pixels, tile.s2)
    s1 = as_float32(rasters[tile.s1].pixels, tile.s1)
    label = _read_label(kind, rasters[tile.label], tile.label)
    if s2.shape[0] != len(S2_BAND_NAMES):
        raise SourceError(f"{tile.s2}: {s2.shape[0]} bands, expected {len(S2_BAND_NAMES)} (L1C B1..B12, B8A)")
    if s1.shape[0] != len(S1_BAND_NAMES):
        raise SourceError(f"{tile.s1}: {s1.shape[0]} bands, expected {len(S1_BAND_NAMES)} (VV, VH)")
    for path, array in ((tile.s1, s1), (tile.s2, s2)):
        if array.shape[-2:] != label.shape:
            height, width = array.shape[-2:]
            raise SourceError(f"{path}: {height} x {width} px, but its label is {label.shape[0]} x {label.shape[1]}")
    patches = cut_patches({"s1": s1, "s2": s2, "label": label}, patch_size)
    whole = len(patches) == 1 and label.shape == (patch_size, patch_size)
    return [
        {
            "id": tile.name if whole else f"{tile.name}_r{row}c{col}",
            "dates": [tile.date],
            **patch,
        }
        for (row, col), patch in patches
    ]


def convert_downstream(
    kind: DownstreamKind,
    root: str | os.PathLike[str],
    split: Split,
    out_dir: str | os.PathLike[str],
    *,
    patch_size: int = 256,
    skip_bad: bool = False,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> ConversionSummary:
    """Convert one split of SSL4EO-S12@DW, @OSM or DFC2020 to shards in ``out_dir``."""
    if kind not in LABEL_MAPPINGS:
        raise ValueError(f"unknown downstream dataset {kind!r}; expected dw, osm or dfc2020")
    if split not in DFC2020_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected train or test")
    if patch_size < 8:
        raise ValueError(f"patch size must be at least 8 px, got {patch_size}")
    root_dir = Path(root)
    tiles = find_dfc2020_tiles(root_dir, split) if kind == "dfc2020" else find_ssl4eo_tiles(root_dir, kind, split)
    if not tiles:
        raise SourceError(f"{root_dir}: no {kind} {split} tiles found")
    samples = [
        SourceSample(where=str(tile.label), load=lambda tile=tile: load_tile(kind, tile, patch_size)) for tile in tiles
    ]
    provenance = {"source": kind, "root": str(root_dir), "split": split, "patch_size": patch_size, "tiles": len(tiles)}
    return convert_samples(
        out_dir,
        downstream_metadata(kind),
        samples,
        skip_bad=skip_bad,
        progress=progress,
        overwrite=overwrite,
        provenance=provenance,
    )
