"""Cutting training and evaluation samples out of shard rows, batch by batch (spec 2, 9).

The Ray Data UDF :class:`CutSamples` receives a pyarrow batch of shard rows and returns
numpy arrays ready for the trainer. Image bytes are never decoded wholesale: for every
row it takes a zero-copy ``np.frombuffer`` view of the drawn season inside the Parquet
binary buffer, crops it, flips / rotates the view and copies only the final window into
the output (so a 264 x 264 x 4-season row costs one 256 x 256 copy per modality). The
labels of all seasons are kept when the smoothing prior is computed later on the device;
otherwise the prior is computed on the CPU on the full tile, before the crop (spec 2).

Checks: before a row is cut, its whole arrays (every season) are checked as
:func:`~cromss_ray.data.shards.check_values` does (labels in the class set or no-data,
finite float imagery, byte lengths): a bad row fails the batch naming its file and
location id, or with ``on_bad_row="skip"`` is left out and reported to ``skipped``.

Randomness: each row's draws (season, crop corner, flips, rotation) come from a generator
seeded by ``(seed, epoch, stable hash of the location id)``, so a sample's augmentation
is a pure function of those three, whatever the worker count or block boundaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from cromss_ray.data.schema import S2_BAND_SUBSETS, ShardMetadata, s2_subset_names
from cromss_ray.data.shards import BadRowPolicy, RowValidationError, check_values
from cromss_ray.method.smoothing import PriorKind, smoothing_prior

UINT64_MASK = (1 << 64) - 1


def stable_hash(row_id: str, purpose: str) -> int:
    """A 64-bit hash of a location id that is the same in every process and run (blake2b)."""
    digest = hashlib.blake2b(row_id.encode(), digest_size=8, person=purpose.encode()).digest()
    return int.from_bytes(digest, "little")


def stable_unit(row_id: str, purpose: str) -> float:
    """``stable_hash`` mapped to ``[0, 1)``."""
    return stable_hash(row_id, purpose) / 2.0**64


def sample_rng(seed: int, epoch: int, row_id: str) -> np.random.Generator:
    """The generator of one sample's augmentation: a pure function of seed, epoch and id."""
    return np.random.default_rng([seed & UINT64_MASK, epoch, stable_hash(row_id, "augment")])


@dataclass(frozen=True)
class HashSplit:
    """Validation rows: those whose id hashes below ``threshold`` (spec 9: a share held out).

    The hash does not depend on the run, the worker count or the shard layout, so the split
    is the same everywhere; :meth:`for_ids` picks the threshold for a set of ids.
    """

    threshold: float

    def is_val(self, row_id: str) -> bool:
        return stable_unit(row_id, "val-split") < self.threshold

    def is_train(self, row_id: str) -> bool:
        return not self.is_val(row_id)

    @classmethod
    def for_ids(cls, ids: list[str], fraction: float) -> HashSplit:
        """``fraction`` of the ids (by hash) for validation, at least one of each side when possible.

        With ``fraction > 0`` and at least two distinct ids, the split holds at least one
        validation id and leaves at least one training id, moving the threshold to the
        nearest hash; a single id is never held out.
        """
        units = sorted(stable_unit(row_id, "val-split") for row_id in set(ids))
        if fraction == 0 or len(units) < 2:
            return cls(0.0)
        threshold = fraction
        if units[0] >= threshold:
            threshold = float(np.nextafter(units[0], 1.0))
        if units[-1] < threshold:
            threshold = units[-1]
        return cls(threshold)


@dataclass(frozen=True)
class Geometry:
    """One sample's crop window, flips and quarter turns, applied to the last two axes."""

    top: int
    left: int
    height: int
    width: int
    flip_rows: bool = False
    flip_cols: bool = False
    quarter_turns: int = 0

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The crop window of ``array`` (a view)."""
        return array[..., self.top : self.top + self.height, self.left : self.left + self.width]

    def orient(self, window: np.ndarray) -> np.ndarray:
        """Flip (rows, then columns), then rotate by 90-degree steps (a view)."""
        if self.flip_rows:
            window = window[..., ::-1, :]
        if self.flip_cols:
            window = window[..., :, ::-1]
        return np.rot90(window, self.quarter_turns, axes=(-2, -1))

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Crop, then orient: the sample's geometry (a view)."""
        return self.orient(self.crop(array))


