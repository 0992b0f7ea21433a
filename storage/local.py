"""Local (or network-mounted) disk: fdatasync'd data, atomically renamed metadata, memory-mapped reads.

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

Reads memory-map each file once per load, so a byte range is a view into the page cache: no copy, no
read call, and only the pages a resharded load touches are ever read from disk.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, cast

from planners.errors import CheckpointError, InvalidCheckpointError, StorageError

# fdatasync flushes the data and the size, which is all a reader needs; fsync where it is missing.
_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durably(path: str) -> None:
    """Create `path` and any missing parents, fsyncing the parent of each level created.

    Every new directory's entry lives in its parent, so each level needs its parent synced, not just
    the last one, for the whole chain to survive a crash.
    """
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
        _fsync_dir(os.path.dirname(level) or ".")


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
    """A checkpoint directory on a POSIX file system."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root
        self._maps: dict[str, mmap.mmap] = {}

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
            _makedirs_durably(self.root)  # each new directory's own entry must survive a crash too

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        path = self._path(name)
        self._maps.pop(name, None)
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
        self._maps.pop(name, None)
        _fsync_dir(self.root)

    def read_bytes(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def _map(self, name: str) -> mmap.mmap | None:
        m = self._maps.get(name)
        if m is None:
            with open(self._path(name), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return None
                # ACCESS_COPY gives a writable private view, so torch.frombuffer
                # needs no copy and warns about nothing; pages are only read.
                m = self._maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return m

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        m = self._map(name)
        size = len(m) if m is not None else 0
        out = []
        for offset, n in ranges:
            if offset < 0 or n < 0 or offset + n > size:
                raise InvalidCheckpointError(
                    f"{self._path(name)}: bytes [{offset}, {offset + n}) lie outside the file of {size} bytes; "
                    "the file is truncated"
                )
            out.append(memoryview(m)[offset : offset + n] if m is not None else memoryview(b""))
        return out

    def size(self, name: str) -> int:
        return os.stat(self._path(name)).st_size

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
            self._maps.pop(name, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(name))

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for m in maps.values():
            with contextlib.suppress(BufferError):  # a caller still holds a view; GC closes it later
                m.close()
