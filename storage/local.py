"""Local (or network-mounted) disk: fdatasync'd data, atomically renamed metadata, memory-mapped reads.

Commit rule: each shard file is written under its final name and fdatasync'd before `open_write`
returns; the metadata is written to a temporary name, fsync'd, renamed over `metadata.json` (atomic on
POSIX) and then the directory is fsync'd, which also makes the shard files' directory entries durable.
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
from typing import BinaryIO

from planners.errors import CheckpointError, InvalidCheckpointError

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
            os.makedirs(self.root, exist_ok=True)
            _fsync_dir(os.path.dirname(self.root))  # the new directory's own entry must survive a crash too

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        path = self._path(name)
        self._maps.pop(name, None)
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
