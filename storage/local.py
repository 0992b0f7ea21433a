"""Local (or network-mounted) disk: fdatasync'd data, atomically renamed metadata, checked reads.

Commit rule: each shard file is written under its final name and fdatasync'd before `open_write`
returns, and its size on disk (fstat after the sync) must equal the bytes handed to it: a disk that
fills up mid-file shows up as a short or failed write() or a short file, and either one fails the write
with a `StorageError` naming the file and both sizes. The metadata is written to a temporary name,
fsync'd, then published: renamed over `metadata.json` (atomic replace on POSIX) or, when the save must
not replace a checkpoint, hard-linked to it, which fails atomically if the name exists (so of two saves
racing to one path, one commits and the other gets `FileExistsError`). The directory is fsync'd last,
which also makes the shard files' directory entries durable.
After a crash the directory holds either the old metadata or the new one, never a torn file; shard
files without metadata are an incomplete save that a load reports as such. A shard file whose
producer failed is deleted at once.

Reads trust nothing about the files they open. A file inside the checkpoint is opened without
following a symbolic link at its own name (`O_NOFOLLOW`; names never hold a separator, so the file
lies in the checkpoint directory, whose own path may go through links), except for a Hugging Face
cache snapshot, whose files are links into the repository's `blobs/`: there a link is followed only
to a file inside that repository (`links_within`). Either way the file must be a regular file:
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, cast

import torch

from planners.errors import (
    CorruptCheckpointError,
    InvalidCheckpointError,
    NotADirectoryCheckpointError,
    StorageError,
)

# Flags of every read: never follow a link at the file's name, never block on a FIFO or device.
from storage.links import READ_FLAGS as _READ_FLAGS
from storage.links import open_link_within as _open_link_within
from storage.writeback import Writeback

# One preadv call reads at most this much (Linux caps a single read near 2 GiB).
_MAX_READ_BYTES = 1 << 30
# A whole-file read asks for the size fstat saw plus this much, so it sees the end (or growth) at once.
_READ_SLACK_BYTES = 64 * 1024
# fdatasync flushes the data and the size, which is all a reader needs; fsync where it is missing.
_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def not_a_directory(where: str) -> NotADirectoryCheckpointError:
    """The error for a checkpoint path that names a file (e.g. a checkpoint's own `metadata.json`)."""
    return NotADirectoryCheckpointError(
        f"checkpoint path {where} is a file, not a directory; choose another path"
    )


def _makedirs_durably(path: str) -> list[str]:
    """Create `path` and any missing parents, fsyncing the parent of each level created.

    Every new directory's entry lives in its parent, so each level needs its parent synced, not just
    the last one, for the whole chain to survive a crash. Returns the levels this call created.
    """
    created = []
    missing = []
    head = path
    while head and not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    for level in reversed(missing):
        try:
            os.mkdir(level)
        except FileExistsError:
            if not os.path.isdir(level):
                raise
            continue  # another process made it; it syncs its own parent
        created.append(level)
        _fsync_dir(os.path.dirname(level) or ".")
    return created


def _write_all(fd: int, data: Any, *, path: str, offset: int) -> int:
    """Write all of `data` to `fd` or raise: a short write() is retried, a zero or failed one is an error.

    Returns the number of bytes written (`len(data)`); `offset` is where the file stood before, for the
    message.
    """
    view = memoryview(data).cast("B")
    total = len(view)
    done = 0
    while done < total:
        try:
            n = os.write(fd, view[done:])
        except OSError as e:
            raise StorageError(
                f"{path}: write failed after {offset + done} of {offset + total} bytes: {e.strerror or e} "
                "(disk full or over a file size limit?)"
            ) from e
        if n <= 0:
            raise StorageError(f"{path}: write() stored no bytes at {offset + done} of {offset + total}")
        done += n
    return total


class _CheckedFile:
    """A shard file being written: every write lands whole or raises; `nbytes` counts what was sent."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path
        self.nbytes = 0
        self._writeback = Writeback(fd)  # the disk writes while the rest of the file is produced

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.nbytes

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        """Nothing to flush: every write goes straight to the kernel (durability comes from `finish`)."""

    def write(self, data: Any) -> int:
        n = _write_all(self._fd, data, path=self._path, offset=self.nbytes)
        self.nbytes += n
        self._writeback.written(self.nbytes)
        return n

    def finish(self) -> None:
        """Make the data durable, then check that the file holds exactly what was sent."""
        _datasync(self._fd)
        landed = os.fstat(self._fd).st_size
        if landed != self.nbytes:
            raise StorageError(
                f"{self._path}: the file holds {landed} bytes after the sync but {self.nbytes} were written"
            )


class LocalStorage:
    """A checkpoint directory on a POSIX file system.

    `links_within`: reads follow a symbolic link at a file's name only to a regular file inside this
    directory (a Hugging Face cache repository, whose snapshot files link into its `blobs/`); None
    (a shardsafe checkpoint) follows no link.
    """

    def __init__(self, root: str, *, links_within: str | None = None) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root
        self.links_within = os.path.realpath(links_within) if links_within is not None else None
        self._created: list[str] = []  # by prepare(), outermost first

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def prepare(self) -> tuple[str, ...]:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise not_a_directory(self.root)
        if not os.path.isdir(self.root):
            self._created = _makedirs_durably(self.root)  # each new entry must survive a crash too
        return tuple(self._created)

    def remove_created_dirs(self, levels: Sequence[str] | None = None) -> None:
        """Remove the directories the save created, deepest first, each only once a listing shows it empty.

        Evidence required: the level was created by the save (`levels`, this directory or a parent) and
        `os.listdir` just found it empty; `os.rmdir` refusing a non-empty directory is a second guard,
        not the first. The first level that is not empty, or cannot be listed, stops the walk.
        """
        created = self._created if levels is None else [lv for lv in levels if self._is_root_or_above(lv)]
        for level in sorted(created, key=len, reverse=True):  # deepest first
            try:
                if os.listdir(level):
                    return  # a file someone put there keeps it, and every level above it
                os.rmdir(level)
            except OSError:
                return
        self._created = []

    def _is_root_or_above(self, level: str) -> bool:
        """Whether `level` is this directory or one of its parents (never anything beside or below it)."""
        level = os.path.abspath(level)
        return level == self.root or self.root.startswith(level.rstrip(os.sep) + os.sep)

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        path = self._path(name)
        produced = False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                f = _CheckedFile(fd, path)
                yield cast(BinaryIO, f)
                f.finish()
                produced = True
            finally:
                os.close(fd)
        finally:
            if not produced:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def publish(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        tmp = self._path(f".{name}.tmp-{secrets.token_hex(6)}")
        final = self._path(name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                f = _CheckedFile(fd, tmp)
                f.write(data)
                f.finish()
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, final)
            else:
                os.link(tmp, final)  # atomic no-replace: FileExistsError when another save got there first
        finally:  # gone after a replace; after a link (or a failure) the temporary name goes now
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
            if not os.path.islink(path):  # ELOOP (or EMLINK on some systems) from O_NOFOLLOW
                raise
            if self.links_within is None:
                raise InvalidCheckpointError(
                    f"{path}: is a symbolic link; files of a checkpoint must be regular files inside it"
                ) from None
            fd = _open_link_within(path, self.links_within)
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
            # Each read asks for about what is left (os.read allocates all it asks for), never the cap.
            chunks, total = [], 0
            while max_bytes is None or total <= max_bytes:
                want = min(_MAX_READ_BYTES, max(size - total, 0) + _READ_SLACK_BYTES)
                if max_bytes is not None:
                    want = min(want, max_bytes + 1 - total)
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

    @contextlib.contextmanager
    def reading(self, name: str) -> Iterator[Callable[[int, memoryview], None]]:
        """Read parts of file `name` straight into the caller's buffers, the file opened and checked once.

        Yields `read_into(offset, out)`, which fills all of `out` with the bytes from `offset`, so a
        load can land bytes in its target tensors without an intermediate buffer (a capability of
        local disk only; loads use `read_ranges` elsewhere).

        Raises:
            FileNotFoundError / InvalidCheckpointError: as `read_ranges` (no link, a regular file).
            CorruptCheckpointError (from `read_into`): the file ended first: truncated during the load.
        """
        fd, size = self._open_read(name)
        try:
            yield lambda offset, out: self._pread_into(fd, name, offset, out, size)
        finally:
            os.close(fd)

    def _pread(self, fd: int, name: str, offset: int, n: int) -> memoryview:
        # torch.empty: an uninitialised, writable buffer (a bytearray would be zero-filled first).
        buffer = memoryview(torch.empty(n, dtype=torch.uint8).numpy())
        self._pread_into(fd, name, offset, buffer, offset + n)
        return buffer

    def _pread_into(self, fd: int, name: str, offset: int, buffer: memoryview, size: int) -> None:
        n = len(buffer)
        if offset < 0 or offset + n > size:
            raise InvalidCheckpointError(
                f"{self._path(name)}: bytes [{offset}, {offset + n}) lie outside the file of {size} bytes; "
                "the file is truncated"
            )
        done = 0
        while done < n:
            got = os.preadv(fd, [buffer[done : done + _MAX_READ_BYTES]], offset + done)
            if got == 0:
                raise CorruptCheckpointError(
                    f"{self._path(name)}: the file ended at byte {offset + done} while bytes "
                    f"[{offset}, {offset + n}) were read; it was truncated during the load"
                )
            done += got

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
            raise NotADirectoryCheckpointError(
                f"checkpoint path {self.root} is a file, not a directory"
            ) from None

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
