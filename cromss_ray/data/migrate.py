"""Rewrite the metadata of schema-1 shards as the current schema, in place (``cromss data migrate``).

Schema 1 did not record whether a modality holds physical values or the reference's v8
codes (spec 9). Where that follows for certain (:func:`~cromss_ray.data.schema.inferred_representation`)
the shards are read as they are; otherwise they must be migrated with the representation
declared. Every file's new metadata is worked out before any file is touched, each file is
rewritten row group by row group to a temporary file and renamed over the old one, and the
manifest (metadata, schema version, file sizes) is replaced last the same way: a failure
leaves each file either old or new, never half-written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from cromss_ray.data.schema import (
    MANIFEST_NAME,
    METADATA_KEY,
    SCHEMA_VERSION,
    Representation,
    ShardMetadata,
    upgrade_metadata,
    validation_problems,
)
from cromss_ray.data.shards import list_shards, parquet_writer


@dataclass(frozen=True)
class MigrationReport:
    """What :func:`migrate_shards` did: files rewritten, files already current."""

    rewritten: list[str]
    current: list[str]


class MigrationError(RuntimeError):
    """A file could not be rewritten: the files before it are migrated, it and those after it are not."""


def _upgraded(raw: bytes | None, declared: dict[str, Representation], where: str) -> ShardMetadata | None:
    """The file's metadata as the current schema, None when it already is."""
    try:
        data = json.loads(raw) if raw is not None else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: no readable '{METADATA_KEY.decode()}' metadata: not a cromss shard set")
    if data.get("schema_version") == SCHEMA_VERSION:
        return None
    try:
        return ShardMetadata.model_validate(upgrade_metadata(data, declared))
    except ValidationError as exc:
        raise ValueError(f"{where}: {validation_problems(exc)}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _footer_metadata(path: str) -> bytes | None:
    try:
        return (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None


def _rewrite(path: str, meta: ShardMetadata) -> None:
    """Copy ``path`` row group by row group under the new metadata, then rename it over the old file."""
    source = pq.ParquetFile(path)
    schema = source.schema_arrow.with_metadata({**(source.schema_arrow.metadata or {}), METADATA_KEY: meta.to_bytes()})
    target = Path(path)
    temp = target.with_name(f".{target.name}.migrate.tmp")
    try:
        with pa.OSFile(str(temp), "wb") as sink, parquet_writer(sink, schema) as writer:
            for group in range(source.num_row_groups):
                writer.write_table(source.read_row_group(group).replace_schema_metadata(schema.metadata))
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, target)


def _rewrite_manifest(directory: Path, meta: ShardMetadata) -> None:
    manifest_path = directory / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["metadata"] = meta.model_dump(mode="json")
    for entry in manifest.get("files", []):
        shard = directory / entry["name"]
        if shard.exists():
            entry["bytes"] = shard.stat().st_size
    temp = directory / f".{MANIFEST_NAME}.migrate.tmp"
    temp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temp, manifest_path)


def migrate_shards(directory: str | os.PathLike[str], declared: dict[str, Representation]) -> MigrationReport:
    """Rewrite a local shard directory's schema-1 metadata (files and manifest) as the current schema.

    ``declared`` gives a modality's representation where schema 1 leaves it open (and
    overrides the inferred one). Errors name the file; nothing is rewritten unless every
    file's new metadata is valid.
    """
    text = os.fspath(directory)
    if "://" in text:
        raise ValueError(f"{text}: migrate rewrites local shard directories only; copy the shards locally first")
    plans = {path: _upgraded(_footer_metadata(path), declared, path) for path in list_shards(text)}
    manifest_path = Path(text) / MANIFEST_NAME
    manifest_meta = None
    if manifest_path.exists():
        try:
            manifest_raw = json.dumps(json.loads(manifest_path.read_text()).get("metadata")).encode()
        except (ValueError, AttributeError):
            raise ValueError(f"{manifest_path}: not a readable manifest") from None
        manifest_meta = _upgraded(manifest_raw, declared, str(manifest_path))
    for path, meta in plans.items():
        if meta is None:
            continue
        try:
            _rewrite(path, meta)
        except (OSError, pa.ArrowException) as exc:
            raise MigrationError(
                f"{path}: rewriting failed ({exc}); the files before it are migrated, it and the rest are unchanged: "
                "run the command again once the cause is fixed"
            ) from None
    if manifest_meta is not None:
        _rewrite_manifest(Path(text), manifest_meta)
    return MigrationReport(
        rewritten=[path for path, meta in plans.items() if meta is not None],
        current=[path for path, meta in plans.items() if meta is None],
    )
