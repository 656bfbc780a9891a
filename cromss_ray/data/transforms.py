"""Cutting training and evaluation samples out of shard rows, batch by batch (spec 2, 9).

The Ray Data UDF :class:`CutSamples` receives a pyarrow batch of shard rows and returns
numpy arrays ready for the trainer. Image bytes are never decoded wholesale: for every
row it takes a zero-copy ``np.frombuffer`` view of the drawn season inside the Parquet
binary buffer, crops and flips the view and copies only the final window into the
output (so a 264 x 264 x 4-season row costs one 256 x 256 copy per modality). A sample's
rotation (spec 9) is left to the training device: the cutter writes its angle, and
:func:`~cromss_ray.data.device.to_device` resamples the window there, bilinear for images
and the prior, nearest for labels, with the float arithmetic of :func:`rotate` (on a CPU
this resampling costs more than the whole rest of the cut). The labels of all seasons
are kept when the smoothing prior is computed later on the device, from the augmented
labels (an approximation of the reference's prior, measured in docs/benchmarks.md);
otherwise the prior is computed on the CPU on the full tile, before the crop, and
augmented with the image (spec 2); only that path imports torch, at use, so that the
pipeline's Ray processes start without it.

Checks: before a row is cut, its whole arrays (every season) are checked as
:func:`~cromss_ray.data.shards.check_values` does (labels in the class set or no-data,
finite float imagery, byte lengths): a bad row fails the batch naming its file and
location id, or with ``on_bad_row="skip"`` is left out and reported to ``skipped``.

Randomness: each row's draws (season, crop corner, flips, rotation) come from a generator
seeded by ``(seed, epoch, stable hash of the location id)``, so a sample's augmentation
is a pure function of those three, whatever the worker count or block boundaries.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from cromss_ray.data.schema import S2_BAND_SUBSETS, ShardMetadata, s2_subset_names
from cromss_ray.data.shards import BadRowPolicy, RowValidationError, ShardFileError, check_values

if TYPE_CHECKING:
    from cromss_ray.method.smoothing import PriorKind

UINT64_MASK = (1 << 64) - 1
ROTATION_FIELD = "rotation_degrees"
"""The output column with each training sample's rotation angle (spec 9; 0 for none), which
:func:`~cromss_ray.data.device.to_device` applies on the device."""


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
class TrainingSubset:
    """The training rows a label-efficiency run keeps (spec 11 trains on all of them): a seeded draw.

    Called with a row id, says whether the row trains. :meth:`draw` permutes the distinct
    training ids by ``seed`` and keeps a prefix, so the subset depends only on the ids and
    the seed (not on the shard layout or row order), and with one seed a smaller subset lies
    inside every larger one.
    """

    ids: frozenset[str]

    def __call__(self, row_id: str) -> bool:
        return row_id in self.ids

    @classmethod
    def draw(
        cls, ids: list[str], seed: int, *, fraction: float | None = None, count: int | None = None
    ) -> TrainingSubset:
        """``count`` of the distinct ``ids``, or ``round(fraction * n)`` of them (at least one).

        Raises ValueError when ``count`` exceeds the number of distinct ids, or when neither
        or both of ``fraction`` and ``count`` are given.
        """
        if (fraction is None) == (count is None):
            raise ValueError("give exactly one of fraction and count")
        pool = sorted(set(ids))
        size = count if count is not None else max(1, round(fraction * len(pool)))
        if size > len(pool):
            raise ValueError(f"{size} training tiles asked for, but only {len(pool)} are there")
        order = np.random.default_rng([seed & UINT64_MASK, stable_hash("training-subset", "subset")]).permutation(
            len(pool)
        )
        return cls(frozenset(pool[index] for index in order[:size]))


FLIP_PROBABILITY = 0.5
"""Spec 9: a sample is flipped with this probability, then horizontally, vertically or both, equally likely."""
MAX_ROTATION_DEGREES = 90.0
"""Spec 9: a rotated sample turns by an angle uniform in [-90, 90] degrees."""


def reflect_101(index: np.ndarray, size: int) -> np.ndarray:
    """Indices reflected into ``0 .. size - 1`` about the edge pixels, which are not repeated
    (OpenCV's BORDER_REFLECT_101, scipy's ``mode="mirror"``): ``-1 -> 1``, ``size -> size - 2``."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)


