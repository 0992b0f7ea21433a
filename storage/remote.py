"""Any fsspec file system (object stores, memory://, ...).

Commit rule: object stores have no rename, but a single PUT is atomic. Shard
files are complete once their upload (multipart for large ones) has
finished, which `open_write` waits for; the coordinator publishes the
metadata object with one PUT only after every rank reported its uploads
done, so a reader that sees the metadata sees complete data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from planners.errors import CheckpointError

# Part size for streamed uploads: large enough for throughput, small enough
# to keep few parts in memory (s3 needs at least 5 MiB per part).
UPLOAD_PART_BYTES = 32 * 1024 * 1024


class FsspecStorage:
    """A checkpoint directory on an fsspec file system."""

    def __init__(self, fs: Any, root: str, *, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self) -> None:
        if self.fs.isfile(self.root):
            raise CheckpointError(f"checkpoint path {self.url} is a file, not a directory; choose another path")
        with contextlib.suppress(FileExistsError):
            self.fs.makedirs(self.root, exist_ok=True)

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        with self.fs.open(self._path(name), "wb", block_size=UPLOAD_PART_BYTES) as f:
            yield f

    def publish(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        if not ranges:
            return []
        path = self._path(name)
        blobs = self.fs.cat_ranges([path] * len(ranges), [o for o, _ in ranges], [o + n for o, n in ranges], on_error="raise")
        out = []
        for (offset, n), blob in zip(ranges, blobs):
            if isinstance(blob, Exception):
                raise blob
            if len(blob) != n:
                raise CheckpointError(f"{self.url}/{name}: bytes [{offset}, {offset + n}) lie outside the file (got {len(blob)} bytes)")
            out.append(memoryview(blob))
        return out

    def size(self, name: str) -> int:
        return int(self.fs.size(self._path(name)))

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self._path(name)))

    def list_names(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(name))

    def close(self) -> None:
        pass
