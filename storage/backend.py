"""The storage interface and the choice of backend for a path.

Call order for a save (all in the process that writes: the trainer rank for a
sync save, the writer process for an async one): `prepare()` on the
coordinator, `open_write()` per shard file on every rank, then `publish()` of
the metadata on the coordinator, last. A load calls `read_bytes()` for the
metadata and `read_ranges()` for shard bytes, on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Protocol, runtime_checkable

import fsspec

from planners.errors import CheckpointError

# Extras that provide each object-store protocol, for the error when missing.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


@runtime_checkable
class CheckpointStorage(Protocol):
    """A checkpoint directory on some backend; names are plain file names inside it."""

    url: str

    def prepare(self) -> None:
        """Create the directory if needed; fail if the path is a file."""

    def open_write(self, name: str) -> AbstractContextManager[BinaryIO]:
        """A stream for one shard file; its bytes are durable once the context exits cleanly."""

    def publish(self, name: str, data: bytes) -> None:
        """Write a small file atomically and durably: readers see all of it or none."""

    def read_bytes(self, name: str) -> bytes:
        """A whole (small) file; `FileNotFoundError` if absent."""

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """The bytes `[offset, offset + nbytes)` for each `(offset, nbytes)` of `ranges`."""

    def size(self, name: str) -> int:
        """Size of a file in bytes; `FileNotFoundError` if absent."""

    def exists(self, name: str) -> bool:
        """Whether a file exists."""

    def list_names(self) -> list[str]:
        """Names of the files in the directory (empty if it does not exist)."""

    def remove(self, names: Sequence[str]) -> None:
        """Delete files; absent ones are ignored."""

    def close(self) -> None:
        """Release open handles (memory maps, connections)."""


def open_storage(path: str, *, storage_options: Mapping[str, Any] | None = None) -> CheckpointStorage:
    """The storage for a plain local path or any fsspec URL.

    Raises:
        CheckpointError: the URL's protocol needs a package that is not installed.
    """
    from storage.local import LocalStorage
    from storage.remote import FsspecStorage

    if "://" not in path:
        return LocalStorage(path)
    protocol = path.split("://", 1)[0]
    if protocol == "file":
        return LocalStorage(path.removeprefix("file://"))
    try:
        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    except ImportError as e:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'shardsafe[{extra}]'" if extra else f"install the fsspec implementation for {protocol}://"
        raise CheckpointError(f"cannot open {path}: the {protocol}:// backend is not installed ({e}); {hint}") from e
    except ValueError as e:
        raise CheckpointError(f"cannot open {path}: {e}") from e
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return LocalStorage(root)
    return FsspecStorage(fs, root, url=path)
