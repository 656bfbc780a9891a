"""SSL4EO-S12 image folders + NoL label folders -> pretraining shards (spec 10).

Accepted layout (``docs/data.md``)::

    <images>/s2c/<id:07d>/<S2 product id>/B1.tif ... B12.tif, B8A.tif   uint16 L1C, native resolution
    <images>/s1/<id:07d>/<S1 product id>/VV.tif, VH.tif                float32 dB
    <labels>/<id:07d>/<S2 product id>/label.tif                        Dynamic World classes 0..8
    <ids CSV>: ids, sub1 .. subT   (the S2 product id of each season; header optional)

All rasters of a location (every band, season and label) must share its CRS and footprint
(``check_same_grid``). Season t of a location uses the S2 product ``sub<t>`` and its label folder of the same
name; its S1 product is the one acquired closest in time. The 20 m and 60 m S2 bands are
resampled bilinearly onto the grid of the 10 m bands; labels with nearest neighbour (the
reference resampled labels bicubically and clipped them: a defect, spec 10).
"""

from __future__ import annotations

import csv
import os
import re
from datetime import date
from pathlib import Path

import numpy as np

from cromss_ray.data.convert.common import (
    ConversionSummary,
    Grid,
    ProgressCallback,
    Row,
    SourceError,
    SourceSample,
    as_float32,
    as_uint16,
    check_same_grid,
    convert_samples,
    iso_date,
    read_raster,
    remap_labels,
)
from cromss_ray.data.schema import CLASS_SCHEMES, S1_BAND_NAMES, S2_BAND_NAMES, ModalitySpec, ShardMetadata

S2_FOLDER = "s2c"
S1_FOLDER = "s1"
LABEL_FILE = "label.tif"
REFERENCE_BAND = "B2"
"""A 10 m band: its grid is the grid every band and the label are resampled to."""
S1_DATE = re.compile(r"_(\d{8})T\d{6}_")
DW_LABEL_MAPPING = {value: value for value in range(len(CLASS_SCHEMES["pretrain"]))}


def ssl4eo_metadata(seasons: int) -> ShardMetadata:
    """Pretraining shards in the raw dtypes: S2 L1C uint16 (x 1e-4), S1 float32 dB."""
    return ShardMetadata(
        kind="pretrain",
        classes=CLASS_SCHEMES["pretrain"],
        seasons=seasons,
        s1=ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB", representation="physical"),
        s2=ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, scale=1e-4, unit="reflectance", representation="physical"),
    )


def read_season_table(path: Path) -> list[tuple[int, list[str]]]:
    """``(id, [S2 product per season])`` per CSV row; the header (``ids, sub1..subT``) is optional.

    Without a header the columns are the id followed by the seasons. Every row must name
    the same number of seasons. Errors name the CSV line.
    """
    if not path.is_file():
        raise SourceError(f"{path}: CSV not found")
    with path.open(newline="") as handle:
        lines = [
            (number, [cell.strip() for cell in cells])
            for number, cells in enumerate(csv.reader(handle), start=1)
            if any(cell.strip() for cell in cells)
        ]
    if not lines:
        raise SourceError(f"{path}: empty CSV")
    header = lines[0][1]
    if header[0].isdigit():
        id_column, season_columns = 0, list(range(1, len(header)))
    else:
        names = sorted((name for name in header if re.fullmatch(r"sub\d+", name)), key=lambda name: int(name[3:]))
        if "ids" not in header or not names:
            raise SourceError(
                f"{path}: line {lines[0][0]}: header needs columns 'ids' and 'sub1'..'subT', got {header}"
            )
        id_column, season_columns = header.index("ids"), [header.index(name) for name in names]
        lines = lines[1:]
    if not season_columns:
        raise SourceError(f"{path}: no season columns")
    width = max(id_column, *season_columns) + 1
    table = []
    for number, cells in lines:
        if len(cells) < width:
            raise SourceError(f"{path}: line {number}: expected {width} columns, got {len(cells)}")
        if not cells[id_column].isdigit():
            raise SourceError(f"{path}: line {number}: id {cells[id_column]!r} is not a number")
        products = [cells[column] for column in season_columns]
        if not all(products):
            raise SourceError(f"{path}: line {number}: empty season column")
        table.append((int(cells[id_column]), products))
    if not table:
        raise SourceError(f"{path}: no locations listed")
    return table


