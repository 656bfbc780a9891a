"""A local pyarrow filesystem whose file writes fail half-way, for tests of writes that must keep the old file.

Imported by name from the test modules (``tests/`` is on the path through its conftest).
"""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs


class WriteInterrupted(OSError):
    """Raised by :func:`interrupting_filesystem` after half of a write reached the file."""


class _HalfWriter:
    """A binary file object that writes the first half of what it is given, then fails."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise WriteInterrupted("write interrupted half-way")

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class _InterruptingHandler(pafs.FSSpecHandler):
    def open_output_stream(self, path: str, metadata: dict) -> pa.NativeFile:
        return pa.PythonFile(_HalfWriter(self.fs.open(path, mode="wb")), mode="w")


def interrupting_filesystem() -> pafs.FileSystem:
    """The local filesystem, except that every file write fails after writing half of its bytes."""
    return pafs.PyFileSystem(_InterruptingHandler(fsspec.filesystem("file")))
