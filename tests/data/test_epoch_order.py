"""The training order read without an all-to-all shuffle (spec 9): each epoch's permutation
of all rows, cut into chunks and read straight from the shards' row groups."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cromss_ray.data.schema import S2_BAND_NAMES, ModalitySpec, ShardMetadata
from cromss_ray.data.storage import EpochRows, ShardSet, epoch_permutation, scan_shards
from cromss_ray.data.transforms import CutSamples, SampleDraw

ID_ONLY_META = ShardMetadata(
    kind="pretrain",
    classes=("land", "water"),
    seasons=1,
    s1=ModalitySpec(dtype="uint8", bands=("VV", "VH"), unit="dB", representation="physical"),
    s2=ModalitySpec(dtype="uint8", bands=S2_BAND_NAMES, unit="reflectance", representation="physical"),
    has_clean_label=False,
)
"""Metadata the id-only shards are given: the reader does not look at it."""


def read_epoch(reader: EpochRows) -> list[str]:
    """Every chunk of the reader's epoch, in chunk order: the rows' ids."""
    chunks = (reader({"id": np.array([chunk])}) for chunk in range(reader.num_chunks))
    return [row_id for table in chunks for row_id in table.column("id").to_pylist()]


def id_shards(directory: Path, rows_per_file: list[int], row_group_rows: int) -> ShardSet:
    """Shards holding only an ``id`` column, ``file/row`` (the reader needs no other column)."""
    files = []
    for file, count in enumerate(rows_per_file):
        path = directory / f"part-{file:05d}.parquet"
        ids = pa.array([f"{file}/{row}" for row in range(count)], pa.string())
        pq.write_table(pa.table({"id": ids}), path, row_group_size=row_group_rows, write_page_checksum=True)
        files.append(str(path))
    return ShardSet(str(directory), pafs.LocalFileSystem(), tuple(files), tuple(rows_per_file), ID_ONLY_META)


def test_the_permutation_is_a_pure_function_of_seed_and_epoch() -> None:
    np.testing.assert_array_equal(epoch_permutation(50, 3, 1), np.random.default_rng([3, 1]).permutation(50))
    np.testing.assert_array_equal(epoch_permutation(50, -1, 0), epoch_permutation(50, 2**64 - 1, 0))
    assert not np.array_equal(epoch_permutation(50, 3, 1), epoch_permutation(50, 3, 2))
    assert not np.array_equal(epoch_permutation(50, 3, 1), epoch_permutation(50, 4, 1))


@settings(max_examples=40, deadline=None)
@given(
    rows_per_file=st.lists(st.integers(0, 11), min_size=1, max_size=5).filter(lambda rows: sum(rows) > 0),
    row_group_rows=st.integers(1, 5),
    chunk_rows=st.integers(1, 9),
    seed=st.integers(-(2**63), 2**63 - 1),
    epoch=st.integers(0, 300),
)
def test_chunks_read_every_row_once_in_the_epochs_order(
    rows_per_file: list[int], row_group_rows: int, chunk_rows: int, seed: int, epoch: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        shards = id_shards(Path(directory), rows_per_file, row_group_rows)
        reader = EpochRows(shards, seed, lambda: epoch, chunk_rows, open_files=2)
        ids = read_epoch(reader)
        stored = [f"{file}/{row}" for file, count in enumerate(rows_per_file) for row in range(count)]
        assert ids == [stored[row] for row in epoch_permutation(len(stored), seed, epoch)]
        assert sorted(ids) == sorted(stored)
        first = reader({"id": np.array([0])})
        for path, row_id in zip(first.column("path").to_pylist(), first.column("id").to_pylist(), strict=True):
            assert path == shards.files[int(row_id.split("/")[0])]


def test_the_epoch_is_read_from_its_source_at_every_call(tmp_path: Path) -> None:
    shards = id_shards(tmp_path, [7, 5, 9], 4)
    epoch = [0]
    reader = EpochRows(shards, 8, lambda: epoch[0], 3)
    first = read_epoch(reader)
    epoch[0] = 1
    second = read_epoch(reader)
    assert first != second and sorted(first) == sorted(second)
    epoch[0] = 0
    assert read_epoch(EpochRows(shards, 8, lambda: 0, 3)) == first
    assert len({row_id.split("/")[0] for row_id in first[:6]}) > 1


def test_a_bad_row_read_in_the_epochs_order_is_named_with_file_and_id(pretrain_shards: Path, tmp_path: Path) -> None:
    target = tmp_path / "bad"
    shutil.copytree(pretrain_shards, target)
    path = sorted(target.glob("*.parquet"))[0]
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[1] = bytes([17]) * len(labels[1])
    index = table.schema.get_field_index("label")
    table = table.set_column(index, table.schema.field("label"), pa.array(labels, pa.binary()))
    pq.write_table(table, path, row_group_size=4)
    shards = scan_shards(str(target))
    cut = CutSamples(shards.meta, 13, 16, SampleDraw(True, 0, 0.0, lambda: 0))
    reader = EpochRows(shards, 0, lambda: 0, 8)
    bad_id = table.column("id")[1].as_py()
    with pytest.raises(ValueError, match=rf"{path}: row '{bad_id}', field 'label': values \[17\] outside"):
        for chunk in range(reader.num_chunks):
            cut(reader({"id": np.array([chunk])}))


def test_an_unreadable_shard_is_named(tmp_path: Path) -> None:
    shards = id_shards(tmp_path, [4, 4], 2)
    Path(shards.files[1]).write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=rf"{shards.files[1]}: cannot open"):
        read_epoch(EpochRows(shards, 0, lambda: 0, 8))
