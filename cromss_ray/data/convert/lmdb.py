"""The reference implementation's LMDB files -> pretraining shards (spec 9, 10).

Three LMDB environments (S1, S2, labels) hold, under the decimal key of a location, a
pickled ``(array bytes, shape, location id)``: S1 (T, 2, H, W), S2 (T, 13, H, W), labels
(T, H, W) uint8. The label LMDB drives the conversion; S1 and S2 entries are looked up
under the same key and must carry the same id. The array dtype follows from the byte
count per element (1: uint8 as released, the reference's v8 codes, which the network
input only divides by 255; 2: uint16 L1C x 1e-4; 4: float32, S1 in dB; the raw ones go
through the rule of spec 9). Values are unpickled by a restricted unpickler
that only rebuilds numpy scalars, never arbitrary objects.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from cromss_ray.data.convert.common import (
    ConversionSummary,
    ProgressCallback,
    Row,
    SourceError,
    SourceSample,
    convert_samples,
)
from cromss_ray.data.schema import CLASS_SCHEMES, S1_BAND_NAMES, S2_BAND_NAMES, ModalitySpec, ShardMetadata

ITEM_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.float32)}
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


class _ArrayRecordUnpickler(pickle.Unpickler):
    """Unpickles ``(bytes, shape, id)`` records; refuses any class but numpy scalars."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


@dataclass(frozen=True)
class LmdbRecord:
    """One decoded LMDB value."""

    array: np.ndarray
    location: str


def _location_name(raw_id: object) -> str:
    """The location id as the pretraining shards name it: 7 digits for integer ids."""
    if isinstance(raw_id, (int, np.integer)):
        return f"{int(raw_id):07d}"
    return str(raw_id)


def decode_record(value: bytes, where: str) -> LmdbRecord:
    """Decode a pickled ``(bytes, shape, id)`` value; errors name ``where`` (LMDB and key)."""
    try:
        payload = _ArrayRecordUnpickler(io.BytesIO(value)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise SourceError(f"{where}: not a pickled (bytes, shape, id) record ({exc})") from None
    if not (isinstance(payload, tuple) and len(payload) == 3 and isinstance(payload[0], bytes)):
        raise SourceError(f"{where}: expected a (bytes, shape, id) tuple, got {type(payload).__name__}")
    raw, shape, raw_id = payload
    try:
        shape = tuple(int(extent) for extent in shape)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: invalid shape {shape!r}") from None
    elements = int(np.prod(shape)) if shape else 0
    if elements <= 0 or len(raw) % elements:
        raise SourceError(f"{where}: {len(raw)} bytes do not fit shape {shape}")
    dtype = ITEM_DTYPES.get(len(raw) // elements)
    if dtype is None:
        raise SourceError(f"{where}: {len(raw) // elements} bytes per element is not uint8, uint16 or float32")
    return LmdbRecord(array=np.frombuffer(raw, dtype=dtype).reshape(shape), location=_location_name(raw_id))


def _modality(dtype: np.dtype, bands: tuple[str, ...], float_unit: str) -> ModalitySpec:
    """Storage spec of released uint8 data (x 1/255, spec 9), raw uint16 L1C or float32."""
    if dtype == np.uint8:
        return ModalitySpec(dtype="uint8", bands=bands, scale=1.0 / 255.0, unit="normalized", representation="v8")
    if dtype == np.uint16:
        return ModalitySpec(dtype="uint16", bands=bands, scale=1e-4, unit="reflectance", representation="physical")
    return ModalitySpec(dtype="float32", bands=bands, unit=float_unit, representation="physical")


def _open(path: Path) -> lmdb.Environment:
    if not path.exists():
        raise SourceError(f"{path}: no such LMDB")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir(), max_readers=4)
    except lmdb.Error as exc:
        raise SourceError(f"{path}: not a readable LMDB ({exc})") from None


class LmdbSources:
    """The three open LMDB environments and lookups of one location in each."""

    def __init__(self, s1: Path, s2: Path, labels: Path) -> None:
        self.paths = {"s1": s1, "s2": s2, "label": labels}
        self.envs = {name: _open(path) for name, path in self.paths.items()}

    def keys(self) -> list[bytes]:
        """Label keys in numeric order; a non-decimal key is an error naming it."""
        with self.envs["label"].begin() as txn:
            keys = [bytes(key) for key in txn.cursor().iternext(keys=True, values=False)]
        bad = [key for key in keys if not key.isdigit()]
        if bad:
            raise SourceError(f"{self.paths['label']}: key {bad[0]!r} is not a decimal location index")
        return sorted(keys, key=int)

    def record(self, name: str, key: bytes) -> LmdbRecord:
        where = f"{self.paths[name]}: key {key.decode()}"
        with self.envs[name].begin() as txn:
            value = txn.get(key)
        if value is None:
            raise SourceError(f"{where}: missing")
        return decode_record(bytes(value), where)

    def load(self, key: bytes) -> list[Row]:
        """The row of location ``key``: shapes and ids of the three records must agree."""
        records = {name: self.record(name, key) for name in self.paths}
        label = records["label"]
        if label.array.dtype != np.uint8 or label.array.ndim != 3:
            raise SourceError(
                f"{self.paths['label']}: key {key.decode()}: labels must be (T, H, W) uint8, "
                f"got {label.array.shape} {label.array.dtype}"
            )
        for name in ("s1", "s2"):
            record = records[name]
            if record.location != label.location:
                raise SourceError(
                    f"{self.paths[name]}: key {key.decode()}: id {record.location} "
                    f"does not match the label id {label.location}"
                )
        row = {"id": label.location, "dates": [""] * label.array.shape[0]}
        arrays = {"s1": records["s1"].array, "s2": records["s2"].array, "label": label.array}
        if label.array.shape[0] == 1:
            arrays = {name: array[0] for name, array in arrays.items()}
        return [{**row, **arrays}]

    def metadata(self, key: bytes) -> ShardMetadata:
        """Shard metadata from the dtypes and season count of the first location."""
        records = {name: self.record(name, key) for name in self.paths}
        return ShardMetadata(
            kind="pretrain",
            classes=CLASS_SCHEMES["pretrain"],
            seasons=records["label"].array.shape[0],
            s1=_modality(records["s1"].array.dtype, S1_BAND_NAMES, "dB"),
            s2=_modality(records["s2"].array.dtype, S2_BAND_NAMES, "reflectance"),
        )

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


def _first_metadata(sources: LmdbSources, keys: list[bytes], skip_bad: bool) -> ShardMetadata:
    """Metadata from the first location (the first readable one with ``skip_bad``)."""
    for key in keys:
        try:
            return sources.metadata(key)
        except SourceError:
            if not skip_bad:
                raise
    raise SourceError(f"{sources.paths['label']}: no readable location in the label LMDB")


def convert_lmdb(
    s1: str | os.PathLike[str],
    s2: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> ConversionSummary:
    """Convert every location of the label LMDB (with its S1 and S2 entries) to shards."""
    sources = LmdbSources(Path(s1), Path(s2), Path(labels))
    try:
        keys = sources.keys()
        meta = _first_metadata(sources, keys, skip_bad)
        samples = [
            SourceSample(where=f"{labels}: key {key.decode()}", load=lambda key=key: sources.load(key)) for key in keys
        ]
        provenance = {"source": "lmdb", "s1": str(s1), "s2": str(s2), "labels": str(labels)}
        return convert_samples(
            out_dir, meta, samples, skip_bad=skip_bad, progress=progress, overwrite=overwrite, provenance=provenance
        )
    finally:
        sources.close()
