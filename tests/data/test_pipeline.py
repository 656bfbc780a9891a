"""The Ray Data pipeline on a real local Ray cluster: round trips from shards to device
batches, one geometry for every output, determinism, the validation split and bad input
(spec 2, 9, 10)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from cromss_ray.config import ConfigError, DataConfig, DownstreamDataConfig
from cromss_ray.data import network_input
from cromss_ray.data.device import BatchRotation, to_device
from cromss_ray.data.pipeline import (
    DownstreamDatasets,
    EpochClock,
    SkippedRows,
    downstream_datasets,
    open_shards,
    pretrain_datasets,
    set_epoch,
)
from cromss_ray.data.schema import NODATA, S2_BAND_NAMES, S2_BAND_SUBSETS, ModalitySpec, ShardMetadata
from cromss_ray.data.shards import ShardWriter, iter_rows
from cromss_ray.data.storage import epoch_permutation, scan_shards
from cromss_ray.data.transforms import HashSplit, stable_hash
from cromss_ray.method.smoothing import smoothing_prior

pytestmark = pytest.mark.ray

CLASSES = 9


@pytest.fixture(scope="module")
def coordinate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Float32 rows whose every pixel says where it came from: ``season * 1e6 + band * 1e4
    + y * 100 + x`` (exact in float32), with blocky random labels."""
    out = tmp_path_factory.mktemp("coordinates")
    meta = ShardMetadata(
        kind="pretrain",
        classes=tuple(f"c{i}" for i in range(CLASSES)),
        seasons=4,
        s1=ModalitySpec(dtype="float32", bands=("VV", "VH"), unit="dB", representation="physical"),
        s2=ModalitySpec(dtype="float32", bands=S2_BAND_NAMES, unit="reflectance", representation="physical"),
        has_clean_label=True,
    )
    size = 40
    t, b, y, x = np.meshgrid(np.arange(4), np.arange(13), np.arange(size), np.arange(size), indexing="ij")
    code = (t * 1e6 + b * 1e4 + y * 100 + x).astype(np.float32)
    rng = np.random.default_rng(0)
    with ShardWriter(out, meta, target_bytes=2_000_000, row_group_rows=4) as writer:
        for index in range(48):
            coarse = rng.integers(0, CLASSES, size=(4, 6, 6))
            labels = np.kron(coarse, np.ones((1, 7, 7), dtype=np.int64))[:, :size, :size].astype(np.uint8)
            labels[rng.random(labels.shape) < 0.03] = NODATA
            clean = (labels + 1) % CLASSES
            writer.write(
                {
                    "id": f"loc{index:03d}",
                    "dates": ["2020-01-01", "2020-04-01", "2020-07-01", "2020-10-01"],
                    "s1": code[:, :2].copy(),
                    "s2": code,
                    "label": labels,
                    "clean_label": clean,
                }
            )
    return out


def stored_rows(directory: Path) -> dict[int, dict]:
    """Every stored row by its pipeline key."""
    rows = {}
    for shard in sorted(directory.glob("*.parquet")):
        for row in iter_rows(str(shard)):
            rows[stable_hash(row["id"], "key") >> 1] = row
    return rows


def samples(dataset: ray.data.Dataset, batch_size: int = 5) -> dict[int, dict[str, np.ndarray]]:
    """Every sample of one pass, by key."""
    out = {}
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for index, key in enumerate(batch["key"].tolist()):
            out[key] = {name: values[index] for name, values in batch.items()}
    return out


def split_samples(dataset: ray.data.Dataset, workers: int = 2) -> dict[int, dict[str, np.ndarray]]:
    """One pass through ``streaming_split``, consumed concurrently as Ray Train workers do."""
    shards = dataset.streaming_split(workers)

    def consume(rank: int) -> dict[int, dict[str, np.ndarray]]:
        return {
            key: {name: values[index] for name, values in batch.items()}
            for batch in shards[rank].iter_batches(batch_size=3, batch_format="numpy")
            for index, key in enumerate(batch["key"].tolist())
        }

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(consume, range(workers)))
    assert not set(parts[0]) & set(parts[1])
    return {key: sample for part in parts for key, sample in part.items()}


