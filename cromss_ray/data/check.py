"""Validate a shard directory row by row: ``cromss data check DIR`` (spec 9, 10).

Every file must be a readable Parquet shard with the cromss metadata (the same in all
files) and all columns; every row must decode to the declared shapes, with finite float
imagery, one date per season, a unique id and labels in ``0..C-1`` or the no-data value;
the manifest, when there is one, must list exactly the files and row counts found.
Temporary files that a killed write left behind (``.part-00000.parquet.tmp``) are reported
(the next write into the directory removes them). Each problem names the file and, for a
row, its index and id. Files are read one row group at
a time, so memory stays bounded whatever the dataset size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cromss_ray.data.schema import MANIFEST_NAME, ShardMetadata
from cromss_ray.data.shards import (
    RowValidationError,
    ShardFileError,
    decode_row,
    list_leftovers,
    list_shards,
    manifest_disagreements,
    open_shard,
    read_manifest,
    resolve_filesystem,
    validate_row,
)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the shards: the file, and the row (index and id) if any."""

    file: str
    message: str
    row: int | None = None
    row_id: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f": row {self.row}"
        if self.row_id is not None:
            where += f" (id {self.row_id})"
        return f"{where}: {self.message}"


@dataclass
class CheckReport:
    """Counts, class histograms and problems of a shard directory."""

    root: str
    skip_bad: bool
    files: int = 0
    rows: int = 0
    valid_rows: int = 0
    bad_rows: int = 0
    bad_files: int = 0
    metadata: ShardMetadata | None = None
    label_histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    clean_histogram: np.ndarray | None = None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem (or, with ``skip_bad``, every problem skipped) and at least one valid row."""
        return self.valid_rows > 0 and (self.skip_bad or not self.problems)

    def class_histogram(self, clean: bool = False) -> list[int]:
        """Pixels per class of ``label`` (or ``clean_label``) over the valid rows."""
        histogram = self.clean_histogram if clean else self.label_histogram
        if histogram is None or self.metadata is None:
            return []
        return histogram[: self.metadata.num_classes].tolist()

    def histogram_lines(self) -> list[str]:
        """A table of the class histograms, one line per class plus no-data."""
        if self.metadata is None:
            return []
        columns = [("label", self.label_histogram)]
        if self.clean_histogram is not None:
            columns.append(("clean_label", self.clean_histogram))
        total = {name: max(int(histogram.sum()), 1) for name, histogram in columns}
        header = f"{'class':<40}" + "".join(f"{name + ' pixels':>22}{'share':>8}" for name, _ in columns)
        lines = [header]
        names = [*self.metadata.classes, "(no-data)"]
        indexes = [*range(self.metadata.num_classes), self.metadata.nodata]
        for class_name, index in zip(names, indexes, strict=True):
            cells = "".join(
                f"{int(histogram[index]):>22,}{histogram[index] / total[name]:>8.1%}" for name, histogram in columns
            )
            lines.append(f"{class_name:<40}{cells}")
        return lines

    def summary_line(self) -> str:
        """The one-line verdict the command ends with."""
        verdict = "OK" if self.ok else "FAILED"
        skipped = " (skipped with --skip-bad)" if self.skip_bad and self.problems else ""
        return (
            f"check {self.root}: {self.files} files, {self.rows} rows, {self.valid_rows} valid, "
            f"{self.bad_rows} bad rows, {self.bad_files} bad files{skipped}: {verdict}"
        )


def _check_rows(
    path: str, parquet: pq.ParquetFile, meta: ShardMetadata, report: CheckReport, seen: dict[str, str]
) -> None:
    """Decode and validate every row of one open shard file, adding to ``report``."""
    row_index = 0
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        try:
            records = parquet.read_row_group(group).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            report.problems.append(Problem(path, f"row group {group} ({group_rows} rows) is unreadable: {exc}"))
            report.rows += group_rows
            report.bad_rows += group_rows
            row_index += group_rows
            continue
        for record in records:
            report.rows += 1
            row_id = record.get("id")
            try:
                arrays = decode_row(record, meta)
                histograms = validate_row(meta, {"id": row_id, "dates": record.get("dates"), **arrays})
                if row_id in seen:
                    raise RowValidationError(str(row_id), "id", f"duplicate of a row in {seen[row_id]}")
            except RowValidationError as exc:
                report.problems.append(Problem(path, f"field {exc.field_name!r}: {exc.reason}", row_index, str(row_id)))
                report.bad_rows += 1
            else:
                seen[row_id] = path
                report.valid_rows += 1
                report.label_histogram += histograms["label"]
                if report.clean_histogram is not None:
                    report.clean_histogram += histograms["clean_label"]
            row_index += 1


def _check_manifest(report: CheckReport, fs: pafs.FileSystem, root: str, rows_per_file: dict[str, int]) -> None:
    """Compare ``manifest.json`` with the files found (missing manifest: a warning)."""
    manifest_path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    try:
        manifest = read_manifest(root, fs)
    except FileNotFoundError:
        report.warnings.append(f"{manifest_path}: missing (shards are checked without it)")
        return
    except ValueError as exc:
        report.problems.append(Problem(manifest_path, str(exc).removeprefix(f"{root}/{MANIFEST_NAME}: ")))
        return
    disagreements = manifest_disagreements(manifest, rows_per_file)
    report.problems.extend(Problem(manifest_path, message) for message in disagreements)
    if report.metadata is not None and manifest.metadata != report.metadata:
        report.problems.append(Problem(manifest_path, "metadata differs from the shards' metadata"))
    if not manifest.complete:
        report.warnings.append(f"{manifest_path}: marks the shards incomplete (the writer stopped on an error)")


def check_shards(
    uri_or_dir: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    filesystem: pafs.FileSystem | None = None,
    progress: ProgressCallback | None = None,
) -> CheckReport:
    """Validate every shard and row under ``uri_or_dir`` (a directory or URI).

    ``filesystem`` overrides the one inferred from the URI (an S3-compatible store).
    Never raises for bad data: every problem goes into the report. With ``skip_bad`` the
    report is still ``ok`` when bad rows or files exist, as long as some rows are valid
    (they are what a reader skipping bad rows would use).
    """
    root = os.fspath(uri_or_dir)
    report = CheckReport(root=root, skip_bad=skip_bad)
    fs, _ = resolve_filesystem(root, filesystem)
    try:
        paths = list_shards(root, fs)
    except (FileNotFoundError, NotADirectoryError) as exc:
        report.problems.append(Problem(root, str(exc).removeprefix(f"{root}: ")))
        return report
    if not paths:
        report.problems.append(Problem(root, "no shard files (*.parquet)"))
    seen: dict[str, str] = {}
    rows_per_file: dict[str, int] = {}
    first_file = ""
    for done, path in enumerate(paths, start=1):
        report.files += 1
        try:
            parquet, meta = open_shard(path, fs)
        except ShardFileError as exc:
            report.problems.append(Problem(path, exc.reason))
            report.bad_files += 1
            continue
        rows_per_file[path.rsplit("/", 1)[-1]] = parquet.metadata.num_rows
        if report.metadata is None:
            report.metadata, first_file = meta, path
            if meta.has_clean_label:
                report.clean_histogram = np.zeros(256, dtype=np.int64)
        elif meta != report.metadata:
            report.problems.append(Problem(path, f"shard metadata differs from that of {first_file}"))
            report.bad_files += 1
            continue
        if parquet.metadata.num_rows == 0:
            report.problems.append(Problem(path, "empty shard (no rows)"))
            report.bad_files += 1
            continue
        _check_rows(path, parquet, meta, report, seen)
        if progress is not None:
            progress(done, len(paths))
    if paths:
        _check_manifest(report, fs, root, rows_per_file)
    report.warnings.extend(
        f"{root.rstrip('/')}/{name}: left by an interrupted write (the next write into this directory removes it)"
        for name in list_leftovers(root, fs)
    )
    return report
