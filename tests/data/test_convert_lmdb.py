"""The reference LMDB files -> pretraining shards, on real LMDB environments (spec 9, 10)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest

from cromss_ray.data.convert.common import SourceError
from cromss_ray.data.convert.lmdb import convert_lmdb, decode_record
from cromss_ray.data.shards import iter_rows, list_shards, read_manifest

SIZE = 12


def _arrays(location: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(location)
    return {
        "s1": rng.integers(0, 256, (4, 2, SIZE, SIZE), dtype=np.uint8),
        "s2": rng.integers(0, 256, (4, 13, SIZE, SIZE), dtype=np.uint8),
        "label": rng.integers(0, 9, (4, SIZE, SIZE), dtype=np.uint8),
    }


def _write_lmdb(path: Path, entries: dict[str, bytes]) -> Path:
    env = lmdb.open(str(path), map_size=2**26)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key.encode(), value)
    env.close()
    return path


def _record(array: np.ndarray, location: object) -> bytes:
    return pickle.dumps((array.tobytes(), array.shape, location))


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """Three LMDBs keyed '0'..'2' for locations 5, 17, 230; ids as the reference pickles them."""
    locations = {"0": np.int64(5), "1": 17, "2": np.int64(230)}
    paths = {}
    for name in ("s1", "s2", "label"):
        entries = {key: _record(_arrays(int(location))[name], location) for key, location in locations.items()}
        paths[name] = _write_lmdb(tmp_path / f"{name}.lmdb", entries)
    return paths


def test_locations_convert_with_the_released_uint8_scaling(tmp_path: Path, sources: dict[str, Path]) -> None:
    summary = convert_lmdb(sources["s1"], sources["s2"], sources["label"], tmp_path / "out")
    rows = list(iter_rows(list_shards(tmp_path / "out")[0]))
    assert [row["id"] for row in rows] == ["0000005", "0000017", "0000230"]
    for row, location in zip(rows, (5, 17, 230), strict=True):
        for name, array in _arrays(location).items():
            np.testing.assert_array_equal(row[name], array)
        assert row["dates"] == ["", "", "", ""]
    meta = read_manifest(tmp_path / "out").metadata
    assert meta.s2.dtype == "uint8" and meta.s2.scale == pytest.approx(1 / 255) and meta.s2.unit == "normalized"
    assert meta.s2.representation == "v8", "the released uint8 images are the reference's v8 codes"
    assert meta.seasons == 4 and not meta.has_clean_label
    assert summary.manifest.total_rows == 3


def test_keys_are_read_in_numeric_order(tmp_path: Path) -> None:
    paths = {}
    for name in ("s1", "s2", "label"):
        entries = {str(key): _record(_arrays(key)[name], key) for key in (10, 2, 1)}
        paths[name] = _write_lmdb(tmp_path / f"{name}.lmdb", entries)
    convert_lmdb(paths["s1"], paths["s2"], paths["label"], tmp_path / "out")
    assert [row["id"] for row in iter_rows(list_shards(tmp_path / "out")[0])] == ["0000001", "0000002", "0000010"]


def test_raw_uint16_and_float32_records_declare_their_units(tmp_path: Path) -> None:
    s1 = np.full((4, 2, SIZE, SIZE), -12.5, np.float32)
    s2 = np.full((4, 13, SIZE, SIZE), 1234, np.uint16)
    label = np.zeros((4, SIZE, SIZE), np.uint8)
    paths = {
        name: _write_lmdb(tmp_path / f"{name}.lmdb", {"0": _record(array, 3)})
        for name, array in (("s1", s1), ("s2", s2), ("label", label))
    }
    convert_lmdb(paths["s1"], paths["s2"], paths["label"], tmp_path / "out")
    meta = read_manifest(tmp_path / "out").metadata
    assert (meta.s1.dtype, meta.s1.unit, meta.s2.dtype, meta.s2.scale) == ("float32", "dB", "uint16", 1e-4)
    assert meta.s1.representation == meta.s2.representation == "physical"
    [row] = list(iter_rows(list_shards(tmp_path / "out")[0]))
    np.testing.assert_array_equal(row["s1"], s1)


def test_mismatched_ids_are_an_error_naming_key_and_ids(tmp_path: Path, sources: dict[str, Path]) -> None:
    env = lmdb.open(str(sources["s2"]), map_size=2**26)
    with env.begin(write=True) as txn:
        txn.put(b"1", _record(_arrays(17)["s2"], 18))
    env.close()
    with pytest.raises(SourceError, match=r"s2\.lmdb: key 1: id 0000018 does not match the label id 0000017"):
        convert_lmdb(sources["s1"], sources["s2"], sources["label"], tmp_path / "out")
    assert read_manifest(tmp_path / "out").total_rows == 1
    summary = convert_lmdb(sources["s1"], sources["s2"], sources["label"], tmp_path / "skip", skip_bad=True)
    assert [row["id"] for row in iter_rows(list_shards(tmp_path / "skip")[0])] == ["0000005", "0000230"]
    assert len(summary.skipped) == 1 and "key 1" in summary.skipped[0]


def test_label_values_outside_the_classes_are_refused(tmp_path: Path, sources: dict[str, Path]) -> None:
    labels = _arrays(230)["label"]
    labels[2, 0, 0] = 9
    env = lmdb.open(str(sources["label"]), map_size=2**26)
    with env.begin(write=True) as txn:
        txn.put(b"2", _record(labels, np.int64(230)))
    env.close()
    with pytest.raises(
        SourceError, match=r"label\.lmdb: key 2: row '0000230', field 'label': values \[9\] outside 0\.\.8"
    ):
        convert_lmdb(sources["s1"], sources["s2"], sources["label"], tmp_path / "out")


def test_missing_entries_are_named(tmp_path: Path, sources: dict[str, Path]) -> None:
    env = lmdb.open(str(sources["s1"]), map_size=2**26)
    with env.begin(write=True) as txn:
        txn.delete(b"2")
    env.close()
    with pytest.raises(SourceError, match=r"s1\.lmdb: key 2: missing"):
        convert_lmdb(sources["s1"], sources["s2"], sources["label"], tmp_path / "out")


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_pickles_that_would_run_code_are_refused() -> None:
    with pytest.raises(SourceError, match="refusing to unpickle"):
        decode_record(pickle.dumps((b"\x00", (1,), _Exploit())), "x.lmdb: key 0")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (pickle.dumps((b"\x00" * 3, (2,), 1)), r"3 bytes do not fit shape \(2,\)"),
        (pickle.dumps((b"\x00" * 24, (3,), 1)), "8 bytes per element"),
        (pickle.dumps([b"", (0,), 1]), "expected a \\(bytes, shape, id\\) tuple"),
        (b"not a pickle", "not a pickled"),
    ],
)
def test_malformed_records_are_named(value: bytes, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        decode_record(value, "x.lmdb: key 0")


def test_a_missing_lmdb_is_named(tmp_path: Path, sources: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match=r"nowhere\.lmdb: no such LMDB"):
        convert_lmdb(tmp_path / "nowhere.lmdb", sources["s2"], sources["label"], tmp_path / "out")
