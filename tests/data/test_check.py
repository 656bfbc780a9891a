"""``check_shards``: every kind of bad shard is reported with its file and row."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cromss_ray.data.check import check_shards
from cromss_ray.data.schema import (
    CLASS_SCHEMES,
    MANIFEST_NAME,
    S1_BAND_NAMES,
    S2_BAND_NAMES,
    ModalitySpec,
    ShardMetadata,
)
from cromss_ray.data.shards import encode_row, list_shards, read_manifest
from cromss_ray.data.synth import synthesize

DOWNSTREAM = ShardMetadata(
    kind="dw",
    classes=CLASS_SCHEMES["dw"],
    seasons=1,
    s1=ModalitySpec(dtype="float32", bands=S1_BAND_NAMES, unit="dB", representation="physical"),
    s2=ModalitySpec(dtype="uint16", bands=S2_BAND_NAMES, scale=1e-4, unit="reflectance", representation="physical"),
)
WriteShard = Callable[..., Path]


def _row(index: int, size: int = 6) -> dict[str, object]:
    rng = np.random.default_rng(index)
    return {
        "id": f"t{index}",
        "dates": [""],
        "s1": rng.normal(-10, 2, (2, size, size)).astype(np.float32),
        "s2": rng.integers(0, 9000, (13, size, size)).astype(np.uint16),
        "label": rng.integers(0, 9, (size, size)).astype(np.uint8),
    }


@pytest.fixture
def good_copy(tmp_path: Path, dw_shards: Path) -> Path:
    target = tmp_path / "shards"
    shutil.copytree(dw_shards, target)
    return target


def test_good_shards_pass_with_the_manifest_histograms(pretrain_shards: Path) -> None:
    report = check_shards(pretrain_shards)
    manifest = read_manifest(pretrain_shards)
    assert report.ok and not report.problems and not report.warnings
    assert (report.files, report.rows, report.valid_rows) == (len(manifest.files), 12, 12)
    assert report.class_histogram() == manifest.class_histogram
    assert report.class_histogram(clean=True) == manifest.clean_class_histogram
    assert "12 valid, 0 bad rows, 0 bad files: OK" in report.summary_line()
    assert report.histogram_lines()[1].startswith("water")


def test_a_truncated_file_is_named(good_copy: Path) -> None:
    path = Path(list_shards(good_copy)[0])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = check_shards(good_copy)
    assert not report.ok and report.bad_files == 1
    assert str(report.problems[0]).startswith(f"{path}: not a readable Parquet file")


def test_garbage_bytes_are_named(good_copy: Path) -> None:
    (good_copy / "part-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    report = check_shards(good_copy)
    assert any("part-00001.parquet: not a readable Parquet file" in str(p) for p in report.problems)


def test_wrong_tensor_shape_names_file_row_and_field(tmp_path: Path, write_raw_shard: WriteShard) -> None:
    records = [encode_row(DOWNSTREAM, _row(i)) for i in range(3)]
    records[1]["s2"] = records[1]["s2"][: -6 * 6 * 2]
    path = write_raw_shard(tmp_path / "part-00000.parquet", DOWNSTREAM, records)
    report = check_shards(tmp_path)
    [problem] = report.problems
    assert (problem.file, problem.row, problem.row_id) == (str(path), 1, "t1")
    assert "field 's2'" in problem.message and "needs 936" in problem.message
    assert (report.valid_rows, report.bad_rows) == (2, 1)
    assert not report.ok


def test_a_missing_column_is_named(tmp_path: Path) -> None:
    records = [encode_row(DOWNSTREAM, _row(0))]
    table = pa.Table.from_pylist(records, schema=DOWNSTREAM.arrow_schema()).drop_columns(["label"])
    pq.write_table(table, tmp_path / "part-00000.parquet")
    report = check_shards(tmp_path)
    assert [p.message for p in report.problems] == ["missing column(s) label"]


def test_labels_outside_the_classes_are_named(tmp_path: Path, write_raw_shard: WriteShard) -> None:
    row = _row(4)
    row["label"][2, 2] = 9
    write_raw_shard(tmp_path / "part-00000.parquet", DOWNSTREAM, [_row(3), row])
    [problem] = check_shards(tmp_path).problems
    assert problem.row == 1 and problem.row_id == "t4"
    assert problem.message == "field 'label': values [9] outside 0..8 (no-data is 255)"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_imagery_is_named(tmp_path: Path, write_raw_shard: WriteShard, bad: float) -> None:
    row = _row(0)
    row["s1"][0, 1, 1] = bad
    write_raw_shard(tmp_path / "part-00000.parquet", DOWNSTREAM, [row])
    [problem] = check_shards(tmp_path).problems
    assert problem.message == "field 's1': 1 NaN or infinite values"


def test_an_empty_shard_is_named(tmp_path: Path, write_raw_shard: WriteShard) -> None:
    write_raw_shard(tmp_path / "part-00000.parquet", DOWNSTREAM, [_row(0)])
    write_raw_shard(tmp_path / "part-00001.parquet", DOWNSTREAM, [])
    report = check_shards(tmp_path)
    assert [(Path(p.file).name, p.message) for p in report.problems] == [
        ("part-00001.parquet", "empty shard (no rows)")
    ]
    assert report.warnings == [f"{tmp_path}/{MANIFEST_NAME}: missing (shards are checked without it)"]


def test_plain_parquet_without_cromss_metadata_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "x.parquet")
    [problem] = check_shards(tmp_path).problems
    assert "no 'cromss' metadata" in problem.message


def test_duplicate_ids_and_differing_metadata_are_named(tmp_path: Path, write_raw_shard: WriteShard) -> None:
    write_raw_shard(tmp_path / "a.parquet", DOWNSTREAM, [_row(0), _row(1)])
    write_raw_shard(tmp_path / "b.parquet", DOWNSTREAM, [_row(1)])
    osm = DOWNSTREAM.model_copy(update={"kind": "osm", "classes": CLASS_SCHEMES["osm"]})
    write_raw_shard(tmp_path / "c.parquet", osm, [_row(2)])
    messages = [str(problem) for problem in check_shards(tmp_path).problems]
    assert messages[0].endswith(f"b.parquet: row 0 (id t1): field 'id': duplicate of a row in {tmp_path}/a.parquet")
    assert messages[1].endswith(f"c.parquet: shard metadata differs from that of {tmp_path}/a.parquet")


def test_manifest_disagreements_are_named(good_copy: Path) -> None:
    manifest = json.loads((good_copy / MANIFEST_NAME).read_text())
    manifest["files"][0]["rows"] += 1
    manifest["files"].append({"name": "part-00009.parquet", "rows": 1, "bytes": 1})
    (good_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    messages = [problem.message for problem in check_shards(good_copy).problems]
    assert messages == [
        "says part-00000.parquet has 13 rows, it has 12",
        "lists part-00009.parquet, which is not there",
    ]


def test_skip_bad_passes_when_valid_rows_remain(tmp_path: Path, write_raw_shard: WriteShard) -> None:
    bad = _row(1)
    bad["label"][0, 0] = 42
    write_raw_shard(tmp_path / "part-00000.parquet", DOWNSTREAM, [_row(0), bad])
    report = check_shards(tmp_path, skip_bad=True)
    assert report.ok and report.bad_rows == 1 and report.valid_rows == 1
    assert "(skipped with --skip-bad): OK" in report.summary_line()


def test_a_missing_or_empty_directory_fails(tmp_path: Path) -> None:
    assert check_shards(tmp_path / "nope").problems[0].message == "no such directory"
    report = check_shards(tmp_path)
    assert not report.ok and report.problems[0].message == "no shard files (*.parquet)"


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1 (a port the OS picks), with test credentials."""
    from moto.server import ThreadedMotoServer

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_check_reads_shards_from_s3(s3_endpoint: str, dw_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import boto3

    from cromss_ray.cli import main
    from cromss_ray.data.storage import resolve_filesystem

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="noldo")
    for path in dw_shards.iterdir():
        client.upload_file(str(path), "noldo", f"dw/{path.name}")
    filesystem, _ = resolve_filesystem("s3://noldo/dw", s3_endpoint)
    report = check_shards("s3://noldo/dw", filesystem=filesystem)
    assert report.ok and report.valid_rows == 12
    assert report.class_histogram() == read_manifest(dw_shards).class_histogram
    assert main(["data", "check", "s3://noldo/dw", "--s3-endpoint", s3_endpoint]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("check s3://noldo/dw: 1 files, 12 rows, 12 valid")


def test_a_corrupted_data_page_fails_its_checksum_and_names_the_file(tmp_path: Path) -> None:
    synthesize(tmp_path, "pretrain", 4, 32, 0)
    shard = Path(list_shards(tmp_path)[0])
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 3
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    shard.write_bytes(bytes(raw))

    report = check_shards(tmp_path)

    assert not report.ok
    assert any(p.file.endswith(shard.name) and "checksum" in p.message.lower() for p in report.problems)
