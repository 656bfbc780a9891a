"""Sample cutting without Ray: geometry, byte views, hash split, determinism, device transfer,
and the device-path prior against the CPU-path prior (spec 2, 9)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from cromss_ray.data.device import BatchRotation, network_input_tensor, to_device
from cromss_ray.data.schema import S2_BAND_NAMES, ModalitySpec, ShardMetadata
from cromss_ray.data.shards import RowValidationError
from cromss_ray.data.transforms import (
    BinaryColumn,
    CutSamples,
    Geometry,
    HashSplit,
    TrainingSubset,
    SampleDraw,
    band_indices,
    centre_geometry,
    random_geometry,
    reflect_101,
    rotate,
    sample_rng,
    stable_unit,
)

CLASSES = 9
SIGMA = 3.0
RADIUS = 12


def reference_prior(labels: np.ndarray, season: int, classes: int = CLASSES, sigma: float = SIGMA) -> np.ndarray:
    """Spec 2 with scipy: per-class gaussian_filter (reflect, truncate 4) of the temporal
    frequency and of the season's one-hot, each normalised per pixel, averaged ('ts')."""

    def norm(maps: np.ndarray) -> np.ndarray:
        total = maps.sum(axis=0, keepdims=True)
        return np.where(total > 0, maps / np.where(total > 0, total, 1), 1.0 / classes)

    onehot = (labels[:, None] == np.arange(classes)[None, :, None, None]).astype(np.float64)
    frequency = onehot.mean(axis=0)
    temporal = norm(np.stack([ndimage.gaussian_filter(frequency[c], sigma, truncate=4.0) for c in range(classes)]))
    spatial = norm(np.stack([ndimage.gaussian_filter(onehot[season, c], sigma, truncate=4.0) for c in range(classes)]))
    return ((temporal + spatial) / 2).astype(np.float32)


def pretrain_meta(dtype: str = "uint8", clean: bool = True) -> ShardMetadata:
    return ShardMetadata(
        kind="pretrain",
        classes=tuple(f"c{i}" for i in range(CLASSES)),
        seasons=4,
        s1=ModalitySpec(
            dtype=dtype, bands=("VV", "VH"), scale=35 / 255, offset=-30.0, unit="dB", representation="physical"
        ),
        s2=ModalitySpec(dtype="uint8", bands=S2_BAND_NAMES, scale=1 / 255, unit="normalized", representation="v8"),
        has_clean_label=clean,
    )