def test_pretrain_round_trip_shapes_dtypes_ranges(ray_cluster: None, pretrain_shards: Path) -> None:
    cfg = DataConfig(uri=str(pretrain_shards), crop=32, val_fraction=0.25, s2_bands=12)
    data = pretrain_datasets(cfg, seed=0)
    assert len(list(pretrain_shards.glob("*.parquet"))) > 1
    assert data.num_train + data.num_val == 12 and data.num_val >= 1
    seen = []
    for batch in data.train.iter_torch_batches(batch_size=5):
        n = len(batch["key"])
        seen.extend(batch["key"].tolist())
        assert batch["s1"].shape == (n, 2, 32, 32) and batch["s1"].dtype == torch.uint8
        assert batch["s2"].shape == (n, 12, 32, 32) and batch["s2"].dtype == torch.uint8
        assert batch["label"].shape == (n, 32, 32) and batch["label"].dtype == torch.uint8
        assert batch["labels_all"].shape == (n, 4, 32, 32) and batch["clean_label"].shape == (n, 32, 32)
        assert batch["season"].dtype == torch.int64 and bool(((batch["season"] >= 0) & (batch["season"] < 4)).all())
        assert "prior" not in batch
        assert set(batch["label"].unique().tolist()) <= set(range(CLASSES)) | {NODATA}
        device = to_device(batch, data.meta, "cpu")
        assert device.x1.dtype == device.x2.dtype == torch.float32
        assert 0.0 <= device.x1.min() and device.x1.max() <= 1.0, "the rule of spec 9 clips to [0, 1]"
        assert 0.0 <= device.x2.min() and device.x2.max() <= 1.0
        assert device.prior.shape == (n, CLASSES, 32, 32) and bool((device.prior >= 0).all())
        torch.testing.assert_close(device.prior.sum(1), torch.ones(n, 32, 32))
        assert device.y.dtype == device.clean_y.dtype == torch.long
    assert len(seen) == len(set(seen)) == data.num_train
    val = samples(data.val)
    stored = stored_rows(pretrain_shards)
    split = HashSplit.for_ids([row["id"] for row in stored.values()], 0.25)
    assert set(val) == {key for key, row in stored.items() if split.is_val(row["id"])}
    assert len(val) == data.num_val and not set(val) & set(seen)
    assert set(val) | set(seen) == set(stored)
    for key, sample in val.items():
        row = stored[key]
        season = stable_hash(row["id"], "val-season") % 4
        assert sample["season"] == season
        bands = list(S2_BAND_SUBSETS[12])
        np.testing.assert_array_equal(sample["s2"], row["s2"][season][bands, 16:48, 16:48])
        np.testing.assert_array_equal(sample["label"], row["label"][season, 16:48, 16:48])
        assert "labels_all" not in sample and "prior" not in sample


