"""Where shards live: filesystems for local paths and object stores, and validated shard sets.

``resolve_filesystem`` turns a directory, ``file://`` URI, ``s3://bucket/prefix`` or any
other pyarrow filesystem URI into a pyarrow filesystem and a path on it. ``scan_shards``
lists the shards under such a location and checks every footer (Parquet is readable, the
``cromss`` metadata is present and identical across files, the columns of the schema are
there with their types) and that ``manifest.json`` says the set is complete and lists exactly
these files and row counts, before Ray reads a single row, so bad input fails early with the
file named. ``open_shards`` hands the checked files to ``ray.data.read_parquet``, which
streams them with every page checksum verified (spec 9; ``docs/data.md`` for the schema);
``read_epoch_order`` reads them in each epoch's permutation instead (training). A
``TileSet`` reads whole rows of a shard set without Ray Data, for scoring whole tiles
(``cromss evaluate``, a transfer run's test split).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from cromss_ray.data.schema import MANIFEST_NAME, ShardMetadata, read_metadata
from cromss_ray.data.shards import (
    PARQUET_SUFFIX,
    TEMP_SUFFIX,
    BadRowPolicy,
    iter_rows,
    list_shards,
    manifest_disagreements,
    read_manifest,
)
from cromss_ray.data.transforms import UINT64_MASK

FOOTER_READ_THREADS = 16
"""Footers and id columns are fetched concurrently: on object stores each is one round trip."""
READ_BUFFER_BYTES = 8 * 2**20
READ_ATTEMPTS = 6
READ_FIRST_PAUSE_S = 0.5
"""A training read from an object store that fails with an OS-level error is tried again after
0.5, 1, 2, 4 and 8 s (about 15 s in all), so a restarting store does not fail the epoch."""
"""Buffered page reads of 8 MiB, as Ray Data's Parquet reader does when it sets the scan options itself."""


class IncompleteShardsError(ValueError):
    """A shard directory whose manifest is missing, marks it incomplete or disagrees with its files."""


