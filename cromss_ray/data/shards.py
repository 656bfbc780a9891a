"""Writing, listing and reading NoLDO-S12 Parquet shards (spec 9, 10; ``docs/data.md``).

A shard directory holds ``<prefix>-00000.parquet``, ``<prefix>-00001.parquet``, ... and a
``manifest.json``. Each row stores its arrays as raw little-endian bytes; the shapes follow
from the row's ``height``/``width`` and the shard metadata (:class:`ShardMetadata`).

Every row is validated when written (shape, dtype, label range, finite imagery) and again
when read (:func:`check_values`). Files are written under a temporary name in the shard
directory (``.part-00000.parquet.tmp``) and renamed into place when the whole set is
written; the manifest is written last, so a crash or a bad row never leaves a half-written
file, and a replaced set (``overwrite``) is only removed once its successor is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cromss_ray.data.schema import MANIFEST_NAME, Manifest, ShardFile, ShardMetadata, read_metadata

IMAGE_FIELDS = ("s1", "s2")
LABEL_FIELDS = ("label", "clean_label")
REQUIRED_COLUMNS = ("id", "dates", "height", "width", "s1", "s2", "label")
PARQUET_SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"
BadRowPolicy = Literal["raise", "skip"]
"""What a reader does with a row that fails :func:`check_values`: stop, or leave it out and count it."""


class RowValidationError(ValueError):
    """A row that does not match its shard's schema; names the row id and the field."""

    def __init__(self, row_id: str, field_name: str, reason: str) -> None:
        super().__init__(f"row {row_id!r}, field {field_name!r}: {reason}")
        self.row_id = row_id
        self.field_name = field_name
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        """Pickled whole, as it travels from a Ray task to the training worker and the driver."""
        return (type(self), (self.row_id, self.field_name, self.reason))


class ShardFileError(ValueError):
    """A shard file that cannot be read as a whole (corrupt, not a shard, missing columns)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickled whole, as it travels from a Ray task to the training worker and the driver."""
        return (type(self), (self.path, self.reason))


def row_fields(meta: ShardMetadata) -> tuple[str, ...]:
    """The array fields a row of ``meta`` carries, in storage order."""
    return (*IMAGE_FIELDS, "label", "clean_label") if meta.has_clean_label else (*IMAGE_FIELDS, "label")


def array_shape(meta: ShardMetadata, field_name: str, height: int, width: int) -> tuple[int, ...]:
    """Shape of one row's ``field_name`` array for a ``height`` x ``width`` row."""
    if field_name in IMAGE_FIELDS:
        return meta.image_shape(field_name, height, width)  # type: ignore[arg-type]
    return meta.label_shape(height, width)


def array_dtype(meta: ShardMetadata, field_name: str) -> np.dtype:
    """Little-endian storage dtype of ``field_name``: the declared imagery dtype, labels uint8."""
    if field_name in IMAGE_FIELDS:
        return meta.numpy_dtype(field_name)  # type: ignore[arg-type]
    return np.dtype("<u1")


def label_histogram(labels: np.ndarray) -> np.ndarray:
    """Pixel count of every value 0..255 of a uint8 label array."""
    return np.bincount(labels.reshape(-1), minlength=256)


def check_values(meta: ShardMetadata, row_id: str, field_name: str, array: np.ndarray) -> None:
    """Raise :class:`RowValidationError` for NaN or infinite float imagery, or for a label value
    outside ``0..C-1`` that is not the no-data value (spec 9, 10): what a reader must not train on."""
    if field_name in IMAGE_FIELDS:
        if array.dtype.kind == "f":
            finite = np.isfinite(array)
            if not finite.all():
                bad = finite.size - int(np.count_nonzero(finite))
                raise RowValidationError(row_id, field_name, f"{bad} NaN or infinite values")
        return
    invalid = (array >= meta.num_classes) & (array != meta.nodata)
    if invalid.any():
        raise RowValidationError(
            row_id,
            field_name,
            f"values {np.unique(array[invalid]).tolist()} outside 0..{meta.num_classes - 1} (no-data is {meta.nodata})",
        )


