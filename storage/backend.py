"""The storage interface and the choice of backend for a path.

A checkpoint path is a plain local path, a `file://` URL, or any fsspec URL (`memory://`, `s3://`,
`gs://`, `az://`, chained URLs, ...). Local paths get `LocalStorage` (fsync, atomic rename, checked reads);
everything else `FsspecStorage` (multipart streaming on S3, concurrent ranged reads, retries). fsspec
storage options (endpoint, region, credentials) come from `CheckpointerConfig.storage_options`; they
are handed to fsspec and to nothing else, and their credential values are scrubbed from any error
text shardsafe shows.

Call order for a save (all in the process that writes: the trainer rank for a sync save, the writer
process for an async one): `prepare()` on the coordinator, `open_write()` per shard file on every
rank, then `publish()` of the metadata on the coordinator, last. When the save fails instead, every
rank `remove()`s the shard files it wrote, then the coordinator calls `remove_created_dirs()`. A load calls `read_bytes()` for the
metadata and `read_ranges()` for shard bytes, on every rank (regions that land in their target
tensors as they are go through `LocalStorage.reading()` or `FsspecStorage.read_ranges_into()`);
cleanup calls `list_names()` and `remove()` on the coordinator. Every implementation passes `tests/test_storage_conformance.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Protocol, runtime_checkable

from storage.remote import TransferConfig
from storage.spec import StorageSpec


@runtime_checkable
class CheckpointStorage(Protocol):
    """A checkpoint directory on some backend; names are plain file names inside it."""

    url: str  # for messages: never holds credentials

    def prepare(self) -> tuple[str, ...]:
        """Create the directory if needed; fail if the path is a file or its bucket does not exist.

        Remembers the directories it created, for `remove_created_dirs`, and returns them (empty on
        object stores), so that another process can remove them after a failed save.
        """

    def remove_created_dirs(self, levels: Sequence[str] | None = None) -> None:
        """Remove the directories `prepare()` created, deepest first, each only while it is empty.

        `levels`: what an earlier `prepare()` (perhaps of another instance, in another process)
        returned; None means what this instance's `prepare()` created. Only this directory and its
        parents are ever removed. A failed save calls it on the coordinator once every rank has
        deleted its shard files, so it leaves no directory behind; a directory that existed before
        is never touched. Nothing to do on object stores.

        Evidence required for each level: it was created by the save, and a listing just before
        the removal found it empty (never left to `rmdir`, which is recursive on some file systems);
        a listing that fails keeps it.
        """

    def open_write(self, name: str) -> AbstractContextManager[BinaryIO]:
        """A stream for one shard file; the file exists, whole and durable, once the context exits cleanly.

        Every `write()` stores all its bytes or raises, and on exit the size that landed (fstat after the
        sync, or the stored object's size) is compared with the bytes written: a mismatch raises
        `StorageError` naming the file and both sizes.

        When the body of the `with` raises, nothing is left under `name` (best effort).
        """

    def publish(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        """Write a small file atomically and durably: readers see all of it or none.

        With `overwrite=False` the write must not replace an existing file: it raises
        `FileExistsError` instead, atomically where the backend can (local: `link()`; S3: a
        conditional `If-None-Match: *` PUT) and by a check just before the write elsewhere.
        """

    def read_bytes(self, name: str, *, max_bytes: int | None = None) -> bytes:
        """A whole (small) file; `FileNotFoundError` if absent.

        Raises:
            InvalidCheckpointError: the file holds more than `max_bytes` (checked before it is read),
                or (local disk) is a symbolic link or not a regular file.
        """

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """The bytes `[offset, offset + nbytes)` for each `(offset, nbytes)` of `ranges`.

        The views are writable (private to the caller), so tensors can be built on them without a copy.

        Raises:
            InvalidCheckpointError: a range reaches past the end of the file.
        """

    def size(self, name: str) -> int:
        """Size of a file in bytes; `FileNotFoundError` if absent."""

    def exists(self, name: str) -> bool:
        """Whether a file exists."""

    def list_names(self) -> list[str]:
        """Names of the files in the directory (empty if it does not exist)."""

    def remove(self, names: Sequence[str]) -> None:
        """Delete files; absent ones are ignored.

        A primitive: the caller holds the evidence that each name is garbage (a name carrying its own
        save's id after a verdict, or another save's file after its own metadata was read back), as
        the README's integrity section lists.
        """

    def close(self) -> None:
        """Release open handles (memory maps, connections)."""


def open_storage(
    path: str, *, storage_options: Mapping[str, Any] | None = None, transfer: TransferConfig | None = None
) -> CheckpointStorage:
    """The storage for a plain local path or any fsspec URL.

    Args:
        path: the checkpoint directory: a local path, `file://...`, or an fsspec URL.
        storage_options: keyword arguments for the fsspec file system, e.g. for S3
            `{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ..., "region_name": ...}}`.
            Ignored for local paths.
        transfer: part sizes, concurrency and retries of remote transfers (defaults suit most stores).

    Raises:
        CheckpointError: the URL's protocol is unknown, or needs a package that is not installed
            (the message names the extra to install, e.g. `shardsafe[s3]`).

    Example:
        >>> storage = open_storage("s3://bucket/run/step-100", storage_options={"anon": False})
        >>> storage.url
        's3://bucket/run/step-100'
    """
    return StorageSpec.resolve(path, storage_options=storage_options, transfer=transfer).open()