def _product_date(name: str, where: Path) -> date:
    """Acquisition date of an S2 product (``20200604T054639_...``) or an S1 product
    (``S1A_IW_GRDH_1SDV_20200607T010800_...``)."""
    s1_match = S1_DATE.search(name)
    compact = name[:8] if name[:8].isdigit() else s1_match.group(1) if s1_match else ""
    if not compact:
        raise SourceError(f"{where}: cannot read an acquisition date from product name {name!r}")
    return date(int(compact[:4]), int(compact[4:6]), int(compact[6:8]))


def _nearest_s1_products(s1_dir: Path, s2_products: list[str], where: str) -> list[Path]:
    """For each S2 product, the S1 product of ``s1_dir`` acquired closest in time."""
    if not s1_dir.is_dir():
        raise SourceError(f"{where}: missing S1 folder {s1_dir}")
    products = sorted(path for path in s1_dir.iterdir() if path.is_dir())
    if not products:
        raise SourceError(f"{where}: no S1 product in {s1_dir}")
    s1_dates = [_product_date(path.name, path) for path in products]
    chosen = []
    for product in s2_products:
        wanted = _product_date(product, s1_dir)
        chosen.append(products[int(np.argmin([abs((day - wanted).days) for day in s1_dates]))])
    return chosen


def _read_s2(folder: Path, where: str, grids: list[tuple[Path, Grid]]) -> np.ndarray:
    """(13, H, W) uint16 on the 10 m grid of ``REFERENCE_BAND``; each band's grid goes to ``grids``."""
    if not folder.is_dir():
        raise SourceError(f"{where}: missing S2 folder {folder}")
    shape = read_raster(folder / f"{REFERENCE_BAND}.tif").pixels.shape[-2:]
    bands = []
    for band in S2_BAND_NAMES:
        path = folder / f"{band}.tif"
        raster = read_raster(path, out_shape=shape)
        grids.append((path, raster.grid))
        bands.append(as_uint16(raster.pixels[0], path))
    return np.stack(bands)


def _read_s1(folder: Path, shape: tuple[int, int], grids: list[tuple[Path, Grid]]) -> np.ndarray:
    """(2, H, W) float32 dB (VV, VH), resampled to ``shape`` if needed; each band's grid goes to ``grids``."""
    bands = []
    for band in S1_BAND_NAMES:
        path = folder / f"{band}.tif"
        raster = read_raster(path, out_shape=shape)
        grids.append((path, raster.grid))
        bands.append(as_float32(raster.pixels[0], path))
    return np.stack(bands)


def _load_location(images: Path, labels: Path, location: int, products: list[str]) -> list[Row]:
    name = f"{location:07d}"
    where = f"id {name}"
    grids: list[tuple[Path, Grid]] = []
    s2 = np.stack([_read_s2(images / S2_FOLDER / name / product, where, grids) for product in products])
    shape = s2.shape[-2:]
    s1_products = _nearest_s1_products(images / S1_FOLDER / name, products, where)
    s1 = np.stack([_read_s1(folder, shape, grids) for folder in s1_products])
    seasons = []
    for product in products:
        path = labels / name / product / LABEL_FILE
        raster = read_raster(path, out_shape=shape, resampling="nearest", bands=[1])
        grids.append((path, raster.grid))
        seasons.append(remap_labels(raster.pixels[0], DW_LABEL_MAPPING, raster.nodata, path))
    check_same_grid(grids)
    dates = [iso_date(product) for product in products]
    label = np.stack(seasons)
    if len(products) == 1:
        s1, s2, label = s1[0], s2[0], label[0]
    return [{"id": name, "dates": dates, "s1": s1, "s2": s2, "label": label}]


def convert_ssl4eo(
    images: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    ids_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> ConversionSummary:
    """Convert the locations listed in ``ids_csv`` to pretraining shards in ``out_dir``."""
    images_root, labels_root, csv_path = Path(images), Path(labels), Path(ids_csv)
    for root in (images_root, labels_root):
        if not root.is_dir():
            raise SourceError(f"{root}: no such directory")
    table = read_season_table(csv_path)
    seasons = len(table[0][1])
    samples = [
        SourceSample(
            where=f"{csv_path}: id {location:07d}",
            load=lambda location=location, products=products: _load_location(
                images_root, labels_root, location, products
            ),
        )
        for location, products in table
    ]
    provenance = {"source": "ssl4eo-s12", "images": str(images_root), "labels": str(labels_root), "ids": str(csv_path)}
    return convert_samples(
        out_dir,
        ssl4eo_metadata(seasons),
        samples,
        skip_bad=skip_bad,
        progress=progress,
        overwrite=overwrite,
        provenance=provenance,
    )