def validate_row(meta: ShardMetadata, row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check a row against ``meta`` (spec 9, 10) and return its label histograms.

    The row holds ``id``, ``dates`` (one per season) and the numpy arrays of
    :func:`row_fields`. Raises :class:`RowValidationError` naming the id and the field for a
    missing field, wrong shape or dtype, non-finite float imagery or a label value outside
    ``0..C-1`` that is not the no-data value. Returns ``{field: 256-bin histogram}`` for the
    label fields.
    """
    row_id = row.get("id")
    if not isinstance(row_id, str) or not row_id:
        raise RowValidationError(str(row_id), "id", "must be a non-empty string")
    dates = row.get("dates")
    if not isinstance(dates, (list, tuple)) or not all(isinstance(d, str) for d in dates):
        raise RowValidationError(row_id, "dates", "must be a list of strings")
    if len(dates) != meta.seasons:
        raise RowValidationError(
            row_id, "dates", f"has {len(dates)} entries, the shard declares {meta.seasons} seasons"
        )
    extra = [name for name in LABEL_FIELDS if name in row and name not in row_fields(meta)]
    if extra:
        raise RowValidationError(row_id, extra[0], "the shard metadata declares no clean labels")
    label = row.get("label")
    if not isinstance(label, np.ndarray) or label.ndim < 2:
        raise RowValidationError(row_id, "label", "must be a numpy array with at least 2 dimensions")
    height, width = label.shape[-2:]
    histograms: dict[str, np.ndarray] = {}
    for name in row_fields(meta):
        array = row.get(name)
        if not isinstance(array, np.ndarray):
            raise RowValidationError(row_id, name, "missing or not a numpy array")
        expected_shape = array_shape(meta, name, height, width)
        if array.shape != expected_shape:
            raise RowValidationError(row_id, name, f"shape {array.shape}, expected {expected_shape}")
        expected_dtype = array_dtype(meta, name)
        if array.dtype.newbyteorder("=") != expected_dtype.newbyteorder("="):
            raise RowValidationError(row_id, name, f"dtype {array.dtype}, expected {expected_dtype.newbyteorder('=')}")
        check_values(meta, row_id, name, array)
        if name in LABEL_FIELDS:
            histograms[name] = label_histogram(array)
    return histograms


def encode_row(meta: ShardMetadata, row: Mapping[str, Any]) -> dict[str, Any]:
    """The Parquet record of a validated row: arrays as little-endian C-order bytes."""
    height, width = row["label"].shape[-2:]
    record: dict[str, Any] = {"id": row["id"], "dates": list(row["dates"]), "height": height, "width": width}
    for name in row_fields(meta):
        record[name] = np.ascontiguousarray(row[name], dtype=array_dtype(meta, name)).tobytes()
    return record


def decode_row(row: Mapping[str, Any], meta: ShardMetadata) -> dict[str, np.ndarray]:
    """The arrays of a stored row (the inverse of the encoding; read-only views, no copy).

    ``row`` is a Parquet record with ``height``, ``width`` and the binary array fields.
    Raises :class:`RowValidationError` when a field is missing or its byte length does not
    match the shape declared by ``height``/``width`` and the metadata.
    """
    row_id = str(row.get("id"))
    height, width = int(row["height"]), int(row["width"])
    if height <= 0 or width <= 0:
        raise RowValidationError(row_id, "height/width", f"{height} x {width} is not a valid size")
    arrays: dict[str, np.ndarray] = {}
    for name in row_fields(meta):
        raw = row.get(name)
        if raw is None:
            raise RowValidationError(row_id, name, "missing")
        shape = array_shape(meta, name, height, width)
        dtype = array_dtype(meta, name)
        expected = int(np.prod(shape)) * dtype.itemsize
        if len(raw) != expected:
            raise RowValidationError(
                row_id, name, f"{len(raw)} bytes, but shape {shape} of {dtype.newbyteorder('=')} needs {expected}"
            )
        arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return arrays


def filesystem_and_path(
    uri_or_dir: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it for a local directory or a URI.

    With ``filesystem`` given (e.g. an S3 filesystem with an endpoint override, see
    ``cromss_ray.data.storage``) only the scheme is stripped from a URI; otherwise a local
    path resolves to the local filesystem and a URI to the filesystem pyarrow infers.
    """
    text = os.fspath(uri_or_dir)
    if filesystem is not None:
        return filesystem, text.split("://", 1)[1] if "://" in text else text
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    return pafs.FileSystem.from_uri(text)


def parquet_writer(sink: pa.NativeFile, schema: pa.Schema) -> pq.ParquetWriter:
    """The Parquet writer of every shard file: its compression, dictionary, checksums and statistics."""
    return pq.ParquetWriter(
        sink,
        schema,
        compression="lz4",
        use_dictionary=["id"],
        write_page_checksum=True,
        write_statistics=["id", "height", "width"],
    )


def list_shards(uri_or_dir: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Sorted paths of the shard files under a directory or URI (not recursive).

    Paths of a URI keep its scheme (``s3://bucket/prefix/part-00000.parquet``); local paths
    are absolute. Hidden and temporary files (``.name``, ``_name``) are not shards.
    """
    text = os.fspath(uri_or_dir)
    fs, base = filesystem_and_path(text, filesystem)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{text}: no such directory")
    if info.type == pafs.FileType.File:
        raise NotADirectoryError(f"{text}: expected a directory of shards, got a file")
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    names = sorted(
        entry.base_name
        for entry in entries
        if entry.type == pafs.FileType.File
        and entry.base_name.endswith(PARQUET_SUFFIX)
        and not entry.base_name.startswith((".", "_"))
    )
    prefix = text.rstrip("/") if "://" in text else base
    return [f"{prefix}/{name}" for name in names]


def is_leftover(name: str) -> bool:
    """A temporary file of a shard write that never finished (``.part-00000.parquet.tmp``)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def list_leftovers(uri_or_dir: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Names of the temporary files that killed writes left in a shard directory."""
    fs, base = filesystem_and_path(uri_or_dir, filesystem)
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    names = (entry.base_name for entry in entries if entry.type == pafs.FileType.File)
    return sorted(name for name in names if is_leftover(name))


def manifest_disagreements(manifest: Manifest, rows_per_file: Mapping[str, int]) -> list[str]:
    """How ``manifest`` disagrees with the shard files found (file name -> rows): one line each."""
    listed = {entry.name: entry.rows for entry in manifest.files}
    found: list[str] = []
    for name, rows in listed.items():
        if name not in rows_per_file:
            found.append(f"lists {name}, which is not there")
        elif rows_per_file[name] != rows:
            found.append(f"says {name} has {rows} rows, it has {rows_per_file[name]}")
    found.extend(f"does not list {name}" for name in sorted(set(rows_per_file) - set(listed)))
    return found


def read_manifest(uri_or_dir: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> Manifest:
    """The ``manifest.json`` of a shard directory or URI."""
    text = os.fspath(uri_or_dir)
    fs, base = filesystem_and_path(text, filesystem)
    path = f"{base.rstrip('/')}/{MANIFEST_NAME}"
    try:
        with fs.open_input_stream(path) as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{text}: no {MANIFEST_NAME}") from None
    try:
        return Manifest.model_validate_json(raw)
    except ValueError as exc:
        raise ValueError(f"{text}/{MANIFEST_NAME}: invalid manifest: {exc}") from None


def open_shard(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pq.ParquetFile, ShardMetadata]:
    """Open one shard file and read its metadata; raises :class:`ShardFileError` naming the file."""
    fs, inner = filesystem_and_path(path, filesystem)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(inner), page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise ShardFileError(path, f"not a readable Parquet file ({exc})") from None
    try:
        meta = read_metadata(parquet.schema_arrow, path)
    except ValueError as exc:
        raise ShardFileError(path, str(exc).removeprefix(f"{path}: ")) from None
    required = (*REQUIRED_COLUMNS, "clean_label") if meta.has_clean_label else REQUIRED_COLUMNS
    missing = [name for name in required if name not in parquet.schema_arrow.names]
    if missing:
        raise ShardFileError(path, f"missing column(s) {', '.join(missing)}")
    return parquet, meta


def iter_rows(
    path: str,
    filesystem: pafs.FileSystem | None = None,
    *,
    ids: Container[str] | None = None,
    skip: Callable[[list[str]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The decoded and checked rows of one shard file, read one row group at a time.

    Each row is ``{"id", "dates", "s1", "s2", "label"[, "clean_label"]}`` with numpy arrays.
    With ``ids``, only the rows whose id is in it (the others are not decoded). Page
    checksums are verified and every row's values are checked (:func:`check_values`).
    Raises :class:`ShardFileError` naming the file (and row) for a corrupt file or bad row;
    with ``skip``, a bad row is passed to it as a message instead, and left out.
    """
    parquet, meta = open_shard(path, filesystem)
    row_index = 0
    for group in range(parquet.num_row_groups):
        try:
            records = parquet.read_row_group(group).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise ShardFileError(path, f"row group {group} is unreadable ({exc})") from None
        for record in records:
            if ids is not None and record["id"] not in ids:
                row_index += 1
                continue
            try:
                arrays = decode_row(record, meta)
                for name, array in arrays.items():
                    check_values(meta, record["id"], name, array)
            except RowValidationError as exc:
                if skip is None:
                    raise ShardFileError(path, f"row {row_index}: {exc}") from None
                skip([f"{path}: row {row_index}: {exc}"])
                row_index += 1
                continue
            yield {"id": record["id"], "dates": list(record["dates"]), **arrays}
            row_index += 1


@dataclass
class _OpenFile:
    """The shard file being written: temporary path, Parquet writer and its running totals."""

    temp_path: Path
    final_path: Path
    sink: pa.NativeFile
    writer: pq.ParquetWriter
    rows: int = 0
    histograms: dict[str, np.ndarray] = field(default_factory=dict)


def _temp_path(final_path: Path) -> Path:
    """The name a file is written under until it is complete, in the same directory."""
    return final_path.with_name(f".{final_path.name}{TEMP_SUFFIX}")


class ShardWriter:
    """Writes validated rows into size-bounded Parquet shards plus ``manifest.json``.

    Use as a context manager; ``write(row)`` validates and buffers a row, every
    ``row_group_rows`` rows become one row group (one by default: the training order reads
    rows at random positions and a row group is the smallest unit Parquet reads, so a row
    per group reads each row once per epoch), and a file is finished once it reaches
    ``target_bytes``. Every file stays under its temporary name until :meth:`close`, which
    renames them into place and writes the manifest last. Closing because of an exception
    keeps every complete row and marks the manifest ``complete: false``, except when the
    writer replaces an existing set (``overwrite``): then the new files are discarded and
    the old set stays as it was (``kept_previous``). Leftovers of killed writes (``.*.tmp``)
    are removed on opening and named in ``removed_leftovers``. ``provenance`` is copied into
    the manifest.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        meta: ShardMetadata,
        *,
        target_bytes: int = 256 * 2**20,
        row_group_rows: int = 1,
        prefix: str = "part",
        overwrite: bool = False,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        if target_bytes <= 0 or row_group_rows <= 0:
            raise ValueError("target_bytes and row_group_rows must be positive")
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.target_bytes = target_bytes
        self.row_group_rows = row_group_rows
        self.prefix = prefix
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.manifest: Manifest | None = None
        self.kept_previous = False
        self._schema = meta.arrow_schema()
        self._pending: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
        self._open: _OpenFile | None = None
        self._finished: list[_OpenFile] = []
        self._totals = {name: np.zeros(256, dtype=np.int64) for name in row_fields(meta) if name in LABEL_FIELDS}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._previous = self._existing_set(overwrite)
        self.removed_leftovers = self._remove_leftovers()

    def _remove_leftovers(self) -> list[str]:
        leftovers = sorted(path for path in self.out_dir.iterdir() if path.is_file() and is_leftover(path.name))
        for path in leftovers:
            path.unlink()
        return [path.name for path in leftovers]

    def _existing_set(self, overwrite: bool) -> list[Path]:
        """The files of the set already in ``out_dir``: replaced on a complete close, else kept."""
        existing = sorted(
            path
            for path in self.out_dir.iterdir()
            if path.name == MANIFEST_NAME or (path.name.startswith(f"{self.prefix}-") and path.suffix == PARQUET_SUFFIX)
        )
        if existing and not overwrite:
            names = ", ".join(path.name for path in existing[:3])
            raise FileExistsError(
                f"{self.out_dir} already holds shards ({names}, ...); choose another directory or overwrite"
            )
        return existing

    @property
    def rows_written(self) -> int:
        """Rows accepted so far (including the ones still buffered)."""
        finished = sum(entry.rows for entry in self._finished)
        return finished + (self._open.rows if self._open else 0) + len(self._pending)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.manifest is None:
            self.close(complete=exc_type is None)

    def write(self, row: Mapping[str, Any]) -> None:
        """Validate and add one row; raises :class:`RowValidationError` and writes nothing if bad."""
        if self.manifest is not None:
            raise RuntimeError(f"{self.out_dir}: the shard writer is closed")
        histograms = validate_row(self.meta, row)
        self._pending.append((encode_row(self.meta, row), histograms))
        if len(self._pending) >= self.row_group_rows:
            self._flush()

    def close(self, *, complete: bool = True) -> Manifest:
        """Write the buffered rows, finish the open file, rename the files into place, then
        write ``manifest.json``; see the class docstring for an incomplete close."""
        if self.manifest is not None:
            return self.manifest
        try:
            self._flush()
            self._finish_file()
        except BaseException:
            complete = False
            raise
        finally:
            manifest = self._manifest(complete)
            if complete or not self._previous:
                self._commit(manifest)
            else:
                self._discard()
            self.manifest = manifest
        return manifest

    def _flush(self) -> None:
        if not self._pending:
            return
        records = [record for record, _ in self._pending]
        if self._open is None:
            self._open = self._start_file()
        current = self._open
        try:
            current.writer.write_table(pa.Table.from_pylist(records, schema=self._schema))
        except BaseException:
            self._abort_file()
            self._pending.clear()
            raise
        current.rows += len(records)
        for _, histograms in self._pending:
            for name, histogram in histograms.items():
                current.histograms[name] = current.histograms.get(name, 0) + histogram
        self._pending.clear()
        if current.sink.tell() >= self.target_bytes:
            self._finish_file()

    def _start_file(self) -> _OpenFile:
        final_path = self.out_dir / f"{self.prefix}-{len(self._finished):05d}{PARQUET_SUFFIX}"
        temp_path = _temp_path(final_path)
        sink = pa.OSFile(str(temp_path), "wb")
        writer = parquet_writer(sink, self._schema)
        return _OpenFile(temp_path=temp_path, final_path=final_path, sink=sink, writer=writer)

    def _finish_file(self) -> None:
        current = self._open
        if current is None:
            return
        self._open = None
        try:
            current.writer.close()
            current.sink.close()
        except BaseException:
            current.temp_path.unlink(missing_ok=True)
            raise
        self._finished.append(current)
        for name, histogram in current.histograms.items():
            self._totals[name] += histogram

    def _abort_file(self) -> None:
        current, self._open = self._open, None
        if current is None:
            return
        for closer in (current.writer.close, current.sink.close):
            with contextlib.suppress(OSError, pa.ArrowException):
                closer()
        current.temp_path.unlink(missing_ok=True)

    def _commit(self, manifest: Manifest) -> None:
        """Put the new set in place of the previous one: the old manifest goes first (a reader
        refuses a directory without one), then the files, then the new manifest."""
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        for entry in self._finished:
            os.replace(entry.temp_path, entry.final_path)
        kept = {entry.final_path for entry in self._finished}
        for path in self._previous:
            if path not in kept:
                path.unlink(missing_ok=True)
        temp_path = _temp_path(self.out_dir / MANIFEST_NAME)
        temp_path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        os.replace(temp_path, self.out_dir / MANIFEST_NAME)

    def _discard(self) -> None:
        """Drop the new files of an incomplete replacement; the previous set stays untouched."""
        self._abort_file()
        for entry in self._finished:
            entry.temp_path.unlink(missing_ok=True)
        self.kept_previous = True

    def _manifest(self, complete: bool) -> Manifest:
        classes = self.meta.num_classes
        label = self._totals["label"]
        clean = self._totals.get("clean_label")
        files = [
            ShardFile(name=entry.final_path.name, rows=entry.rows, bytes=entry.temp_path.stat().st_size)
            for entry in self._finished
        ]
        return Manifest(
            kind=self.meta.kind,
            metadata=self.meta,
            files=files,
            total_rows=sum(entry.rows for entry in files),
            class_histogram=label[:classes].tolist(),
            nodata_pixels=int(label[self.meta.nodata]),
            clean_class_histogram=None if clean is None else clean[:classes].tolist(),
            clean_nodata_pixels=None if clean is None else int(clean[self.meta.nodata]),
            complete=complete,
            provenance=self.provenance,
        )