def random_rows(meta: ShardMetadata, count: int, size: int, seed: int) -> list[dict[str, np.ndarray | str]]:
    """Rows with blocky random labels (so priors are not trivial) and random imagery."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        coarse = rng.integers(0, CLASSES, size=(meta.seasons, size // 8 + 1, size // 8 + 1))
        labels = np.kron(coarse, np.ones((1, 8, 8), dtype=np.int64))[:, :size, :size].astype(np.uint8)
        labels[rng.random(labels.shape) < 0.05] = meta.nodata
        rows.append(
            {
                "id": f"{index:07d}",
                "s1": rng.integers(0, 256, size=meta.image_shape("s1", size, size), dtype=np.uint8),
                "s2": rng.integers(0, 256, size=meta.image_shape("s2", size, size), dtype=np.uint8),
                "label": labels,
                "clean_label": labels.copy(),
            }
        )
    return rows


def as_table(meta: ShardMetadata, rows: list[dict]) -> pa.Table:
    """A batch as Ray hands it to the UDF: the shard schema plus the ``path`` column."""
    columns = {
        "id": [row["id"] for row in rows],
        "dates": [["2020-01-01"] * meta.seasons for _ in rows],
        "height": [row["label"].shape[-2] for row in rows],
        "width": [row["label"].shape[-1] for row in rows],
    }
    for name in ("s1", "s2", "label", "clean_label")[: 4 if meta.has_clean_label else 3]:
        columns[name] = [np.ascontiguousarray(row[name]).tobytes() for row in rows]
    table = pa.Table.from_pydict(columns, schema=meta.arrow_schema())
    return table.append_column("path", pa.array(["mem://shard.parquet"] * len(rows)))


def test_centre_geometry_by_hand() -> None:
    assert centre_geometry(264, 264, 256) == Geometry(4, 4, 256, 256)
    assert centre_geometry(10, 6, 8) == Geometry(1, 0, 8, 6)
    assert centre_geometry(7, 7, 8) == Geometry(0, 0, 7, 7)


def test_geometry_apply_by_hand() -> None:
    tile = np.arange(12).reshape(3, 4)
    # window rows 0..2, cols 1..3: [[1,2,3],[5,6,7],[9,10,11]]
    assert Geometry(0, 1, 3, 3).apply(tile, nearest=True).tolist() == [[1, 2, 3], [5, 6, 7], [9, 10, 11]]
    flipped_rows = Geometry(0, 1, 3, 3, flip_rows=True).apply(tile, nearest=True)
    assert flipped_rows.tolist() == [[9, 10, 11], [5, 6, 7], [1, 2, 3]]
    flipped_cols = Geometry(0, 1, 3, 3, flip_cols=True).apply(tile, nearest=True)
    assert flipped_cols.tolist() == [[3, 2, 1], [7, 6, 5], [11, 10, 9]]
    # 90 degrees counter-clockwise: the last column becomes the first row
    turned = [[3, 7, 11], [2, 6, 10], [1, 5, 9]]
    assert Geometry(0, 1, 3, 3, degrees=90.0).apply(tile, nearest=True).tolist() == turned
    assert Geometry(0, 1, 3, 3, degrees=90.0).apply(tile, nearest=False).tolist() == turned
    stacked = np.stack([tile, tile + 100])
    half_turn = Geometry(1, 0, 2, 2, degrees=180.0).apply(stacked, nearest=False)
    assert half_turn.tolist() == [[[9, 8], [5, 4]], [[109, 108], [105, 104]]]


def test_reflect_101_by_hand() -> None:
    # size 4: ... 3 2 1 | 0 1 2 3 | 2 1 0 ...: the edge pixel is not repeated
    assert reflect_101(np.arange(-3, 7), 4).tolist() == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    # further out the reflection repeats with period 2 * (4 - 1) = 6
    assert reflect_101(np.array([-7, 9, 12]), 4).tolist() == [1, 3, 0]
    assert reflect_101(np.array([-2, 0, 5]), 1).tolist() == [0, 0, 0]


def test_rotation_border_reflects_without_repeating_the_edge() -> None:
    """3 x 3 window [[0,1,2],[3,4,5],[6,7,8]] turned by 45 degrees about its centre (1, 1).
    Output pixel (0, 0) is 1 row and 1 column off the centre; it samples the input at
    row 1 - (cos 45 + sin 45) = 1 - sqrt(2) = -0.41421, column 1 + (sin 45 - cos 45) = 1.
    Bilinear between rows -1 and 0 with weight w = 0.58579 on row 0: row -1 reflects
    (reflect-101) onto row 1, so the value is (1 - w) * 4 + w * 1 = 4 - 3 w = 2.24264
    (an edge-repeating border would give 1). Nearest rounds -0.41421 to row 0: value 1.
    Output pixel (0, 1) samples row 1 - sin 45 = 0.29289, column 1 + sin 45 = 1.70711:
    nearest (0, 2) = 2."""
    window = np.arange(9, dtype=np.float32).reshape(3, 3)
    bilinear = rotate(window, 45.0, nearest=False)
    assert bilinear[0, 0] == pytest.approx(4 - 3 * (2 - np.sqrt(2)), abs=1e-5)
    nearest = rotate(window, 45.0, nearest=True)
    assert nearest[0, 0] == 1 and nearest[0, 1] == 2
    assert nearest[1, 1] == 4 and bilinear[1, 1] == pytest.approx(4.0)


def test_quarter_turns_equal_rot90_and_match_scipy_mirror() -> None:
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    for degrees, turns in ((90.0, 1), (-90.0, -1), (180.0, 2)):
        for nearest in (True, False):
            expected = np.rot90(square, turns, axes=(1, 2))
            np.testing.assert_array_equal(rotate(square, degrees, nearest=nearest), expected)
    # a 6 x 10 window turned by 90 degrees: its central 6 x 6 square is np.rot90 of the input's
    wide = rng.integers(0, 9, size=(6, 10), dtype=np.uint8)
    np.testing.assert_array_equal(rotate(wide, 90.0, nearest=True)[:, 2:8], np.rot90(wide[:, 2:8]))
    # any angle: scipy's bilinear resampling with mode="mirror" (reflect-101) at the same coordinates
    image = rng.random((20, 14)).astype(np.float32)
    radians = np.deg2rad(37.0)
    rows, cols = np.mgrid[0:20, 0:14].astype(np.float64)
    rows, cols = rows - 9.5, cols - 6.5
    cos, sin = np.cos(radians), np.sin(radians)
    coordinates = [cos * rows + sin * cols + 9.5, cos * cols - sin * rows + 6.5]
    expected = ndimage.map_coordinates(image, coordinates, order=1, mode="mirror")
    np.testing.assert_allclose(rotate(image, 37.0, nearest=False), expected, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    degrees=st.floats(-90.0, 90.0),
    size=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    seed=st.integers(0, 2**16),
)
def test_rotated_labels_keep_their_class_set(degrees: float, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array([0, 3, 7, 255], dtype=np.uint8), size=(2, *size))
    out = rotate(labels, degrees, nearest=True)
    assert out.shape == labels.shape and out.dtype == np.uint8
    for season in range(2):
        assert set(np.unique(out[season]).tolist()) <= set(np.unique(labels[season]).tolist())


def test_device_rotation_by_hand() -> None:
    """The 3 x 3 window of the border test above, rotated on the device as the second sample of
    a batch whose first is not rotated: the same values (2.24264 and 1 at (0, 0), nearest 2
    at (0, 1)) as :func:`rotate`, and the first sample untouched."""
    window = np.arange(9, dtype=np.float32).reshape(3, 3)
    batch = torch.from_numpy(np.stack([window[None] + 10, window[None]]))
    rotation = BatchRotation.plan(np.array([0.0, 45.0]), 3, 3, torch.device("cpu"))
    bilinear, nearest = rotation.bilinear(batch), rotation.nearest(batch)
    assert bilinear[1, 0, 0, 0].item() == pytest.approx(4 - 3 * (2 - np.sqrt(2)), abs=1e-5)
    assert nearest[1, 0, 0, 0] == 1 and nearest[1, 0, 0, 1] == 2
    np.testing.assert_array_equal(bilinear[1, 0].numpy(), rotate(window, 45.0, nearest=False))
    np.testing.assert_array_equal(nearest[1, 0].numpy(), rotate(window, 45.0, nearest=True))
    assert torch.equal(bilinear[0], batch[0]) and torch.equal(nearest[0], batch[0])
    assert BatchRotation.plan(np.zeros(2), 3, 3, torch.device("cpu")) is None


@settings(max_examples=60, deadline=None)
@given(
    window=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    angles=st.lists(
        st.one_of(st.just(0.0), st.floats(-90.0, 90.0, allow_nan=False), st.sampled_from([90.0, -90.0, 45.0])),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["uint8", "uint16", "int16", "float32"]),
)
def test_device_rotation_equals_rotate(window: tuple[int, int], angles: list[float], seed: int, dtype: str) -> None:
    """The device's batched rotation equals :func:`rotate` of each window value for value (images
    bilinear, as float32, labels nearest in their dtype; 4-d and 3-d batches), in every stored
    dtype, for any window and angle; samples with angle 0 are left as they are."""
    rng = np.random.default_rng(seed)
    shape = (len(angles), 3, *window)
    if dtype == "float32":
        images = (rng.standard_normal(shape) * 100).astype(np.float32)
    else:
        info = np.iinfo(dtype)
        images = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    labels = rng.integers(0, 256, size=(len(angles), *window)).astype(np.uint8)
    rotation = BatchRotation.plan(np.array(angles), *window, torch.device("cpu"))
    if rotation is None:
        assert not any(angles)
        return
    bilinear = rotation.bilinear(torch.from_numpy(images)).numpy()
    nearest = rotation.nearest(torch.from_numpy(labels)).numpy()
    assert bilinear.dtype == np.float32 and nearest.dtype == np.uint8
    for index, degrees in enumerate(angles):
        expected = rotate(images[index], degrees, nearest=False).astype(np.float32)
        np.testing.assert_array_equal(bilinear[index], expected)
        np.testing.assert_array_equal(nearest[index], rotate(labels[index], degrees, nearest=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_rotation_on_cuda_equals_the_cpu() -> None:
    """Training rotates on GPUs: the same indices, weights and float32 sums, so the same values."""
    rng = np.random.default_rng(3)
    angles = np.array([0.0, 37.5, -90.0, 12.25])
    images = rng.integers(0, 256, size=(4, 15, 48, 40)).astype(np.uint8)
    raw = rng.integers(0, 2**16, size=(4, 13, 48, 40)).astype(np.uint16)
    labels = rng.integers(0, 10, size=(4, 4, 48, 40)).astype(np.uint8)
    on_cpu = BatchRotation.plan(angles, 48, 40, torch.device("cpu"))
    on_cuda = BatchRotation.plan(angles, 48, 40, torch.device("cuda"))
    for array in (images, raw):
        batch = torch.from_numpy(array)
        assert torch.equal(on_cuda.bilinear(batch.to("cuda")).cpu(), on_cpu.bilinear(batch))
    batch = torch.from_numpy(labels)
    assert torch.equal(on_cuda.nearest(batch.to("cuda")).cpu(), on_cpu.nearest(batch))


def test_to_device_rotates_the_cut_samples_by_their_angles() -> None:
    """The cutter crops and flips; the device rotates: each training sample's network inputs and
    labels equal those of its whole geometry applied on the CPU (:meth:`Geometry.apply`)."""
    meta = pretrain_meta()
    rows = random_rows(meta, 8, 40, seed=9)
    out = CutSamples(meta, 13, 32, SampleDraw(True, 2, 0.5, lambda: 1), labels_all=True)(as_table(meta, rows))
    inputs = to_device({name: torch.from_numpy(array) for name, array in out.items()}, meta, "cpu")
    rotated = 0
    for index, row in enumerate(rows):
        rng = sample_rng(2, 1, row["id"])
        season = int(rng.integers(4))
        geometry = random_geometry(rng, 40, 40, 32, 0.5)
        assert out["rotation_degrees"][index] == geometry.degrees
        rotated += geometry.degrees != 0.0
        for modality, x, spec in (("s1", inputs.x1, meta.s1), ("s2", inputs.x2, meta.s2)):
            stored = torch.from_numpy(np.ascontiguousarray(geometry.apply(row[modality][season], nearest=False)))
            assert torch.equal(x[index], network_input_tensor(stored[None], spec)[0])
        np.testing.assert_array_equal(inputs.y[index].numpy(), geometry.apply(row["label"][season], nearest=True))
        np.testing.assert_array_equal(inputs.clean_y[index].numpy(), geometry.apply(row["clean_label"][season], nearest=True))
    assert 0 < rotated < len(rows)


def test_random_geometry_frequencies_follow_spec_9() -> None:
    """Over 6000 draws: flipped 1/2 (then rows, columns or both, 1/3 each), rotated 0.2 by an
    angle uniform in [-90, 90]. Binomial standard deviations: 0.0065 (flips), 0.0052
    (rotation); the bounds are about 4 of them."""
    draws = [random_geometry(sample_rng(0, 0, str(i)), 264, 264, 256, 0.2) for i in range(6000)]
    flipped = [g for g in draws if g.flip_rows or g.flip_cols]
    assert abs(len(flipped) / len(draws) - 0.5) < 0.026
    kinds = [(g.flip_rows, g.flip_cols) for g in flipped]
    for kind in ((True, False), (False, True), (True, True)):
        assert abs(kinds.count(kind) / len(kinds) - 1 / 3) < 0.035
    angles = np.array([g.degrees for g in draws if g.degrees != 0.0])
    assert abs(len(angles) / len(draws) - 0.2) < 0.021
    assert angles.min() >= -90.0 and angles.max() <= 90.0
    assert abs(angles.mean()) < 6.0 and (angles < -45).mean() == pytest.approx(0.25, abs=0.05)
    unrotated = [random_geometry(sample_rng(0, 0, str(i)), 30, 30, 24, 0.0) for i in range(200)]
    assert all(g.degrees == 0.0 for g in unrotated)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    crop=st.integers(1, 48),
    seed=st.integers(0, 2**32),
    rotation_probability=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_random_geometry_stays_in_a_window_of_the_crop_size(
    height: int, width: int, crop: int, seed: int, rotation_probability: float
) -> None:
    """Without rotation the sample is a permutation of the window's pixels; with it, every
    pixel comes from the window (nearest)."""
    geometry = random_geometry(np.random.default_rng(seed), height, width, crop, rotation_probability)
    out_h, out_w = min(crop, height), min(crop, width)
    assert 0 <= geometry.top <= height - out_h and 0 <= geometry.left <= width - out_w
    coordinates = np.arange(height * width).reshape(height, width)
    window = geometry.apply(coordinates, nearest=True)
    assert window.shape == (out_h, out_w)
    expected = coordinates[geometry.top : geometry.top + out_h, geometry.left : geometry.left + out_w]
    if geometry.degrees == 0.0:
        assert sorted(window.ravel().tolist()) == sorted(expected.ravel().tolist())
    else:
        assert set(window.ravel().tolist()) <= set(expected.ravel().tolist())
    if rotation_probability == 0.0:
        assert geometry.degrees == 0.0


def test_augmentation_is_a_function_of_seed_id_and_epoch() -> None:
    """Every draw of the same (seed, id, epoch) gives the same sample, rotated or not, in
    whatever batch the row arrives; another epoch gives another."""
    meta = pretrain_meta()
    rows = random_rows(meta, 6, 32, seed=8)
    udf = CutSamples(meta, 13, 24, SampleDraw(True, 5, 1.0, lambda: 3), labels_all=True)
    whole = udf(as_table(meta, rows))
    alone = udf(as_table(meta, rows[4:5]))
    for name in ("s1", "s2", "label", "labels_all", "season"):
        np.testing.assert_array_equal(whole[name][4:5], alone[name])
        np.testing.assert_array_equal(whole[name], udf(as_table(meta, rows))[name])
    later = CutSamples(meta, 13, 24, SampleDraw(True, 5, 1.0, lambda: 4), labels_all=True)(as_table(meta, rows))
    assert not np.array_equal(whole["s2"], later["s2"])


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["uint8", "uint16", "float32"]),
    seasons=st.integers(1, 4),
    sizes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=6),
    chunk_at=st.integers(0, 6),
    skip=st.integers(0, 2),
)
def test_binary_column_views_match_the_stored_arrays(
    dtype: str, seasons: int, sizes: list[tuple[int, int]], chunk_at: int, skip: int
) -> None:
    rng = np.random.default_rng(len(sizes))
    arrays = [(rng.random((seasons, 3, h, w)) * 200).astype(dtype) for h, w in sizes]
    values = [b"junk"] * skip + [a.astype(np.dtype(dtype).newbyteorder("<")).tobytes() for a in arrays]
    cut = min(chunk_at + skip, len(values))
    column = pa.chunked_array([pa.array(values[:cut], pa.binary()), pa.array(values[cut:], pa.binary())])
    column = column.slice(skip)
    view = BinaryColumn(column, "s2", np.dtype(dtype).newbyteorder("<"), lambda h, w: (seasons, 3, h, w))
    for row, ((h, w), array) in enumerate(zip(sizes, arrays, strict=True)):
        np.testing.assert_array_equal(view.view(row, f"r{row}", h, w), array)
        np.testing.assert_array_equal(view.view(row, f"r{row}", h, w, seasons - 1), array[seasons - 1])


def test_binary_column_names_the_row_and_field_of_a_wrong_length() -> None:
    column = pa.chunked_array([pa.array([b"\x00" * 11], pa.binary())])
    view = BinaryColumn(column, "label", np.dtype(np.uint8), lambda h, w: (h, w))
    with pytest.raises(RowValidationError, match=r"row 'loc-7', field 'label': 11 bytes.*needs 12"):
        view.view(0, "loc-7", 3, 4)


def test_hash_split_is_blake2b_of_the_id() -> None:
    digest = hashlib.blake2b(b"0000042", digest_size=8, person=b"val-split").digest()
    assert stable_unit("0000042", "val-split") == int.from_bytes(digest, "little") / 2**64
    split = HashSplit(0.5)
    assert split.is_val("0000042") == (int.from_bytes(digest, "little") < 2**63)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=40, unique=True),
    fraction=st.floats(0.001, 0.999),
    seed=st.integers(0, 1000),
)
def test_hash_split_keeps_both_sides_and_ignores_order(ids: list[str], fraction: float, seed: int) -> None:
    split = HashSplit.for_ids(ids, fraction)
    shuffled = random.Random(seed).sample(ids, len(ids))
    assert HashSplit.for_ids(shuffled, fraction) == split
    val = [row_id for row_id in ids if split.is_val(row_id)]
    assert 1 <= len(val) <= len(ids) - 1
    if fraction > 0.999:
        return
    natural = [row_id for row_id in ids if stable_unit(row_id, "val-split") < fraction]
    if 1 <= len(natural) < len(ids):
        assert sorted(val) == sorted(natural)


def test_hash_split_without_fraction_or_with_one_id_holds_out_nothing() -> None:
    split = HashSplit.for_ids(["a", "b", "c"], 0.0)
    assert not any(split.is_val(row_id) for row_id in "abc")
    assert HashSplit.for_ids(["only", "only"], 0.99) == HashSplit(0.0)


def test_training_subset_sizes_by_count_and_fraction() -> None:
    ids = [f"tile-{index}" for index in range(10)]
    assert len(TrainingSubset.draw(ids, 0, count=3).ids) == 3
    assert len(TrainingSubset.draw(ids, 0, fraction=0.25).ids) == 2  # round(2.5) to the even 2
    assert len(TrainingSubset.draw(ids, 0, fraction=0.01).ids) == 1
    assert TrainingSubset.draw(ids, 0, fraction=1.0).ids == frozenset(ids)
    assert len(TrainingSubset.draw([*ids, *ids], 0, count=10).ids) == 10  # distinct ids
    subset = TrainingSubset.draw(ids, 0, count=4)
    assert [row_id for row_id in ids if subset(row_id)] == sorted(subset.ids, key=ids.index)
    with pytest.raises(ValueError, match=r"11 training tiles asked for, but only 10 are there"):
        TrainingSubset.draw(ids, 0, count=11)
    with pytest.raises(ValueError, match=r"exactly one of fraction and count"):
        TrainingSubset.draw(ids, 0, fraction=0.5, count=2)


@settings(max_examples=30, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=40, unique=True),
    seed=st.integers(0, 2**32),
    shuffle_seed=st.integers(0, 1000),
    data=st.data(),
)
def test_training_subset_is_a_function_of_ids_and_seed_and_nested(
    ids: list[str], seed: int, shuffle_seed: int, data: st.DataObject
) -> None:
    """The same seed draws the same tiles whatever the row order; a smaller subset lies in a larger one."""
    small = data.draw(st.integers(1, len(ids)))
    large = data.draw(st.integers(small, len(ids)))
    shuffled = random.Random(shuffle_seed).sample(ids, len(ids))
    drawn = TrainingSubset.draw(ids, seed, count=small)
    assert drawn == TrainingSubset.draw(shuffled, seed, count=small)
    assert len(drawn.ids) == small and drawn.ids <= set(ids)
    assert drawn.ids <= TrainingSubset.draw(ids, seed, count=large).ids


def test_training_subsets_differ_between_seeds() -> None:
    ids = [f"tile-{index}" for index in range(100)]
    assert TrainingSubset.draw(ids, 0, count=10) != TrainingSubset.draw(ids, 1, count=10)


def test_sample_rng_is_a_function_of_seed_epoch_and_id() -> None:
    draw = lambda seed, epoch, row_id: sample_rng(seed, epoch, row_id).integers(0, 2**62, size=4).tolist()  # noqa: E731
    assert draw(3, 1, "x") == draw(3, 1, "x")
    assert len({str(draw(3, 1, "x")), str(draw(3, 2, "x")), str(draw(4, 1, "x")), str(draw(3, 1, "y"))}) == 4
    assert draw(-1, 0, "x") == draw(2**64 - 1, 0, "x")


def test_band_subsets_by_name() -> None:
    meta = pretrain_meta()
    assert band_indices(meta, 13) == slice(None)
    assert band_indices(meta, 12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]
    assert band_indices(meta, 9).tolist() == [1, 2, 3, 4, 5, 6, 7, 11, 12]
    assert band_indices(meta, 3).tolist() == [3, 2, 1]
    rgb_only = meta.model_copy(update={"s2": meta.s2.with_bands(("B4", "B3", "B2"))})
    assert band_indices(rgb_only, 3) == slice(None)
    with pytest.raises(ValueError, match=r"9-band S2 subset needs bands \['B5'"):
        band_indices(rgb_only, 9)


def test_cut_samples_train_outputs_and_epoch_source() -> None:
    meta = pretrain_meta()
    rows = random_rows(meta, 5, 32, seed=1)
    table = as_table(meta, rows)
    epochs = iter([0, 1])
    udf = CutSamples(meta, 9, 24, SampleDraw(True, 7, 0.5, lambda: next(epochs)), labels_all=True)
    first, second = udf(table), udf(table)
    assert first["s1"].shape == (5, 2, 24, 24) and first["s1"].dtype == np.uint8
    assert first["s2"].shape == (5, 9, 24, 24) and first["s2"].dtype == np.uint8
    assert first["label"].shape == (5, 24, 24) and first["labels_all"].shape == (5, 4, 24, 24)
    assert first["season"].dtype == np.int64 and set(first["season"].tolist()) <= {0, 1, 2, 3}
    assert "prior" not in first
    np.testing.assert_array_equal(first["key"], second["key"])
    assert not np.array_equal(first["s2"], second["s2"])


def test_cut_samples_rejects_a_row_of_the_wrong_size_naming_file_and_id() -> None:
    meta = pretrain_meta()
    rows = random_rows(meta, 2, 16, seed=2)
    rows[1]["s2"] = rows[1]["s2"][:, :12]
    udf = CutSamples(meta, 13, 8, SampleDraw(False))
    with pytest.raises(ValueError, match=r"mem://shard.parquet: row '0000001', field 's2': .*bytes"):
        udf(as_table(meta, rows))


def test_tiles_smaller_than_the_crop_are_kept_whole_and_must_agree() -> None:
    meta = pretrain_meta()
    udf = CutSamples(meta, 3, 32, SampleDraw(True, 0, 1.0))
    out = udf(as_table(meta, random_rows(meta, 3, 24, seed=5)))
    assert out["s2"].shape == (3, 3, 24, 24) and out["label"].shape == (3, 24, 24)
    mixed = random_rows(meta, 1, 24, seed=6) + random_rows(meta, 1, 16, seed=7)
    mixed[1]["id"] = "small"
    message = r"smaller than the crop \(32\) differ in size.*: small is 16x16, 0000000 is 24x24"
    with pytest.raises(ValueError, match=message):
        udf(as_table(meta, mixed))


def test_one_geometry_for_images_labels_and_the_cpu_prior() -> None:
    """Every output of a sample goes through the geometry its (seed, epoch, id) draws: images
    and the full-tile prior bilinear, labels nearest (spec 9), rotated (on the device) or not."""
    meta = pretrain_meta()
    rows = random_rows(meta, 8, 40, seed=9)
    table = as_table(meta, rows)
    cpu = CutSamples(meta, 9, 32, SampleDraw(True, 2, 0.5, lambda: 1), cpu_prior="ts")(table)
    device = CutSamples(meta, 9, 32, SampleDraw(True, 2, 0.5, lambda: 1), labels_all=True)(table)
    np.testing.assert_array_equal(cpu["rotation_degrees"], device["rotation_degrees"])
    rotation = BatchRotation.plan(cpu["rotation_degrees"], 32, 32, torch.device("cpu"))
    rotated = {name: rotation.bilinear(torch.from_numpy(cpu[name])).numpy() for name in ("s1", "s2", "prior")}
    rotated["label"] = rotation.nearest(torch.from_numpy(cpu["label"])).numpy()
    rotated["labels_all"] = rotation.nearest(torch.from_numpy(device["labels_all"])).numpy()
    turned = 0
    for index, row in enumerate(rows):
        rng = sample_rng(2, 1, row["id"])
        season = int(rng.integers(4))
        geometry = random_geometry(rng, 40, 40, 32, 0.5)
        turned += geometry.degrees != 0.0
        assert cpu["season"][index] == season
        np.testing.assert_array_equal(rotated["s1"][index], geometry.apply(row["s1"][season], nearest=False))
        bands = geometry.crop(row["s2"][season])[[1, 2, 3, 4, 5, 6, 7, 11, 12]]
        np.testing.assert_array_equal(rotated["s2"][index], geometry.transform(bands, nearest=False))
        np.testing.assert_array_equal(rotated["label"][index], geometry.apply(row["label"][season], nearest=True))
        np.testing.assert_array_equal(rotated["labels_all"][index], geometry.apply(row["label"], nearest=True))
        full_prior = reference_prior(row["label"], season)
        np.testing.assert_allclose(rotated["prior"][index], geometry.apply(full_prior, nearest=False), atol=1e-5)
    assert 0 < turned < len(rows)


def test_device_prior_matches_cpu_prior_away_from_the_crop_border() -> None:
    """Spec 2 fast path: the prior of the cropped (and flipped) labels equals the cropped full-tile
    prior more than 4 sigma = 12 px from the crop border (both float32; tolerance 1e-5 for the
    float32 sums). Near the border they differ (the reflection sees the crop edge). A rotation
    (spec 9) resamples the prior bilinearly but the labels by nearest neighbour: that
    difference is measured by bench/data_pipeline.py (docs/benchmarks.md, section 3)."""
    meta = pretrain_meta()
    rows = random_rows(meta, 6, 64, seed=3)
    table = as_table(meta, rows)
    draw = SampleDraw(True, 11, 0.0, lambda: 2)
    on_cpu = CutSamples(meta, 13, 40, draw, cpu_prior="ts")(table)
    on_device = CutSamples(meta, 13, 40, draw, labels_all=True)(table)
    np.testing.assert_array_equal(on_cpu["label"], on_device["label"])
    cpu = to_device({k: torch.from_numpy(v) for k, v in on_cpu.items()}, meta, "cpu")
    device = to_device({k: torch.from_numpy(v) for k, v in on_device.items()}, meta, "cpu")
    assert cpu.prior.shape == device.prior.shape == (6, CLASSES, 40, 40)
    inner = (slice(None), slice(None), slice(RADIUS, -RADIUS), slice(RADIUS, -RADIUS))
    torch.testing.assert_close(device.prior[inner], cpu.prior[inner], rtol=0, atol=1e-5)
    assert (device.prior - cpu.prior).abs().amax() > 1e-3


def test_cpu_prior_is_the_full_tile_prior_of_spec_2() -> None:
    meta = pretrain_meta()
    rows = random_rows(meta, 2, 48, seed=4)
    out = CutSamples(meta, 13, 48, SampleDraw(False), cpu_prior="ts")(as_table(meta, rows))
    for index, row in enumerate(rows):
        expected = reference_prior(row["label"], int(out["season"][index]))
        np.testing.assert_allclose(out["prior"][index], expected, atol=1e-5)


def test_to_device_scales_as_declared_by_hand() -> None:
    meta = pretrain_meta()
    batch = {
        "s1": torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8),
        "s2": torch.tensor([[[[0, 255]]] * 13], dtype=torch.uint8),
        "label": torch.tensor([[[3, 255]]], dtype=torch.uint8),
        "clean_label": torch.tensor([[[3, 4]]], dtype=torch.uint8),
    }
    out = to_device(batch, meta, "cpu")
    # S1 stored 0, 255 (VV) and 51, 102 (VH) are -30, 5, -23 and -16 dB. Spec 9's rule,
    # (v - (mu - 2 sigma)) / (4 sigma) * 255: VV (-30 + 23.0624) / 21.0279 * 255 = -84.1 -> 0,
    # VV (5 + 23.0624) / 21.0279 * 255 = 340.3 -> 255, VH (-23 + 32.0154) / 23.6460 * 255 = 97.2 -> 97,
    # VH (-16 + 32.0154) / 23.6460 * 255 = 172.7 -> 172; the codes are divided by 255.
    expected_s1 = torch.tensor([[[[0.0, 255.0]], [[97.0, 172.0]]]]) / 255
    assert torch.equal(out.x1, expected_s1)
    # S2 holds the released v8 codes: only divided by 255
    assert torch.equal(out.x2[0, :, 0], torch.tensor([[0.0, 1.0]] * 13))
    assert out.y.dtype == torch.long and out.y.tolist() == [[[3, 255]]]
    assert out.clean_y.tolist() == [[[3, 4]]]
    assert out.prior is None


def test_to_device_keeps_raw_dtypes_and_downstream_batches() -> None:
    meta = ShardMetadata(
        kind="dw",
        classes=tuple(f"c{i}" for i in range(CLASSES)),
        seasons=1,
        s1=ModalitySpec(dtype="float32", bands=("VV", "VH"), unit="dB", representation="physical"),
        s2=ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, scale=1e-4, unit="reflectance", representation="physical"),
    )
    batch = {
        "s1": torch.tensor([[[[-12.5]], [[-20.25]]]]),
        "s2": torch.full((1, 3, 1, 1), 10000, dtype=torch.uint16),
        "label": torch.tensor([[[255]]], dtype=torch.uint8),
    }
    out = to_device(batch, meta, "cpu", prior="ts")
    # VV (-12.5 + 23.0624) / 21.0279 * 255 = 128.09 -> 128, VH (-20.25 + 32.0154) / 23.6460 * 255 = 126.9 -> 126
    assert torch.equal(out.x1, torch.tensor([[[[128.0]], [[126.0]]]]) / 255)
    # 10000 digital numbers in B4, B3, B2 (the 3-band subset) lie above mu + 2 sigma: 255 / 255
    assert torch.equal(out.x2, torch.ones(1, 3, 1, 1))
    assert out.prior is None and out.clean_y is None


def test_to_device_prior_none_ignores_a_cpu_prior() -> None:
    meta = pretrain_meta()
    batch = {
        "s1": torch.zeros(1, 2, 2, 2, dtype=torch.uint8),
        "s2": torch.zeros(1, 13, 2, 2, dtype=torch.uint8),
        "label": torch.zeros(1, 2, 2, dtype=torch.uint8),
        "prior": torch.full((1, CLASSES, 2, 2), 1 / CLASSES),
    }
    assert to_device(batch, meta, "cpu", prior="none").prior is None
    assert to_device(batch, meta, "cpu").prior.shape == (1, CLASSES, 2, 2)
