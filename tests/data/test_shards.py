"""Writing, validating, listing and reading shards (spec 9, 10; docs/data.md), and what the readers
refuse without Ray: a manifest that does not vouch for the set, rows with labels outside the classes
or non-finite imagery (``TileSet``, ``iter_rows``; docs/reliability.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cromss_ray.data.schema import (
    CLASS_SCHEMES,
    MANIFEST_NAME,
    NODATA,
    S1_BAND_NAMES,
    S2_BAND_NAMES,
    ModalitySpec,
    ShardMetadata,
)
from cromss_ray.data.shards import (
    RowValidationError,
    ShardFileError,
    ShardWriter,
    decode_row,
    encode_row,
    iter_rows,
    list_shards,
    read_manifest,
)
from cromss_ray.data.storage import IncompleteShardsError, TileSet, scan_shards

PRETRAIN = ShardMetadata(
    kind="pretrain",
    classes=CLASS_SCHEMES["pretrain"],
    s1=ModalitySpec(dtype="uint8", bands=S1_BAND_NAMES, scale=1 / 255, unit="normalized", representation="v8"),
    s2=ModalitySpec(dtype="uint8", bands=S2_BAND_NAMES, scale=1 / 255, unit="normalized", representation="v8"),
    has_clean_label=True,
)
DOWNSTREAM = ShardMetadata(
    kind="dfc2020",
    classes=CLASS_SCHEMES["dfc2020"],
    seasons=1,
    s1=ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB", representation="physical"),
    s2=ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, scale=1e-4, unit="reflectance", representation="physical"),
)


def pretrain_row(index: int, size: int = 8, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng([seed, index])
    return {
        "id": f"{index:07d}",
        "dates": ["2020-01-01", "2020-04-01", "2020-07-01", "2020-10-01"],
        "s1": rng.integers(0, 256, (4, 2, size, size), dtype=np.uint8),
        "s2": rng.integers(0, 256, (4, 13, size, size), dtype=np.uint8),
        "label": rng.integers(0, 9, (4, size, size), dtype=np.uint8),
        "clean_label": rng.integers(0, 9, (4, size, size), dtype=np.uint8),
    }


def downstream_row(index: int, size: int = 8) -> dict[str, Any]:
    rng = np.random.default_rng(index)
    label = rng.integers(0, 8, (size, size), dtype=np.uint8)
    label[0, 0] = NODATA
    return {
        "id": f"tile-{index}",
        "dates": ["2019-08-16"],
        "s1": rng.normal(-12, 4, (2, size, size)).astype(np.float32),
        "s2": rng.integers(0, 10000, (13, size, size), dtype=np.uint16),
        "label": label,
    }


def test_round_trip_keeps_every_array_and_field(tmp_path: Path) -> None:
    rows = [pretrain_row(i) for i in range(5)]
    with ShardWriter(tmp_path, PRETRAIN, row_group_rows=2) as writer:
        for row in rows:
            writer.write(row)
    [path] = list_shards(tmp_path)
    read = list(iter_rows(path))
    assert [r["id"] for r in read] == [r["id"] for r in rows]
    for original, back in zip(rows, read, strict=True):
        assert back["dates"] == original["dates"]
        for name in ("s1", "s2", "label", "clean_label"):
            assert back[name].dtype == original[name].dtype
            np.testing.assert_array_equal(back[name], original[name])
    assert [pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(3)] == [2, 2, 1]


def test_float_and_uint16_imagery_round_trip_one_season(tmp_path: Path) -> None:
    rows = [downstream_row(i) for i in range(3)]
    with ShardWriter(tmp_path, DOWNSTREAM) as writer:
        for row in rows:
            writer.write(row)
    read = list(iter_rows(list_shards(tmp_path)[0]))
    np.testing.assert_array_equal(read[2]["s1"], rows[2]["s1"])
    np.testing.assert_array_equal(read[2]["s2"], rows[2]["s2"])
    assert read[0]["s1"].shape == (2, 8, 8) and read[0]["label"].shape == (8, 8)


def test_manifest_counts_rows_and_class_pixels(tmp_path: Path) -> None:
    rows = [pretrain_row(i) for i in range(4)]
    rows[0]["label"][0, :2, :2] = NODATA
    with ShardWriter(tmp_path, PRETRAIN, provenance={"source": "unit test"}) as writer:
        for row in rows:
            writer.write(row)
    manifest = read_manifest(tmp_path)
    labels = np.concatenate([row["label"].ravel() for row in rows])
    clean = np.concatenate([row["clean_label"].ravel() for row in rows])
    assert manifest.total_rows == 4 and manifest.complete
    assert manifest.class_histogram == np.bincount(labels[labels != NODATA], minlength=9).tolist()
    assert manifest.nodata_pixels == 4
    assert manifest.clean_class_histogram == np.bincount(clean, minlength=9).tolist()
    assert manifest.provenance == {"source": "unit test"}
    assert manifest.metadata == PRETRAIN


def test_files_roll_over_at_the_target_size(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, PRETRAIN, target_bytes=1, row_group_rows=2, prefix="noisy") as writer:
        for index in range(5):
            writer.write(pretrain_row(index))
    paths = list_shards(tmp_path)
    assert [Path(p).name for p in paths] == ["noisy-00000.parquet", "noisy-00001.parquet", "noisy-00002.parquet"]
    manifest = read_manifest(tmp_path)
    assert [entry.rows for entry in manifest.files] == [2, 2, 1]
    assert [entry.bytes for entry in manifest.files] == [Path(p).stat().st_size for p in paths]
    assert [r["id"] for p in paths for r in iter_rows(p)] == [f"{i:07d}" for i in range(5)]


@pytest.mark.parametrize(
    ("field", "bad_value", "message"),
    [
        ("s2", np.zeros((4, 12, 8, 8), np.uint8), r"shape \(4, 12, 8, 8\), expected \(4, 13, 8, 8\)"),
        ("s1", np.zeros((4, 2, 8, 8), np.float32), "dtype float32, expected uint8"),
        ("label", np.full((4, 8, 8), 9, np.uint8), r"values \[9\] outside 0\.\.8"),
        ("clean_label", np.full((4, 8, 8), 200, np.uint8), r"values \[200\] outside 0\.\.8"),
        ("dates", ["2020-01-01"], "has 1 entries, the shard declares 4 seasons"),
        ("clean_label", None, "missing or not a numpy array"),
    ],
)
def test_bad_rows_are_refused_naming_id_and_field(tmp_path: Path, field: str, bad_value: Any, message: str) -> None:
    row = pretrain_row(3)
    row[field] = bad_value
    with ShardWriter(tmp_path, PRETRAIN) as writer:
        writer.write(pretrain_row(1))
        with pytest.raises(RowValidationError, match=message) as caught:
            writer.write(row)
        writer.write(pretrain_row(2))
    assert caught.value.row_id == "0000003" and caught.value.field_name == field
    assert [r["id"] for r in iter_rows(list_shards(tmp_path)[0])] == ["0000001", "0000002"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_imagery_is_refused(tmp_path: Path, bad: float) -> None:
    row = downstream_row(0)
    row["s1"][1, 3, 4] = bad
    with ShardWriter(tmp_path, DOWNSTREAM) as writer, pytest.raises(RowValidationError, match="1 NaN or infinite"):
        writer.write(row)


def test_clean_label_without_declaring_it_is_refused(tmp_path: Path) -> None:
    row = downstream_row(0)
    row["clean_label"] = row["label"]
    with ShardWriter(tmp_path, DOWNSTREAM) as writer, pytest.raises(RowValidationError, match="declares no clean"):
        writer.write(row)


def test_no_data_label_value_is_allowed(tmp_path: Path) -> None:
    row = downstream_row(0)
    row["label"][:] = NODATA
    with ShardWriter(tmp_path, DOWNSTREAM) as writer:
        writer.write(row)
    assert read_manifest(tmp_path).nodata_pixels == 64


def test_an_error_mid_write_keeps_the_rows_written_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="source failed"),
        ShardWriter(tmp_path, PRETRAIN, row_group_rows=2) as writer,
    ):
        for index in range(3):
            writer.write(pretrain_row(index))
        raise RuntimeError("source failed")
    manifest = read_manifest(tmp_path)
    assert not manifest.complete and manifest.total_rows == 3
    assert [r["id"] for r in iter_rows(list_shards(tmp_path)[0])] == ["0000000", "0000001", "0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "part-00000.parquet"]


def test_writing_into_a_shard_directory_needs_overwrite(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, PRETRAIN) as writer:
        writer.write(pretrain_row(0))
    with pytest.raises(FileExistsError, match="already holds shards"):
        ShardWriter(tmp_path, PRETRAIN)
    with ShardWriter(tmp_path, PRETRAIN, overwrite=True) as writer:
        writer.write(pretrain_row(5))
    assert [r["id"] for r in iter_rows(list_shards(tmp_path)[0])] == ["0000005"]


def test_a_closed_writer_refuses_rows(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, PRETRAIN)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(pretrain_row(0))
    assert read_manifest(tmp_path).total_rows == 0


def test_list_shards_skips_hidden_and_temporary_files(tmp_path: Path) -> None:
    for name in ("b.parquet", "a.parquet", ".part-00001.parquet.tmp", "_tmp.parquet", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in list_shards(tmp_path)] == ["a.parquet", "b.parquet"]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        list_shards(tmp_path / "missing")


def test_truncated_file_is_reported_with_its_name(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, PRETRAIN) as writer:
        writer.write(pretrain_row(0))
    path = Path(list_shards(tmp_path)[0])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardFileError, match=rf"{path.name}: not a readable Parquet file"):
        list(iter_rows(str(path)))


def test_decode_row_checks_the_byte_length() -> None:
    record = encode_row(DOWNSTREAM, downstream_row(0))
    record["s2"] = record["s2"][:-2]
    with pytest.raises(
        RowValidationError, match=r"field 's2': 1662 bytes, but shape \(13, 8, 8\) of uint16 needs 1664"
    ):
        decode_row(record, DOWNSTREAM)


@settings(max_examples=40, deadline=None)
@given(
    seasons=st.integers(1, 4),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    dtype=st.sampled_from(["uint8", "uint16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_encode_decode_is_lossless(seasons: int, height: int, width: int, dtype: str, seed: int) -> None:
    meta = ShardMetadata(
        kind="custom",
        classes=("a", "b", "c"),
        seasons=seasons,
        s1=ModalitySpec(dtype=dtype, bands=S1_BAND_NAMES, unit="dB", representation="physical"),
        s2=ModalitySpec(dtype=dtype, bands=S2_BAND_NAMES, unit="reflectance", representation="physical"),
    )
    rng = np.random.default_rng(seed)
    row = {
        "id": "x",
        "dates": [""] * seasons,
        "s1": (rng.random(meta.image_shape("s1", height, width)) * 200).astype(dtype),
        "s2": (rng.random(meta.image_shape("s2", height, width)) * 200).astype(dtype),
        "label": rng.choice(np.array([0, 1, 2, NODATA], np.uint8), meta.label_shape(height, width)),
    }
    decoded = decode_row(encode_row(meta, row), meta)
    for name in ("s1", "s2", "label"):
        assert decoded[name].shape == row[name].shape
        np.testing.assert_array_equal(decoded[name], row[name])


def test_a_failed_overwrite_keeps_the_previous_set_unchanged(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, PRETRAIN, target_bytes=1, row_group_rows=1) as writer:
        for index in range(3):
            writer.write(pretrain_row(index))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with (
        pytest.raises(RuntimeError, match="source failed"),
        ShardWriter(tmp_path, PRETRAIN, target_bytes=1, row_group_rows=1, overwrite=True) as writer,
    ):
        writer.write(pretrain_row(7))
        writer.write(pretrain_row(8))
        raise RuntimeError("source failed")
    assert writer.kept_previous
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert [r["id"] for p in list_shards(tmp_path) for r in iter_rows(p)] == ["0000000", "0000001", "0000002"]


def test_a_complete_overwrite_replaces_every_old_file(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, PRETRAIN, target_bytes=1, row_group_rows=1) as writer:
        for index in range(3):
            writer.write(pretrain_row(index))
    with ShardWriter(tmp_path, PRETRAIN, overwrite=True) as writer:
        writer.write(pretrain_row(9))
        assert len(list_shards(tmp_path)) == 3, "the old set stays readable while the new one is written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "part-00000.parquet"]
    assert read_manifest(tmp_path).total_rows == 1


def test_finished_files_keep_their_temporary_names_until_close(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, PRETRAIN, target_bytes=1, row_group_rows=1)
    writer.write(pretrain_row(0))
    writer.write(pretrain_row(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".part-00000.parquet.tmp", ".part-00001.parquet.tmp"]
    writer.close()
    assert len(list_shards(tmp_path)) == 2 and read_manifest(tmp_path).total_rows == 2


def test_leftovers_of_a_killed_write_are_removed_by_the_next_one(tmp_path: Path) -> None:
    for name in (".part-00000.parquet.tmp", ".manifest.json.tmp"):
        (tmp_path / name).write_bytes(b"half a file")
    with ShardWriter(tmp_path, PRETRAIN) as writer:
        writer.write(pretrain_row(0))
    assert writer.removed_leftovers == [".manifest.json.tmp", ".part-00000.parquet.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "part-00000.parquet"]


def write_set(directory: Path, rows: int = 4) -> Path:
    with ShardWriter(directory, DOWNSTREAM) as writer:
        for index in range(rows):
            writer.write(downstream_row(index))
    return directory


def poison(directory: Path, index: int, field: str, value: float) -> str:
    """Rewrite row ``index`` of the set's only file with one pixel of ``field`` set to ``value``,
    as a bug in a converter or a bit flip in storage would; the manifest still agrees. Returns its id."""
    [path] = list_shards(directory)
    table = pq.read_table(path)
    row = downstream_row(index)
    row[field].reshape(-1)[9] = value
    column = table.column(field).to_pylist()
    column[index] = encode_row(DOWNSTREAM, row)[field]
    index = table.schema.get_field_index(field)
    table = table.set_column(index, table.schema.field(field), pa.array(column, pa.binary()))
    pq.write_table(table, path, write_page_checksum=True)
    return str(row["id"])


@pytest.mark.parametrize(
    ("field", "value", "reason"), [("label", 9, r"values \[9\] outside 0..7"), ("s1", np.nan, "1 NaN or infinite")]
)
def test_a_bad_row_stops_the_whole_tile_reader_naming_file_and_row(
    tmp_path: Path, field: str, value: float, reason: str
) -> None:
    bad_id = poison(write_set(tmp_path), 2, field, value)
    tiles = TileSet(scan_shards(str(tmp_path)))
    with pytest.raises(ShardFileError, match=rf"part-00000.parquet: row 2: row '{bad_id}', field '{field}': {reason}"):
        list(tiles.rows())


def test_skipping_bad_rows_leaves_them_out_and_reports_each(tmp_path: Path) -> None:
    bad_id = poison(write_set(tmp_path), 1, "label", 200)
    skipped: list[str] = []
    tiles = TileSet(scan_shards(str(tmp_path)), on_bad_row="skip", skipped=skipped.extend)
    assert [row["id"] for row in tiles.rows()] == ["tile-0", "tile-2", "tile-3"]
    assert len(skipped) == 1 and f"row '{bad_id}', field 'label': values [200]" in skipped[0]
    with pytest.raises(ValueError, match="needs somewhere to count them"):
        TileSet(scan_shards(str(tmp_path)), on_bad_row="skip")


def test_iter_rows_checks_values_as_the_training_readers_do(tmp_path: Path) -> None:
    poison(write_set(tmp_path), 3, "s1", np.inf)
    [path] = list_shards(tmp_path)
    with pytest.raises(ShardFileError, match=r"row 3: row 'tile-3', field 's1': 1 NaN or infinite"):
        list(iter_rows(path))


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


def test_a_set_without_manifest_is_refused_unless_allowed(tmp_path: Path) -> None:
    (write_set(tmp_path) / MANIFEST_NAME).unlink()
    with pytest.raises(IncompleteShardsError, match=rf"{MANIFEST_NAME}: missing.*data.allow_incomplete=true"):
        scan_shards(str(tmp_path))
    assert scan_shards(str(tmp_path), allow_incomplete=True).num_rows == 4


def test_an_incomplete_set_is_refused_unless_allowed(tmp_path: Path) -> None:
    manifest = _manifest(write_set(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(IncompleteShardsError, match=r"complete: false"):
        scan_shards(str(tmp_path))
    assert scan_shards(str(tmp_path), allow_incomplete=True).num_rows == 4


def test_a_manifest_that_disagrees_with_the_files_is_refused(tmp_path: Path) -> None:
    manifest = _manifest(write_set(tmp_path))
    listed = manifest["files"][0]
    wrong = {**manifest, "files": [{**listed, "rows": 5}, {**listed, "name": "part-00001.parquet"}]}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(wrong))
    with pytest.raises(IncompleteShardsError) as info:
        scan_shards(str(tmp_path))
    assert "says part-00000.parquet has 5 rows, it has 4" in str(info.value)
    assert "lists part-00001.parquet, which is not there" in str(info.value)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(IncompleteShardsError, match=r"manifest.json: invalid manifest"):
        scan_shards(str(tmp_path))