def random_geometry(
    rng: np.random.Generator, height: int, width: int, crop: int, rotation_probability: float
) -> Geometry:
    """Random crop (the whole side when the tile is smaller), flips with probability 1/2 each,
    and with ``rotation_probability`` a rotation by 90, 180 or 270 degrees (only 180 for a
    non-square window). All draws are made in a fixed order, whatever their outcome."""
    out_h, out_w = min(crop, height), min(crop, width)
    top = int(rng.integers(height - out_h + 1))
    left = int(rng.integers(width - out_w + 1))
    flip_rows, flip_cols = (bool(flag) for flag in rng.random(2) < 0.5)
    rotate = bool(rng.random() < rotation_probability)
    turns = int(rng.integers(1, 4))
    if out_h != out_w:
        turns = 2
    return Geometry(top, left, out_h, out_w, flip_rows, flip_cols, turns if rotate else 0)


def centre_geometry(height: int, width: int, crop: int) -> Geometry:
    """The centred ``crop`` window (the whole side when the tile is smaller), no flip."""
    out_h, out_w = min(crop, height), min(crop, width)
    return Geometry((height - out_h) // 2, (width - out_w) // 2, out_h, out_w)


def band_indices(meta: ShardMetadata, s2_bands: int) -> np.ndarray | slice:
    """Positions of the S2 band subset (spec 9) among the bands the shards store."""
    wanted = list(s2_subset_names(s2_bands))
    missing = [name for name in wanted if name not in meta.s2.bands]
    if missing:
        raise ValueError(f"the {s2_bands}-band S2 subset needs bands {missing}, the shards store {list(meta.s2.bands)}")
    positions = [meta.s2.bands.index(name) for name in wanted]
    if positions == list(range(len(meta.s2.bands))):
        return slice(None)
    return np.asarray(positions)


class BinaryColumn:
    """Zero-copy numpy views of the arrays stored row by row in a binary column of a batch."""

    def __init__(self, column: pa.ChunkedArray, name: str, dtype: np.dtype, row_shape: Callable[[int, int], tuple]):
        self.name = name
        self.dtype = dtype
        self.row_shape = row_shape
        self._slices: list[tuple[pa.Buffer, int, int]] = []
        for chunk in column.chunks:
            offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
            _, offsets_buffer, data = chunk.buffers()
            offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
            self._slices.extend((data, int(start), int(end - start)) for start, end in zip(offsets[:-1], offsets[1:]))

    def view(self, row: int, row_id: str, height: int, width: int, leading: int | None = None) -> np.ndarray:
        """Row ``row`` as an array of ``row_shape(height, width)``; with ``leading``, only that
        index of the first axis (one season) is mapped. Checks the stored byte length."""
        data, start, length = self._slices[row]
        shape = self.row_shape(height, width)
        expected = int(np.prod(shape)) * self.dtype.itemsize
        if length != expected:
            stored_as = self.dtype.newbyteorder("=")
            raise RowValidationError(row_id, self.name, f"{length} bytes, but shape {shape} of {stored_as} needs {expected}")
        if leading is None:
            return np.frombuffer(data, self.dtype, int(np.prod(shape)), start).reshape(shape)
        inner = shape[1:]
        count = int(np.prod(inner))
        return np.frombuffer(data, self.dtype, count, start + leading * count * self.dtype.itemsize).reshape(inner)


@dataclass(frozen=True)
class SampleDraw:
    """How :class:`CutSamples` chooses season and geometry.

    ``augment``: season uniformly at random and :func:`random_geometry` per (seed, epoch, id);
    otherwise the season is fixed by a hash of the id and the window is centred.
    """

    augment: bool
    seed: int = 0
    rotation_probability: float = 0.0
    epoch_source: Callable[[], int] | None = None


@dataclass(frozen=True)
class _Sample:
    """What :class:`CutSamples` takes from one row: where it is, which season, which window."""

    row: int
    row_id: str
    height: int
    width: int
    season: int
    geometry: Geometry

    @property
    def out_size(self) -> tuple[int, int]:
        g = self.geometry
        return (g.height, g.width) if g.quarter_turns % 2 == 0 else (g.width, g.height)


@dataclass(frozen=True)
class CutSamples:
    """Ray Data ``map_batches`` UDF (``batch_format="pyarrow"``): shard rows to samples (spec 2, 9).

    Output arrays (N = kept rows, h x w the window): ``s1`` (N, 2, h, w) and ``s2``
    (N, B, h, w) in their stored dtype, ``label`` uint8 (N, h, w), ``key`` int64 (a stable
    hash of the id), ``clean_label`` uint8 when the shards have it; with ``seasons_out``
    also ``season`` int64, and ``labels_all`` uint8 (N, T, h, w) and/or ``prior`` float32
    (N, C, h, w) as asked. Rows for which ``keep`` says False are dropped; bad rows raise, or
    with ``on_bad_row="skip"`` are dropped and their messages passed to ``skipped``.
    """

    meta: ShardMetadata
    s2_bands: int
    crop: int
    draw: SampleDraw
    keep: Callable[[str], bool] | None = None
    seasons_out: bool = True
    labels_all: bool = False
    cpu_prior: PriorKind | None = None
    sigma: float = 3.0
    on_bad_row: BadRowPolicy = "raise"
    skipped: Callable[[list[str]], None] | None = None

    def __post_init__(self) -> None:
        band_indices(self.meta, self.s2_bands)
        if self.on_bad_row == "skip" and self.skipped is None:
            raise ValueError("skipping bad rows needs somewhere to count them (skipped)")

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        ids = batch.column("id").to_pylist()
        paths = batch.column("path").to_pylist()
        heights = batch.column("height").to_numpy()
        widths = batch.column("width").to_numpy()
        epoch = self.draw.epoch_source() if self.draw.augment and self.draw.epoch_source is not None else 0
        columns = self._columns(batch)
        samples, bad = [], []
        for row, row_id in enumerate(ids):
            if self.keep is not None and not self.keep(row_id):
                continue
            try:
                self._check(columns, row, row_id, int(heights[row]), int(widths[row]))
            except RowValidationError as exc:
                if self.on_bad_row == "raise":
                    raise ValueError(f"{paths[row]}: {exc}") from None
                bad.append(f"{paths[row]}: {exc}")
                continue
            samples.append(self._plan(row, row_id, int(heights[row]), int(widths[row]), epoch))
        if bad and self.skipped is not None:
            self.skipped(bad)
        out = self._allocate(len(samples), self._window_size(samples, heights, widths))
        bands = band_indices(self.meta, self.s2_bands)
        for slot, sample in enumerate(samples):
            self._fill(out, slot, columns, sample, bands)
        out["key"] = np.array([stable_hash(s.row_id, "key") >> 1 for s in samples], dtype=np.int64)
        if self.seasons_out:
            out["season"] = np.array([s.season for s in samples], dtype=np.int64)
        return out

    def _check(self, columns: dict[str, BinaryColumn], row: int, row_id: str, height: int, width: int) -> None:
        """Every array of one row, all seasons: byte length and values (no copy)."""
        for name, column in columns.items():
            check_values(self.meta, row_id, name, column.view(row, row_id, height, width))

    def _plan(self, row: int, row_id: str, height: int, width: int, epoch: int) -> _Sample:
        seasons = self.meta.seasons
        if self.draw.augment:
            rng = sample_rng(self.draw.seed, epoch, row_id)
            season = int(rng.integers(seasons))
            geometry = random_geometry(rng, height, width, self.crop, self.draw.rotation_probability)
        else:
            season = stable_hash(row_id, "val-season") % seasons
            geometry = centre_geometry(height, width, self.crop)
        return _Sample(row, row_id, height, width, season, geometry)

    def _window_size(self, samples: list[_Sample], heights: np.ndarray, widths: np.ndarray) -> tuple[int, int]:
        """The common output size of a batch; tiles below the crop size must all be equal."""
        sizes = {sample.out_size for sample in samples}
        if len(sizes) > 1:
            first, last = min(samples, key=lambda s: s.out_size), max(samples, key=lambda s: s.out_size)
            raise ValueError(
                f"tiles smaller than the crop ({self.crop}) differ in size and cannot share a batch: "
                f"{first.row_id} is {first.height}x{first.width}, {last.row_id} is {last.height}x{last.width}; "
                "set the crop to at most the smallest tile side"
            )
        if sizes:
            return sizes.pop()
        if len(heights) == 0:
            return self.crop, self.crop
        return min(self.crop, int(heights.min())), min(self.crop, int(widths.min()))

    def _columns(self, batch: pa.Table) -> dict[str, BinaryColumn]:
        meta = self.meta
        columns = {
            modality: BinaryColumn(
                batch.column(modality),
                modality,
                meta.numpy_dtype(modality),
                lambda h, w, m=modality: meta.image_shape(m, h, w),
            )
            for modality in ("s1", "s2")
        }
        for name in ("label", "clean_label") if meta.has_clean_label else ("label",):
            columns[name] = BinaryColumn(batch.column(name), name, np.dtype(np.uint8), meta.label_shape)
        return columns

    def _allocate(self, rows: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
        meta = self.meta
        s2_bands = len(S2_BAND_SUBSETS[self.s2_bands])
        out = {
            "s1": np.empty((rows, len(meta.s1.bands), *size), meta.numpy_dtype("s1").newbyteorder("=")),
            "s2": np.empty((rows, s2_bands, *size), meta.numpy_dtype("s2").newbyteorder("=")),
            "label": np.empty((rows, *size), np.uint8),
        }
        if meta.has_clean_label:
            out["clean_label"] = np.empty((rows, *size), np.uint8)
        if self.labels_all:
            out["labels_all"] = np.empty((rows, meta.seasons, *size), np.uint8)
        if self.cpu_prior is not None:
            out["prior"] = np.empty((rows, meta.num_classes, *size), np.float32)
        return out

    def _fill(
        self,
        out: dict[str, np.ndarray],
        slot: int,
        columns: dict[str, BinaryColumn],
        sample: _Sample,
        bands: np.ndarray | slice,
    ) -> None:
        """Copy one sample's windows into row ``slot`` of the output arrays."""
        geometry = sample.geometry
        multi = self.meta.seasons > 1

        def view(name: str, one_season: bool) -> np.ndarray:
            leading = sample.season if one_season and multi else None
            return columns[name].view(sample.row, sample.row_id, sample.height, sample.width, leading)

        out["s1"][slot] = geometry.apply(view("s1", True))
        out["s2"][slot] = geometry.orient(geometry.crop(view("s2", True))[bands])
        labels = view("label", False)
        season_labels = labels if not multi else labels[sample.season]
        out["label"][slot] = geometry.apply(season_labels)
        if "clean_label" in out:
            clean = view("clean_label", False)
            out["clean_label"][slot] = geometry.apply(clean if not multi else clean[sample.season])
        all_seasons = labels if multi else labels[None]
        if "labels_all" in out:
            out["labels_all"][slot] = geometry.apply(all_seasons)
        if "prior" in out:
            stack = torch.from_numpy(np.array(all_seasons))
            prior = smoothing_prior(stack, sample.season, self.cpu_prior, self.meta.num_classes, self.sigma)
            out["prior"][slot] = geometry.apply(prior.numpy())
