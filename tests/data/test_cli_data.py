"""``cromss data synth | convert | check`` through the real command line entry point."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cromss_ray.cli import main
from cromss_ray.data.schema import SCHEMA_VERSION
from cromss_ray.data.shards import ShardFileError, iter_rows, list_shards, open_shard, read_manifest

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "ssl4eo-s12"
JUNE = "20200604T054639_20200604T054831_T43RCP"


def test_synth_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    args = [
        "data",
        "synth",
        "--out",
        str(out),
        "--locations",
        "3",
        "--size",
        "32",
        "--seed",
        "4",
        "--noise-rate",
        "0.1",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "cromss data synth: 3/3 locations" in captured.err
    assert captured.out.strip().endswith("noise rate 0.100 (target 0.100)")
    assert read_manifest(out).total_rows == 3

    assert main(["data", "check", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == f"check {out}: 1 files, 3 rows, 3 valid, 0 bad rows, 0 bad files: OK"
    assert "crops" in captured.out


def test_synth_refuses_to_overwrite_without_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "synth", "--out", str(tmp_path), "--kind", "osm", "--locations", "1", "--size", "16"]
    assert main(args) == 0
    assert main(args) == 1
    assert "already holds shards" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_check_exits_non_zero_naming_every_bad_file_and_row(
    tmp_path: Path, dw_shards: Path, write_raw_shard: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(dw_shards, shards)
    (shards / "part-00001.parquet").write_bytes(b"garbage")
    (shards / "part-00002.parquet").write_bytes(b"more garbage")
    [good_row, bad_row] = list(iter_rows(list_shards(shards)[0]))[:2]
    bad_row["label"] = bad_row["label"].copy()
    bad_row["label"][0, 0] = 77
    write_raw_shard(shards / "part-00003.parquet", read_manifest(shards).metadata, [{**good_row, "id": "new"}, bad_row])
    assert main(["data", "check", str(shards)]) == 1
    captured = capsys.readouterr()
    bad_lines = [line for line in captured.err.splitlines() if ": bad: " in line]
    assert len(bad_lines) == 4
    assert "part-00001.parquet: not a readable Parquet file" in bad_lines[0]
    assert "part-00002.parquet: not a readable Parquet file" in bad_lines[1]
    assert f"part-00003.parquet: row 1 (id {bad_row['id']}): field 'label': values [77]" in bad_lines[2]
    assert bad_lines[3].endswith("manifest.json: does not list part-00003.parquet")
    assert captured.out.splitlines()[-1].endswith("1 bad rows, 2 bad files: FAILED")
    assert main(["data", "check", str(shards), "--skip-bad"]) == 0


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="shared SSL4EO-S12 fixture not available")
def test_convert_ssl4eo_reports_skipped_ids(
    tmp_path: Path, write_tif: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    reference = FIXTURE / "s2c" / "0000200" / JUNE / "B2.tif"
    write_tif(tmp_path / "labels" / "0000200" / JUNE / "label.tif", np.ones((66, 66), np.uint8), like=reference)
    (tmp_path / "ids.csv").write_text(f"ids,sub1\n200,{JUNE}\n7,{JUNE}\n")
    base = ["data", "convert", "ssl4eo", "--images", str(FIXTURE), "--labels", str(tmp_path / "labels")]
    args = [*base, "--ids", str(tmp_path / "ids.csv"), "--out", str(tmp_path / "out")]
    assert main(args) == 1
    assert "id 0000007: missing S2 folder" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped: " in captured.err and "0000007" in captured.err
    assert captured.out.strip().endswith("skipped 1 bad samples")
    assert len(list_shards(tmp_path / "out")) == 1


def test_convert_dw_through_the_command_line(
    tmp_path: Path, write_tif: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    split = tmp_path / "dw_test"
    write_tif(split / "image_s1" / "s1_x.tif", np.zeros((2, 16, 16), np.float32))
    write_tif(split / "image_s2" / "s2_x.tif", np.zeros((13, 16, 16), np.uint16))
    write_tif(split / "label_dw" / "dw_x.tif", np.full((16, 16), 3, np.uint8))
    args = ["data", "convert", "dw", "--root", str(tmp_path), "--split", "test", "--out", str(tmp_path / "out")]
    assert main([*args, "--patch-size", "8"]) == 0
    assert "wrote 4 rows in 1 files" in capsys.readouterr().out
    assert read_manifest(tmp_path / "out").class_histogram[2] == 256


def test_data_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data"]) == 0
    assert "synth" in capsys.readouterr().out


def test_migrate_declares_what_schema_1_left_open(
    tmp_path: Path, pretrain_shards: Path, as_schema_1: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(pretrain_shards, shards)
    rows_before = [row for path in list_shards(shards) for row in iter_rows(path)]
    as_schema_1(shards, unit="", scale=1.0)  # uint8 S2 that may be physical values or v8 codes
    first = list_shards(shards)[0]
    with pytest.raises(ShardFileError, match=rf"{first}: .*s2 .*cromss data migrate DIR"):
        open_shard(first)

    files_before = {path.name: path.read_bytes() for path in shards.iterdir()}
    assert main(["data", "migrate", str(shards)]) == 1
    assert "no file was changed" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in shards.iterdir()} == files_before

    assert main(["data", "migrate", str(shards), "--s2", "v8"]) == 0
    assert capsys.readouterr().out.strip().endswith("rewrote the metadata of 2 files in " f"{shards} (0 already current)")
    assert sorted(path.name for path in shards.iterdir()) == sorted(files_before)
    meta = open_shard(first)[1]
    assert (meta.schema_version, meta.s1.representation, meta.s2.representation) == (SCHEMA_VERSION, "physical", "v8")
    manifest = read_manifest(shards)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.metadata == meta
    assert [entry.bytes for entry in manifest.files] == [Path(path).stat().st_size for path in list_shards(shards)]
    rows_after = [row for path in list_shards(shards) for row in iter_rows(path)]
    for before, after in zip(rows_before, rows_after, strict=True):
        for name in ("s1", "s2", "label", "clean_label"):
            np.testing.assert_array_equal(before[name], after[name])
    assert main(["data", "check", str(shards)]) == 0

    assert main(["data", "migrate", str(shards)]) == 0
    assert capsys.readouterr().out.strip().endswith("rewrote the metadata of 0 files in " f"{shards} (2 already current)")


def test_migrate_refuses_a_remote_uri(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "migrate", "s3://bucket/shards"]) == 1
    assert "local shard directories only" in capsys.readouterr().err


def test_migrate_names_an_unreadable_file_and_changes_nothing(
    tmp_path: Path, pretrain_shards: Path, as_schema_1: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(pretrain_shards, shards)
    as_schema_1(shards)
    (shards / "part-00002.parquet").write_bytes(b"garbage")
    files_before = {path.name: path.read_bytes() for path in shards.iterdir()}
    assert main(["data", "migrate", str(shards)]) == 1
    err = capsys.readouterr().err
    assert f"{shards / 'part-00002.parquet'}: not a readable Parquet file" in err and "no file was changed" in err
    assert {path.name: path.read_bytes() for path in shards.iterdir()} == files_before


def test_an_interrupted_migration_can_be_run_again(
    tmp_path: Path,
    pretrain_shards: Path,
    as_schema_1: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import cromss_ray.data.migrate as migrate

    shards = tmp_path / "shards"
    shutil.copytree(pretrain_shards, shards)
    as_schema_1(shards)
    first, second = list_shards(shards)
    second_before = Path(second).read_bytes()
    real_writer = migrate.parquet_writer
    calls = []

    def failing_second(sink: object, schema: object) -> object:
        calls.append(sink)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_writer(sink, schema)

    monkeypatch.setattr(migrate, "parquet_writer", failing_second)
    assert main(["data", "migrate", str(shards)]) == 1
    assert f"{second}: rewriting failed (disk full)" in capsys.readouterr().err
    assert open_shard(first)[1].schema_version == SCHEMA_VERSION
    assert Path(second).read_bytes() == second_before
    assert sorted(path.name for path in shards.iterdir()) == ["manifest.json", "part-00000.parquet", "part-00001.parquet"]

    monkeypatch.setattr(migrate, "parquet_writer", real_writer)
    assert main(["data", "migrate", str(shards)]) == 0
    assert capsys.readouterr().out.strip().endswith("rewrote the metadata of 1 files in " f"{shards} (1 already current)")
    assert read_manifest(shards).schema_version == SCHEMA_VERSION
    assert main(["data", "check", str(shards)]) == 0


def test_a_conversion_that_fails_half_way_with_overwrite_keeps_the_previous_set(
    tmp_path: Path, write_tif: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    split = tmp_path / "dw_test"
    for name in ("a", "b", "c"):
        write_tif(split / "image_s1" / f"s1_{name}.tif", np.zeros((2, 16, 16), np.float32))
        write_tif(split / "image_s2" / f"s2_{name}.tif", np.zeros((13, 16, 16), np.uint16))
        write_tif(split / "label_dw" / f"dw_{name}.tif", np.full((16, 16), 3, np.uint8))
    out = tmp_path / "out"
    args = ["data", "convert", "dw", "--root", str(tmp_path), "--split", "test", "--out", str(out), "--patch-size", "8"]
    assert main(args) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    write_tif(split / "label_dw" / "dw_b.tif", np.full((16, 16), 77, np.uint8))
    assert main([*args, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "dw_b.tif: label values [77]" in err and "the previous shards are kept unchanged" in err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert main(["data", "check", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("12 rows, 12 valid, 0 bad rows, 0 bad files: OK")


def test_check_reports_the_leftover_of_a_killed_write(
    tmp_path: Path, dw_shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(dw_shards, shards)
    (shards / ".part-00001.parquet.tmp").write_bytes(b"half a file")
    assert main(["data", "check", str(shards)]) == 0
    assert f"warning: {shards}/.part-00001.parquet.tmp: left by an interrupted write" in capsys.readouterr().err