def _source_coordinates(s2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    code = s2.astype(np.int64)
    return code // 1_000_000, code % 1_000_000 // 10_000, code % 10_000 // 100, code % 100


def _orientation(ys: np.ndarray, xs: np.ndarray) -> tuple[int, int, int, int]:
    """The flips of a window: source steps along output rows and columns."""
    return (int(ys[1, 0] - ys[0, 0]), int(xs[1, 0] - xs[0, 0]), int(ys[0, 1] - ys[0, 0]), int(xs[0, 1] - xs[0, 0]))


def test_one_geometry_for_images_labels_and_priors(ray_cluster: None, coordinate_dir: Path) -> None:
    """Crop and flips traced through Ray Data by pixels that encode their source; rotations
    resample (no source to trace) and are checked on the UDF in test_pipeline_transforms."""
    stored = stored_rows(coordinate_dir)
    bands = list(S2_BAND_SUBSETS[9])
    cfg = DataConfig(
        uri=str(coordinate_dir), crop=24, val_fraction=0.0, s2_bands=9, rotation_probability=0.0, prior_on_device=False
    )
    cpu_path = pretrain_datasets(cfg, seed=3)
    orientations = set()
    for key, sample in samples(cpu_path.train).items():
        row = stored[key]
        season, band, ys, xs = _source_coordinates(sample["s2"])
        assert (season == sample["season"]).all()
        assert (band == np.asarray(bands)[:, None, None]).all()
        assert (ys == ys[0]).all() and (xs == xs[0]).all()
        ys, xs = ys[0], xs[0]
        s1_season, s1_band, s1_y, s1_x = _source_coordinates(sample["s1"])
        assert (s1_season == sample["season"]).all() and (s1_band == np.arange(2)[:, None, None]).all()
        assert (s1_y == ys).all() and (s1_x == xs).all()
        np.testing.assert_array_equal(sample["label"], row["label"][sample["season"], ys, xs])
        np.testing.assert_array_equal(sample["clean_label"], row["clean_label"][sample["season"], ys, xs])
        expected_prior = smoothing_prior(torch.from_numpy(row["label"]), int(sample["season"])).numpy()
        np.testing.assert_allclose(sample["prior"], expected_prior[:, ys, xs], atol=1e-5)
        orientations.add(_orientation(ys, xs))
    assert orientations <= {(1, 0, 0, 1), (-1, 0, 0, 1), (1, 0, 0, -1), (-1, 0, 0, -1)}
    assert len(orientations) == 4

    device_path = pretrain_datasets(cfg.model_copy(update={"prior_on_device": True}), seed=3)
    for key, sample in samples(device_path.train).items():
        row = stored[key]
        _, _, ys, xs = _source_coordinates(sample["s2"])
        np.testing.assert_array_equal(sample["labels_all"], row["label"][:, ys[0], xs[0]])
        assert "prior" not in sample


def test_augmentation_is_a_function_of_seed_id_and_epoch(ray_cluster: None, pretrain_shards: Path) -> None:
    cfg = DataConfig(uri=str(pretrain_shards), crop=24, val_fraction=0.25, rotation_probability=0.5)
    first, second = pretrain_datasets(cfg, seed=5), pretrain_datasets(cfg, seed=5)
    set_epoch(first.clock, 1)
    set_epoch(second.clock.name, 1)
    assert EpochClock.named(second.clock.name).read() == 1
    by_two_workers = split_samples(first.train)
    by_one_reader = samples(second.train, batch_size=7)
    assert set(by_two_workers) == set(by_one_reader) and len(by_one_reader) == first.num_train
    for key, sample in by_one_reader.items():
        for name in ("season", "s1", "s2", "label", "labels_all"):
            np.testing.assert_array_equal(sample[name], by_two_workers[key][name])
    set_epoch(second.clock, 2)
    next_epoch = samples(second.train)
    changed = sum(not np.array_equal(next_epoch[key]["s2"], sample["s2"]) for key, sample in by_one_reader.items())
    assert changed >= len(by_one_reader) - 1


def test_a_lost_epoch_clock_is_restarted_with_its_epoch(ray_cluster: None) -> None:
    clock = EpochClock.create()
    set_epoch(clock, 3)
    ray.kill(clock.actor, no_restart=False)
    assert clock.read() == 3, "the call waits for the restarted clock, which kept its epoch"
    set_epoch(clock.name, 4)
    assert EpochClock.named(clock.name).read() == 4
    ray.kill(clock.actor)


def test_training_order_is_a_fresh_permutation_every_epoch(ray_cluster: None, coordinate_dir: Path) -> None:
    """Spec 9: every epoch an i.i.d. order over all rows of all files (not file by file),
    exactly the epoch's permutation of the rows whatever the dataset object or its executions."""
    stored, file_of = [], {}
    for index, shard in enumerate(sorted(coordinate_dir.glob("*.parquet"))):
        for row in iter_rows(str(shard)):
            key = stable_hash(row["id"], "key") >> 1
            stored.append(key)
            file_of[key] = index
    files = len(set(file_of.values()))
    assert files >= 4
    cfg = DataConfig(uri=str(coordinate_dir), crop=24, val_fraction=0.0, rotation_probability=0.0)

    def order(data: ray.data.Dataset) -> list[int]:
        return [key for batch in data.iter_batches(batch_size=7, batch_format="numpy") for key in batch["key"].tolist()]

    first, second = pretrain_datasets(cfg, seed=4), pretrain_datasets(cfg, seed=4)
    epoch_0 = order(first.train)
    set_epoch(first.clock, 1)
    epoch_1 = order(first.train)
    set_epoch(second.clock, 1)
    assert order(second.train) == epoch_1
    set_epoch(first.clock, 0)
    assert order(first.train) == epoch_0
    for epoch, keys in ((0, epoch_0), (1, epoch_1)):
        assert keys == [stored[row] for row in epoch_permutation(len(stored), 4, epoch)]
        assert sorted(keys) == sorted(stored)
        # read file by file, the file would change files - 1 times along the order
        changes = sum(file_of[a] != file_of[b] for a, b in zip(keys, keys[1:], strict=False))
        assert changes > 3 * (files - 1)
    assert epoch_0 != epoch_1


def test_separate_validation_location(ray_cluster: None, pretrain_shards: Path, tmp_path: Path) -> None:
    val_file = Path(shutil.copy(sorted(pretrain_shards.glob("*.parquet"))[-1], tmp_path))  # a set without manifest
    config = DataConfig(uri=str(pretrain_shards), val_uri=str(tmp_path), crop=32, allow_incomplete=True)
    data = pretrain_datasets(config, seed=0)
    val_rows = pq.ParquetFile(val_file).metadata.num_rows
    assert (data.num_train, data.num_val) == (12, val_rows)
    assert set(samples(data.val)) == set(stored_rows(tmp_path))


def test_downstream_round_trip(ray_cluster: None, dw_shards: Path) -> None:
    cfg = DownstreamDataConfig(uri=str(dw_shards), test_uri=str(dw_shards), crop=32, s2_bands=3, val_fraction=0.3)
    data = downstream_datasets(cfg, seed=0)
    assert data.num_train + data.num_val == 12 and data.num_val >= 1 and data.num_test == 12
    for batch in data.train.iter_torch_batches(batch_size=4):
        n = len(batch["key"])
        assert batch["s1"].shape == (n, 2, 32, 32) and batch["s1"].dtype == torch.float32
        assert batch["s2"].shape == (n, 3, 32, 32) and batch["s2"].dtype == torch.uint16
        assert set(batch) == {"s1", "s2", "label", "key", "rotation_degrees"}
        device = to_device(batch, data.meta, "cpu")
        assert device.prior is None and device.x2.max() <= 1.0
        rgb = data.meta.s2.with_bands(("B4", "B3", "B2"))
        rotation = BatchRotation.plan(batch["rotation_degrees"].numpy(), 32, 32, torch.device("cpu"))
        s2 = batch["s2"] if rotation is None else rotation.bilinear(batch["s2"])
        expected = network_input(s2.numpy(), rgb)
        np.testing.assert_array_equal(device.x2.numpy().view(np.uint32), expected.view(np.uint32))
    stored = stored_rows(dw_shards)
    test = samples(data.test)
    assert set(test) == set(stored)
    for key, sample in test.items():
        np.testing.assert_array_equal(sample["s2"], stored[key]["s2"][[3, 2, 1], 16:48, 16:48])
        np.testing.assert_array_equal(sample["label"], stored[key]["label"][16:48, 16:48])


def _copy_shard(source: Path, target_dir: Path) -> Path:
    target_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(next(iter(sorted(source.glob("*.parquet")))), target_dir / "part-00000.parquet"))