def resolve_filesystem(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path on it for a directory or URI.

    ``s3://`` URIs use ``s3_endpoint`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``)
    for S3-compatible stores such as MinIO or Ceph, and the AWS credential chain of the
    process that reads (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``; otherwise the AWS config files or the instance profile).
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:
        local = parsed.path if parsed.scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise ValueError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return pafs.S3FileSystem(**_s3_options(s3_endpoint)), path
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{uri}: not a supported filesystem URI: {exc}") from None


def _s3_options(endpoint: str | None) -> dict[str, object]:
    """S3FileSystem options from the endpoint override and the region: nothing secret.

    Credentials are left to the AWS credential chain of each process that uses the
    filesystem, so the (pickled) filesystem that travels to Ray read tasks carries none:
    every worker resolves its own from its environment or instance profile when it reads,
    and temporary ones are refreshed there when they expire.
    """
    options: dict[str, object] = {}
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parsed.netloc
        options["scheme"] = parsed.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        options["region"] = region or "us-east-1"
    return options


def write_atomically(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file (``.NAME.tmp``) renamed into place.

    A write that fails half-way leaves the previous file as it was and removes its
    temporary file; readers never see a half-written file. Creates the parent folder.
    """
    parent, _, name = path.rpartition("/")
    temporary = f"{parent}/.{name}{TEMP_SUFFIX}"
    filesystem.create_dir(parent, recursive=True)
    try:
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        filesystem.move(temporary, path)
    except BaseException:
        if filesystem.get_file_info(temporary).type == pafs.FileType.File:
            filesystem.delete_file(temporary)
        raise


def display_path(filesystem: pafs.FileSystem, path: str) -> str:
    """A path as the user wrote it: ``s3://bucket/key`` for S3, the plain path otherwise."""
    return f"s3://{path}" if filesystem.type_name == "s3" else path


@dataclass(frozen=True)
class ShardSet:
    """The checked shards under one location: files in name order, their rows, their metadata."""

    uri: str
    filesystem: pafs.FileSystem
    files: tuple[str, ...]
    rows: tuple[int, ...]
    meta: ShardMetadata

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    def read_ids(self) -> list[str]:
        """Every row's location id, file by file (only the ``id`` column is fetched)."""

        def ids_of(path: str) -> list[str]:
            try:
                return pq.read_table(path, columns=["id"], filesystem=self.filesystem).column("id").to_pylist()
            except (OSError, pa.ArrowException) as exc:
                raise ValueError(f"{display_path(self.filesystem, path)}: cannot read the id column: {exc}") from None

        with ThreadPoolExecutor(FOOTER_READ_THREADS) as pool:
            return [row_id for ids in pool.map(ids_of, self.files) for row_id in ids]


@dataclass(frozen=True)
class TileSet:
    """Whole rows of a checked shard set, read directly (not through Ray Data); ``ids`` keeps only those rows.

    Downstream rows are whole tiles, so this is what scoring on whole tiles reads: the
    test shards of a transfer run, or the rows of its training shards held out for validation.
    """

    shards: ShardSet
    ids: frozenset[str] | None = None
    on_bad_row: BadRowPolicy = "raise"
    skipped: Callable[[list[str]], None] | None = None

    def __post_init__(self) -> None:
        if self.on_bad_row == "skip" and self.skipped is None:
            raise ValueError("skipping bad rows needs somewhere to count them (skipped)")

    @property
    def uri(self) -> str:
        return self.shards.uri

    @property
    def meta(self) -> ShardMetadata:
        return self.shards.meta

    def rows(self, part: int = 0, parts: int = 1) -> Iterator[dict[str, Any]]:
        """The decoded, checked rows (:func:`~cromss_ray.data.shards.iter_rows`) of files ``part``,
        ``part + parts``, ...: worker ``part`` of ``parts`` reads its share of the files, all of them
        together read every row once. A bad row raises, or with ``on_bad_row="skip"`` goes to
        ``skipped`` and is left out."""
        if not 0 <= part < parts:
            raise ValueError(f"part must lie in 0 .. {parts - 1}, got {part}")
        skip = self.skipped if self.on_bad_row == "skip" else None
        for path in self.shards.files[part::parts]:
            yield from iter_rows(path, self.shards.filesystem, ids=self.ids, skip=skip)


def _check_footer(filesystem: pafs.FileSystem, path: str) -> tuple[ShardMetadata, int]:
    """A shard's metadata and row count; a clear error naming the file when it is no shard."""
    where = display_path(filesystem, path)
    try:
        with filesystem.open_input_file(path) as handle:
            footer = pq.ParquetFile(handle).metadata
            schema = footer.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{where}: not a readable Parquet file (truncated or corrupt?): {exc}") from None
    meta = read_metadata(schema, where)
    for expected in meta.arrow_schema():
        index = schema.get_field_index(expected.name)
        if index < 0:
            raise ValueError(f"{where}: missing column '{expected.name}' ({expected.type})")
        if schema.field(index).type != expected.type:
            raise ValueError(
                f"{where}: column '{expected.name}' has type {schema.field(index).type}, expected {expected.type}"
            )
    return meta, footer.num_rows


def _check_manifest(uri: str, filesystem: pafs.FileSystem, path: str, files: list[str], rows: list[int]) -> None:
    """Refuse a shard set that its manifest does not vouch for (missing, incomplete, disagreeing)."""
    where = f"{uri.rstrip('/')}/{MANIFEST_NAME}"
    override = "set data.allow_incomplete=true to read the files found anyway"
    try:
        manifest = read_manifest(path, filesystem)
    except FileNotFoundError:
        raise IncompleteShardsError(f"{where}: missing, so the set may be incomplete; {override}") from None
    except ValueError as exc:
        raise IncompleteShardsError(f"{where}: {str(exc).split(f'{MANIFEST_NAME}: ', 1)[-1]}; {override}") from None
    if not manifest.complete:
        raise IncompleteShardsError(f"{where}: says complete: false (the writer stopped on an error); {override}")
    found = {file.rsplit("/", 1)[-1]: count for file, count in zip(files, rows, strict=True)}
    disagreements = manifest_disagreements(manifest, found)
    if disagreements:
        raise IncompleteShardsError(f"{where}: {'; '.join(disagreements)}; {override}")


def scan_shards(uri: str, s3_endpoint: str | None = None, *, allow_incomplete: bool = False) -> ShardSet:
    """List and check every shard under ``uri`` (footers only: no image bytes are read).

    Unless ``allow_incomplete``, the set's ``manifest.json`` must exist, say ``complete``
    and list exactly the files found with their row counts (:class:`IncompleteShardsError`).
    """
    filesystem, path = resolve_filesystem(uri, s3_endpoint)
    try:
        files = list_shards(path, filesystem)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such directory or object prefix") from None
    except NotADirectoryError:
        raise NotADirectoryError(f"{uri}: expected a directory of shards, got a file") from None
    if not files:
        raise FileNotFoundError(f"{uri}: no '*{PARQUET_SUFFIX}' shards found")
    with ThreadPoolExecutor(FOOTER_READ_THREADS) as pool:
        footers = list(pool.map(lambda file: _check_footer(filesystem, file), files))
    first_meta = footers[0][0]
    for file, (meta, _) in zip(files[1:], footers[1:], strict=True):
        if meta != first_meta:
            differing = sorted(
                key for key, value in meta.model_dump().items() if first_meta.model_dump()[key] != value
            )
            raise ValueError(
                f"{display_path(filesystem, file)}: shard metadata differs from "
                f"{display_path(filesystem, files[0])} in {', '.join(differing)}"
            )
    rows = [count for _, count in footers]
    if not allow_incomplete:
        _check_manifest(uri, filesystem, path, files, rows)
    return ShardSet(uri, filesystem, tuple(files), tuple(rows), first_meta)


def read_shard_set(shards: ShardSet) -> ray.data.Dataset:
    """Stream the rows of a checked shard set, with a ``path`` column naming each row's file.

    Every page's CRC checksum is verified as it is read
    (``ParquetFragmentScanOptions.page_checksum_verification``): a corrupted page fails the
    read instead of feeding altered bytes to the trainer.

    The read goes through Ray Data's first Parquet datasource, which reads the files'
    metadata once, here. The newer one (``DataContext.use_datasource_v2``, on by default
    in Ray 2.6x) lists the files and starts footer-reading actors at every execution:
    about 1 s before each epoch's first batch on a 2-CPU node, against 0.2-0.3 s
    (docs/benchmarks.md, section 2). The shards' footers were already checked by
    :func:`scan_shards`. Rows come in file order (validation, test); training reads them
    in an epoch's permutation instead (:func:`read_epoch_order`).
    """
    context = ray.data.DataContext.get_current()
    default = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(
            list(shards.files),
            filesystem=shards.filesystem,
            include_paths=True,
            partitioning=None,
            fragment_scan_options=pads.ParquetFragmentScanOptions(
                use_buffered_stream=True, buffer_size=READ_BUFFER_BYTES, page_checksum_verification=True
            ),
        )
    finally:
        context.use_datasource_v2 = default


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's training order (spec 9: i.i.d. every epoch): a uniformly random permutation
    of the shard set's row numbers (files in name order, rows in file order), a pure function
    of (seed, epoch)."""
    return np.random.default_rng([seed & UINT64_MASK, epoch]).permutation(num_rows)


@dataclass
class EpochRows:
    """Ray Data ``map_batches`` UDF: chunk numbers to the shard rows of those chunks of the epoch's order.

    Chunk ``c`` is rows ``c * chunk_rows`` up to ``(c + 1) * chunk_rows`` of
    :func:`epoch_permutation` for the epoch ``epoch_of()`` says (read once per call). Each row
    is read from its file directly: the row groups holding a chunk's rows are read once each
    (page checksums verified) and the rows taken from them in order, with the ``path`` column
    :func:`read_shard_set` adds. Up to ``open_files`` files stay open, the least recently used
    closed first.
    """

    shards: ShardSet
    seed: int
    epoch_of: Callable[[], int]
    chunk_rows: int
    open_files: int = 8

    def __post_init__(self) -> None:
        self._file_starts = np.concatenate([[0], np.cumsum(self.shards.rows)])
        self._order: tuple[int, np.ndarray] | None = None
        self._files: OrderedDict[int, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()

    @property
    def num_chunks(self) -> int:
        return -(-self.shards.num_rows // self.chunk_rows)

    def rows_of(self, chunk: int, epoch: int) -> np.ndarray:
        """The shard set's row numbers in ``chunk`` of ``epoch``'s order."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_permutation(self.shards.num_rows, self.seed, epoch))
        return self._order[1][chunk * self.chunk_rows : (chunk + 1) * self.chunk_rows]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        epoch = self.epoch_of()
        rows = np.concatenate([self.rows_of(int(chunk), epoch) for chunk in batch["id"]])
        files = np.searchsorted(self._file_starts, rows, side="right") - 1
        pieces, places = [], np.empty(len(rows), dtype=np.int64)
        for file in np.unique(files):
            wanted = np.flatnonzero(files == file)
            table = self._read_rows(int(file), rows[wanted] - self._file_starts[file])
            places[wanted] = np.arange(len(wanted)) + sum(piece.num_rows for piece in pieces)
            pieces.append(table)
        return pa.concat_tables(pieces, promote_options="permissive").take(places)

    def _read_rows(self, file: int, rows: np.ndarray) -> pa.Table:
        """``rows`` of one file, in that order, each of their row groups read once."""
        path = self.shards.files[file]
        parquet, group_starts = self._open(file)
        groups = np.searchsorted(group_starts, rows, side="right") - 1
        needed = np.unique(groups)
        try:
            groups_read = [int(group) for group in needed]
            table = retried_read(self.shards.filesystem, lambda: parquet.read_row_groups(groups_read))
        except (OSError, pa.ArrowException) as exc:
            where = display_path(self.shards.filesystem, path)
            raise ValueError(f"{where}: cannot read rows {rows.tolist()}: {exc}") from None
        read_starts = np.concatenate([[0], np.cumsum(np.diff(group_starts)[needed])])
        within = read_starts[np.searchsorted(needed, groups)] + rows - group_starts[groups]
        table = table.take(within)
        return table.append_column("path", pa.array([path] * table.num_rows, pa.string()))

    def _open(self, file: int) -> tuple[pq.ParquetFile, np.ndarray]:
        """A shard opened for reading with page checksums verified, and its row groups' first rows."""
        if file in self._files:
            self._files.move_to_end(file)
            return self._files[file]
        path = self.shards.files[file]
        try:
            parquet = retried_read(
                self.shards.filesystem,
                lambda: pq.ParquetFile(
                    self.shards.filesystem.open_input_file(path), pre_buffer=True, page_checksum_verification=True
                ),
            )
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{display_path(self.shards.filesystem, path)}: cannot open: {exc}") from None
        counts = [parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups)]
        self._files[file] = (parquet, np.concatenate([[0], np.cumsum(counts)]))
        if len(self._files) > self.open_files:
            self._files.popitem(last=False)
        return self._files[file]


Read = TypeVar("Read")


def retried_read(filesystem: pafs.FileSystem, read: Callable[[], Read]) -> Read:
    """``read()``, tried :data:`READ_ATTEMPTS` times with a doubling pause while an object store fails
    with an OS-level error (a restart, a dropped connection); on the local disk it is tried once."""
    retries = 0 if isinstance(filesystem, pafs.LocalFileSystem) else READ_ATTEMPTS - 1
    for retry in range(retries):
        try:
            return read()
        except OSError:
            time.sleep(READ_FIRST_PAUSE_S * 2**retry)
    return read()


def read_epoch_order(shards: ShardSet, seed: int, epoch_of: Callable[[], int], chunk_rows: int) -> ray.data.Dataset:
    """The rows of a checked shard set in each epoch's :func:`epoch_permutation`, with the ``path`` column.

    No all-to-all exchange: the dataset is the chunk numbers, and :class:`EpochRows` reads
    each chunk's rows from their files, so the first batch comes after one chunk's read.
    The dataset preserves the chunks' order, so an epoch's rows come out in exactly the
    permutation's order, whatever the worker count.
    """
    reader = EpochRows(shards, seed, epoch_of, chunk_rows)
    dataset = ray.data.range(reader.num_chunks).map_batches(reader, batch_format="numpy", batch_size=1)
    dataset.context.execution_options.preserve_order = True
    return dataset


def open_shards(
    uri: str, s3_endpoint: str | None = None, *, allow_incomplete: bool = False
) -> tuple[ray.data.Dataset, ShardMetadata]:
    """The rows of every shard under ``uri`` as a streaming Ray Dataset, and their metadata."""
    shards = scan_shards(uri, s3_endpoint, allow_incomplete=allow_incomplete)
    return read_shard_set(shards), shards.meta

