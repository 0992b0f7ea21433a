"""Local (or network-mounted) disk: fsync'd data, atomic metadata, mmap reads.

Commit rule: shard files are fsync'd when closed; the metadata goes to a
temporary name, is fsync'd, renamed over its final name (atomic on POSIX)
and the directory is fsync'd, so after a crash either the old metadata or
the new one is on disk, never a torn file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from planners.errors import CheckpointError


class LocalStorage:
    """A checkpoint directory on a POSIX file system."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = self.root
        self._maps: dict[str, mmap.mmap] = {}

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def prepare(self) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise CheckpointError(f"checkpoint path {self.root} is a file, not a directory; choose another path")
        os.makedirs(self.root, exist_ok=True)

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        with open(self._path(name), "wb", buffering=0) as f:
            yield f
            os.fsync(f.fileno())

    def publish(self, name: str, data: bytes) -> None:
        tmp = self._path(f".{name}.tmp-{secrets.token_hex(6)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(name))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
                raise CheckpointError(f"{self._path(name)}: bytes [{offset}, {offset + n}) lie outside the file of {size} bytes")
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
