"""Local (or network-mounted) disk: fdatasync'd data, atomically renamed metadata, checked reads.

Commit rule: each shard file is written under its final name and fdatasync'd before `open_write`
returns; the metadata is written to a temporary name, fsync'd, renamed over `metadata.json` (atomic on
POSIX) and then the directory is fsync'd, which also makes the shard files' directory entries durable.
After a crash the directory holds either the old metadata or the new one, never a torn file; shard
files without metadata are an incomplete save that a load reports as such. A shard file whose
producer failed is deleted at once.

Reads trust nothing about the files they open. A file inside the checkpoint is opened without
following a symbolic link at its own name (`O_NOFOLLOW`; names never hold a separator, so the file
lies in the checkpoint directory, whose own path may go through links) and must be a regular file:
it is opened non-blocking and checked with `fstat`, so a FIFO or a device fails at once instead of
hanging or reading forever. Byte ranges are read with `preadv` into private buffers rather than
memory-mapped: a file truncated while it is read then gives a short read, reported as corruption,
where a mapping would kill the process with SIGBUS.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import torch

from planners.errors import CheckpointError, CorruptCheckpointError, InvalidCheckpointError

# Flags of every read: never follow a link at the file's name, never block on a FIFO or device.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
# One preadv call reads at most this much (Linux caps a single read near 2 GiB).
_MAX_READ_BYTES = 1 << 30
# fdatasync flushes the data and the size, which is all a reader needs; fsync where it is missing.
_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A checkpoint directory on a POSIX file system."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def prepare(self) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise CheckpointError(
                f"checkpoint path {self.root} is a file, not a directory; choose another path"
            )
        if not os.path.isdir(self.root):
            os.makedirs(self.root, exist_ok=True)
            _fsync_dir(os.path.dirname(self.root))  # the new directory's own entry must survive a crash too

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        path = self._path(name)
        produced = False
        try:
            with open(path, "wb", buffering=0) as f:
                yield f
                _datasync(f.fileno())
                produced = True
        finally:
            if not produced:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def publish(self, name: str, data: bytes) -> None:
        tmp = self._path(f".{name}.tmp-{secrets.token_hex(6)}")
        renamed = False
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(name))
            renamed = True
        finally:
            if not renamed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        _fsync_dir(self.root)

    def _open_read(self, name: str) -> tuple[int, int]:
        """A descriptor for reading the regular file `name` inside the checkpoint, and its size.

        Raises:
            FileNotFoundError: no such file.
            InvalidCheckpointError: the name is a symbolic link, a directory, a FIFO or a device.
        """
        path = self._path(name)
        if not name or os.sep in name or name in (".", ".."):
            raise InvalidCheckpointError(f"{path}: {name!r} is not a file name inside the checkpoint")
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError:
            if os.path.islink(path):  # ELOOP (or EMLINK on some systems) from O_NOFOLLOW
                raise InvalidCheckpointError(
                    f"{path}: is a symbolic link; files of a checkpoint must be regular files inside it"
                ) from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise InvalidCheckpointError(
                f"{path}: is not a regular file (a directory, FIFO or device); the checkpoint is damaged"
            )
        return fd, info.st_size

    def read_bytes(self, name: str, *, max_bytes: int | None = None) -> bytes:
        fd, size = self._open_read(name)
        try:
            if max_bytes is not None and size > max_bytes:
                raise InvalidCheckpointError(too_large_message(self._path(name), size, max_bytes))
            # Read to the end, not to the size seen: a file that grows meanwhile still meets the cap.
            chunks, total = [], 0
            while max_bytes is None or total <= max_bytes:
                want = _MAX_READ_BYTES if max_bytes is None else min(_MAX_READ_BYTES, max_bytes + 1 - total)
                piece = os.read(fd, want)
                if not piece:
                    break
                chunks.append(piece)
                total += len(piece)
            if max_bytes is not None and total > max_bytes:
                raise InvalidCheckpointError(too_large_message(self._path(name), total, max_bytes))
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        fd, size = self._open_read(name)
        try:
            out = []
            for offset, n in ranges:
                if offset < 0 or n < 0 or offset + n > size:
                    raise InvalidCheckpointError(
                        f"{self._path(name)}: bytes [{offset}, {offset + n}) lie outside the file of {size} bytes; "
                        "the file is truncated"
                    )
                out.append(self._pread(fd, name, offset, n))
            return out
        finally:
            os.close(fd)

    def _pread(self, fd: int, name: str, offset: int, n: int) -> memoryview:
        # torch.empty: an uninitialised, writable buffer (a bytearray would be zero-filled first).
        buffer = memoryview(torch.empty(n, dtype=torch.uint8).numpy())
        done = 0
        while done < n:
            got = os.preadv(fd, [buffer[done : done + _MAX_READ_BYTES]], offset + done)
            if got == 0:
                raise CorruptCheckpointError(
                    f"{self._path(name)}: the file ended at byte {offset + done} while bytes "
                    f"[{offset}, {offset + n}) were read; it was truncated during the load"
                )
            done += got
        return buffer

    def size(self, name: str) -> int:
        fd, size = self._open_read(name)  # the same rules as a read: no link, a regular file
        os.close(fd)
        return size

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def list_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise CheckpointError(f"checkpoint path {self.root} is a file, not a directory") from None

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(name))

    def close(self) -> None:
        """Nothing to release: every read opens and closes its own descriptor."""


def too_large_message(path: str, size: int, max_bytes: int) -> str:
    """The error text for a small file (the metadata) over its size cap."""
    return (
        f"{path}: holds at least {size} bytes, over the limit of {max_bytes} bytes for this file; "
        "if the checkpoint is genuine, raise CheckpointReaderConfig.max_metadata_bytes"
    )