def rotation_sources(
    height: int, width: int, degrees: float, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Where each output pixel of a ``height x width`` window rotated by ``degrees``
    (counter-clockwise, about the window centre) samples its input: fractional row and
    column coordinates, shaped ``(height, width)``, written into ``out`` (2, height, width)
    float64 when given. 90 degrees is ``np.rot90``."""
    radians = np.deg2rad(degrees)
    cos, sin = np.round(np.cos(radians), 12), np.round(np.sin(radians), 12)
    rows = np.arange(height, dtype=np.float64)[:, None] - (height - 1) / 2
    cols = np.arange(width, dtype=np.float64)[None, :] - (width - 1) / 2
    source = np.empty((2, height, width)) if out is None else out
    np.add(cos * rows, sin * cols, out=source[0])
    source[0] += (height - 1) / 2
    np.subtract(cos * cols, sin * rows, out=source[1])
    source[1] += (width - 1) / 2
    return source[0], source[1]


@dataclass(frozen=True)
class RotationPlan:
    """Flat source indices (reflect-101 applied) and bilinear weights of one rotation of a
    ``height x width`` window, shared by every array a sample rotates."""

    nearest: np.ndarray
    corners: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    weights: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@functools.lru_cache(maxsize=4)
def rotation_plan(height: int, width: int, degrees: float) -> RotationPlan:
    """The :class:`RotationPlan` of a rotation (cached: images and labels of a sample share it)."""
    source_rows, source_cols = rotation_sources(height, width, degrees)
    rows = reflect_101(np.floor(source_rows + 0.5).astype(np.intp), height)
    cols = reflect_101(np.floor(source_cols + 0.5).astype(np.intp), width)
    row0, col0 = np.floor(source_rows), np.floor(source_cols)
    row_weight = (source_rows - row0).astype(np.float32).ravel()
    col_weight = (source_cols - col0).astype(np.float32).ravel()
    row0, col0 = row0.astype(np.intp), col0.astype(np.intp)
    top, bottom = reflect_101(row0, height) * width, reflect_101(row0 + 1, height) * width
    left, right = reflect_101(col0, width), reflect_101(col0 + 1, width)
    return RotationPlan(
        (rows * width + cols).ravel(),
        ((top + left).ravel(), (top + right).ravel(), (bottom + left).ravel(), (bottom + right).ravel()),
        (
            (1 - row_weight) * (1 - col_weight),
            (1 - row_weight) * col_weight,
            row_weight * (1 - col_weight),
            row_weight * col_weight,
        ),
    )


def rotate(window: np.ndarray, degrees: float, *, nearest: bool) -> np.ndarray:
    """``window`` (..., H, W) rotated by ``degrees`` about its centre, same shape and dtype.

    Borders are filled by reflect-101. ``nearest`` takes the nearest input pixel (labels:
    values stay in their set); otherwise bilinear interpolation, rounded for integer dtypes.
    """
    height, width = window.shape[-2:]
    plan = rotation_plan(height, width, float(degrees))
    flat = window.reshape(-1, height * width)
    if nearest:
        return np.take(flat, plan.nearest, axis=1).reshape(window.shape)
    values = np.zeros(flat.shape, np.float32)
    for corner, weight in zip(plan.corners, plan.weights, strict=True):
        values += np.take(flat, corner, axis=1) * weight
    if np.issubdtype(window.dtype, np.integer):
        values = np.rint(values)
    return values.astype(window.dtype).reshape(window.shape)


@dataclass(frozen=True)
class Geometry:
    """One sample's crop window, flips and rotation, applied to the last two axes (spec 9).

    In the reference's order: crop, flip (rows, then columns), then a rotation by
    ``degrees`` counter-clockwise about the window centre, borders filled by reflect-101
    from the window; the output keeps the window's size.
    """

    top: int
    left: int
    height: int
    width: int
    flip_rows: bool = False
    flip_cols: bool = False
    degrees: float = 0.0

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The crop window of ``array`` (a view)."""
        return array[..., self.top : self.top + self.height, self.left : self.left + self.width]

    def transform(self, window: np.ndarray, *, nearest: bool) -> np.ndarray:
        """Flip, then rotate a cropped window: a view without rotation, a new array with it.

        ``nearest`` for labels (nearest pixel), otherwise bilinear (images, the prior)."""
        if self.flip_rows:
            window = window[..., ::-1, :]
        if self.flip_cols:
            window = window[..., :, ::-1]
        if self.degrees == 0.0:
            return window
        return rotate(window, self.degrees, nearest=nearest)

    def apply(self, array: np.ndarray, *, nearest: bool) -> np.ndarray:
        """Crop, then transform: the sample's geometry."""
        return self.transform(self.crop(array), nearest=nearest)


def random_geometry(
    rng: np.random.Generator, height: int, width: int, crop: int, rotation_probability: float
) -> Geometry:
    """Spec 9's augmentation: random crop (the whole side when the tile is smaller); with
    probability 1/2 a flip, horizontal, vertical or both equally likely; with
    ``rotation_probability`` a rotation by an angle uniform in [-90, 90] degrees. All draws
    are made in a fixed order, whatever their outcome."""
    out_h, out_w = min(crop, height), min(crop, width)
    top = int(rng.integers(height - out_h + 1))
    left = int(rng.integers(width - out_w + 1))
    flip = bool(rng.random() < FLIP_PROBABILITY)
    flip_kind = int(rng.integers(3))
    rotation = bool(rng.random() < rotation_probability)
    degrees = float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    flip_rows = flip and flip_kind in (0, 2)
    flip_cols = flip and flip_kind in (1, 2)
    return Geometry(top, left, out_h, out_w, flip_rows, flip_cols, degrees if rotation else 0.0)


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
        expected = math.prod(shape) * self.dtype.itemsize
        if length != expected:
            stored_as = self.dtype.newbyteorder("=")
            raise RowValidationError(row_id, self.name, f"{length} bytes, but shape {shape} of {stored_as} needs {expected}")
        if leading is None:
            return np.frombuffer(data, self.dtype, math.prod(shape), start).reshape(shape)
        inner = shape[1:]
        count = math.prod(inner)
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
    """What :class:`CutSamples` takes from one row: where it is, which season, which window
    (crop and flips), and the angle the device rotates it by."""

    row: int
    row_id: str
    height: int
    width: int
    season: int
    geometry: Geometry
    degrees: float = 0.0

    @property
    def out_size(self) -> tuple[int, int]:
        return self.geometry.height, self.geometry.width


@dataclass(frozen=True)
class CutSamples:
    """Ray Data ``map_batches`` UDF (``batch_format="pyarrow"``): shard rows to samples (spec 2, 9).

    Output arrays (N = kept rows, h x w the window): ``s1`` (N, 2, h, w) and ``s2``
    (N, B, h, w) in their stored dtype, ``label`` uint8 (N, h, w), ``key`` int64 (a stable
    hash of the id), ``clean_label`` uint8 when the shards have it; with ``seasons_out``
    also ``season`` int64, and ``labels_all`` uint8 (N, T, h, w) and/or ``prior`` float32
    (N, C, h, w) as asked. Augmented samples are cropped and flipped here; their rotation
    angles (float64, 0 for none) are the column :data:`ROTATION_FIELD`, which
    :func:`~cromss_ray.data.device.to_device` applies. Rows for which ``keep`` says False are dropped; bad rows raise, or
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
                    raise ShardFileError(paths[row], str(exc)) from None
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
        if self.draw.augment:
            out[ROTATION_FIELD] = np.array([s.degrees for s in samples], dtype=np.float64)
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
            return _Sample(row, row_id, height, width, season, replace(geometry, degrees=0.0), geometry.degrees)
        season = stable_hash(row_id, "val-season") % seasons
        return _Sample(row, row_id, height, width, season, centre_geometry(height, width, self.crop))

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
        """Copy one sample's windows into row ``slot`` of the output arrays: crop and flip of
        zero-copy views (a rotation is left to the device, :data:`ROTATION_FIELD`). The
        season's label is the season's plane of ``labels_all`` when that is asked for."""
        geometry = sample.geometry
        multi = self.meta.seasons > 1

        def view(name: str, one_season: bool) -> np.ndarray:
            leading = sample.season if one_season and multi else None
            return columns[name].view(sample.row, sample.row_id, sample.height, sample.width, leading)

        def image(planes: np.ndarray, target: np.ndarray, keep: np.ndarray | slice = slice(None)) -> None:
            target[...] = geometry.transform(geometry.crop(planes)[keep], nearest=False)

        def label(planes: np.ndarray, target: np.ndarray) -> None:
            target[...] = geometry.apply(planes, nearest=True)

        image(view("s1", True), out["s1"][slot])
        image(view("s2", True), out["s2"][slot], bands)
        labels = view("label", False)
        all_seasons = labels if multi else labels[None]
        if "labels_all" in out:
            label(all_seasons, out["labels_all"][slot])
            out["label"][slot] = out["labels_all"][slot, sample.season]
        else:
            label(all_seasons[sample.season], out["label"][slot])
        if "clean_label" in out:
            clean = view("clean_label", False)
            label(clean[sample.season] if multi else clean, out["clean_label"][slot])
        if "prior" in out:
            import torch  # the CPU prior only: the default path leaves it to the device (module docstring)

            from cromss_ray.method.smoothing import smoothing_prior

            stack = torch.from_numpy(np.array(all_seasons))
            prior = smoothing_prior(stack, sample.season, self.cpu_prior, self.meta.num_classes, self.sigma)
            image(prior.numpy(), out["prior"][slot])