def test_truncated_shard_is_named(ray_cluster: None, pretrain_shards: Path, tmp_path: Path) -> None:
    shard = _copy_shard(pretrain_shards, tmp_path)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{shard}: not a readable Parquet file"):
        open_shards(str(tmp_path))


def test_garbage_and_foreign_parquet_are_named(ray_cluster: None, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    garbage = tmp_path / "a" / "part-00000.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=rf"{garbage}: not a readable Parquet file"):
        open_shards(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    foreign = tmp_path / "b" / "part-00000.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(ValueError, match=rf"{foreign}: no 'cromss' metadata.*not a cromss shard"):
        pretrain_datasets(DataConfig(uri=str(tmp_path / "b")), seed=0)


def test_missing_or_mistyped_column_is_named(ray_cluster: None, pretrain_shards: Path, tmp_path: Path) -> None:
    table = pq.read_table(_copy_shard(pretrain_shards, tmp_path / "src"))
    (tmp_path / "missing").mkdir()
    pq.write_table(table.drop_columns(["label"]), tmp_path / "missing" / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"missing/part-00000.parquet: missing column 'label'"):
        open_shards(str(tmp_path / "missing"))
    (tmp_path / "typed").mkdir()
    index = table.schema.get_field_index("s2")
    mistyped = table.set_column(index, pa.field("s2", pa.string()), pa.array(["x"] * table.num_rows))
    pq.write_table(mistyped, tmp_path / "typed" / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"typed/part-00000.parquet: column 's2' has type string, expected binary"):
        open_shards(str(tmp_path / "typed"))


def test_mismatching_metadata_and_empty_directory(
    ray_cluster: None, pretrain_shards: Path, dw_shards: Path, tmp_path: Path
) -> None:
    _copy_shard(pretrain_shards, tmp_path / "mixed")
    odd = shutil.copy(sorted(dw_shards.glob("*.parquet"))[0], tmp_path / "mixed" / "part-00001.parquet")
    with pytest.raises(ValueError, match=rf"{odd}: shard metadata differs from .*part-00000.parquet in .*kind"):
        open_shards(str(tmp_path / "mixed"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no '\*.parquet' shards"):
        open_shards(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such directory"):
        open_shards(str(tmp_path / "nowhere"))
    with pytest.raises(NotADirectoryError, match=r"part-00000.parquet: expected a directory of shards"):
        open_shards(str(tmp_path / "mixed" / "part-00000.parquet"))


def test_bad_row_bytes_fail_naming_file_and_row(ray_cluster: None, pretrain_shards: Path, tmp_path: Path) -> None:
    table = pq.read_table(_copy_shard(pretrain_shards, tmp_path / "src"))
    index = table.schema.get_field_index("label")
    short = [value[:-1] if row == 2 else value for row, value in enumerate(table.column("label").to_pylist())]
    broken = table.set_column(index, table.schema.field("label"), pa.array(short, pa.binary()))
    (tmp_path / "bad").mkdir()
    pq.write_table(broken, tmp_path / "bad" / "part-00000.parquet", row_group_size=4)
    config = DataConfig(uri=str(tmp_path / "bad"), crop=16, val_fraction=0.0, allow_incomplete=True)
    data = pretrain_datasets(config, seed=0)
    bad_id = table.column("id")[2].as_py()
    with pytest.raises(ray.exceptions.RayError, match=rf"bad/part-00000.parquet: row '{bad_id}', field 'label'"):
        samples(data.train)


def test_shards_are_not_listed_again_every_epoch(
    ray_cluster: None, pretrain_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Data's V2 Parquet reader lists the files and reads their footers at every execution
    (about 1 s before each epoch's first batch); the shards are read by the V1 reader, whose
    metadata is read once, and the caller's DataContext is left as it was."""
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "use_datasource_v2", True)
    dataset, _ = open_shards(str(pretrain_shards))
    assert context.use_datasource_v2 is True
    assert dataset.count() == scan_shards(str(pretrain_shards)).num_rows
    stats = dataset.materialize().stats()
    assert "ReadParquet" in stats and "ListFiles" not in stats


def _rewrite_row(shards: Path, target: Path, row: int, field: str, value: int, **write_options: object) -> str:
    """A copy of ``shards`` whose first file has one pixel of ``field`` in row ``row`` set to
    ``value`` (the manifest still agrees: same files, same row counts); returns the row's id."""
    shutil.copytree(shards, target)
    path = sorted(target.glob("*.parquet"))[0]
    table = pq.read_table(path)
    values = table.column(field).to_pylist()
    changed = bytearray(values[row])
    changed[len(changed) // 2] = value
    values[row] = bytes(changed)
    index = table.schema.get_field_index(field)
    table = table.set_column(index, table.schema.field(field), pa.array(values, pa.binary()))
    pq.write_table(table, path, row_group_size=4, write_page_checksum=True, **write_options)
    return table.column("id")[row].as_py()


def test_a_label_outside_the_classes_fails_pretraining_naming_file_and_location(
    ray_cluster: None, pretrain_shards: Path, tmp_path: Path
) -> None:
    bad_id = _rewrite_row(pretrain_shards, tmp_path / "bad", 1, "label", 17)
    data = pretrain_datasets(DataConfig(uri=str(tmp_path / "bad"), crop=16, val_fraction=0.0), seed=0)
    message = rf"bad/part-00000.parquet: row '{bad_id}', field 'label': values \[17\] outside 0..8"
    with pytest.raises(ray.exceptions.RayError, match=message):
        samples(data.train)


def test_skipped_bad_rows_are_left_out_and_counted_every_epoch(
    ray_cluster: None, pretrain_shards: Path, tmp_path: Path
) -> None:
    bad_id = _rewrite_row(pretrain_shards, tmp_path / "bad", 1, "label", 17)
    config = DataConfig(uri=str(tmp_path / "bad"), crop=16, val_fraction=0.0, on_bad_row="skip")
    data = pretrain_datasets(config, seed=0)
    first = samples(data.train)
    assert len(first) == data.num_train - 1 and stable_hash(bad_id, "key") >> 1 not in first
    assert data.skipped.count() == 1
    set_epoch(data.clock, 1)
    samples(data.train)
    counter = SkippedRows.named(data.skipped.name)
    assert counter.count() == 2
    assert all(f"row '{bad_id}', field 'label'" in message for message in counter.messages())


def test_a_training_subset_trains_its_seeded_share_of_the_training_tiles(
    ray_cluster: None, dw_shards: Path
) -> None:
    def subset(seed: int, **size: float) -> DownstreamDatasets:
        cfg = DownstreamDataConfig(uri=str(dw_shards), crop=32, val_fraction=0.25, **size)
        return downstream_datasets(cfg, seed=seed)

    whole = subset(0)
    data = subset(3, train_count=4)
    assert (data.num_train, data.num_val) == (4, whole.num_val)
    rows = stored_rows(dw_shards)
    trained = {rows[key]["id"] for key in samples(data.train)}
    held_out = {rows[key]["id"] for key in samples(whole.val)}
    assert len(trained) == 4 and not trained & held_out
    assert {rows[key]["id"] for key in samples(subset(3, train_count=4).train)} == trained
    assert subset(3, train_fraction=0.5).num_train == round(0.5 * whole.num_train)
    with pytest.raises(ConfigError, match=rf"data.train_count: 99 training tiles asked for, but only {whole.num_train}"):
        subset(3, train_count=99)


def test_bad_imagery_or_labels_fail_fine_tuning_instead_of_a_device_assert(
    ray_cluster: None, dw_shards: Path, tmp_path: Path
) -> None:
    labels_id = _rewrite_row(dw_shards, tmp_path / "labels", 2, "label", 9)
    data = downstream_datasets(DownstreamDataConfig(uri=str(tmp_path / "labels"), crop=32, val_fraction=0.0), seed=0)
    with pytest.raises(ray.exceptions.RayError, match=rf"row '{labels_id}', field 'label': values \[9\] outside 0..8"):
        samples(data.train)
    config = DownstreamDataConfig(uri=str(dw_shards), test_uri=str(tmp_path / "labels"), crop=32, val_fraction=0.0)
    tiles = downstream_datasets(config, seed=0).test_tiles
    with pytest.raises(ValueError, match=rf"row 2: row '{labels_id}', field 'label'"):
        list(tiles.rows())


def test_a_corrupted_page_fails_the_training_read_on_its_checksum(
    ray_cluster: None, pretrain_shards: Path, tmp_path: Path
) -> None:
    """Uncompressed pages, so that a flipped byte decodes silently unless the checksum is verified."""
    _rewrite_row(pretrain_shards, tmp_path / "plain", 0, "label", 0, compression="none")
    path = sorted((tmp_path / "plain").glob("*.parquet"))[0]
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(pq.read_schema(path).get_field_index("s2"))
    raw = bytearray(path.read_bytes())
    raw[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    data = pretrain_datasets(DataConfig(uri=str(tmp_path / "plain"), crop=16, val_fraction=0.0), seed=0)
    with pytest.raises(ray.exceptions.RayError, match=rf"{path}: cannot read rows .*(?i:checksum)"):
        samples(data.train)


def test_a_set_whose_manifest_does_not_vouch_for_it_is_refused(
    ray_cluster: None, pretrain_shards: Path, tmp_path: Path
) -> None:
    shutil.copytree(pretrain_shards, tmp_path / "cut")
    sorted((tmp_path / "cut").glob("*.parquet"))[-1].unlink()
    with pytest.raises(ValueError, match=r"manifest.json: lists part-00001.parquet, which is not there"):
        pretrain_datasets(DataConfig(uri=str(tmp_path / "cut")), seed=0)
    data = pretrain_datasets(DataConfig(uri=str(tmp_path / "cut"), allow_incomplete=True, val_fraction=0.0), seed=0)
    assert data.num_train == len(list(iter_rows(str(sorted((tmp_path / "cut").glob("*.parquet"))[0]))))
