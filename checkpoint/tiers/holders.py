"""A read-only storage for one step of the local tier: each file read from its nearest verified holder.

Recovery hands `load_checkpoint` this storage instead of one directory: each
file name maps to its holders, nearest first (this node's own disk, read
with direct reads into the target tensors; then peers, read over HTTP through
fsspec's HTTP file system by byte range). Only the ranges a rank needs are
read, and every byte is checked against the metadata's checksums by the
ordinary loader. When a copy fails (its checksum, or it went missing), the
recovery calls `drop` and loads again: the copy is quarantined on its node
and the next holder serves that file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from planners.errors import CheckpointError


@dataclass(frozen=True, slots=True, kw_only=True)
class Holder:
    """One node's copy of a file: the node, its server URL and an open storage on the step there."""

    node: int
    url: str
    storage: Any


class HolderStorage:
    """`CheckpointStorage` reads routed per file to `holders[name][0]`; writes are not supported."""

    def __init__(self, url: str, holders: dict[str, list[Holder]]) -> None:
        self.url = url
        self._holders = {name: list(h) for name, h in holders.items()}
        self._route()

    def _route(self) -> None:
        """Direct reads into the targets only while every file is read from this node's disk.

        The loader asks a storage once whether it reads into caller buffers; over HTTP that would
        cost one request per checksum block, so a step read partly from peers uses range reads.
        """
        local = all(callable(getattr(h[0].storage, "reading", None)) for h in self._holders.values() if h)
        self.reading = self._reading if local else None

    def __repr__(self) -> str:
        return f"HolderStorage({self.url!r})"

    def current(self, name: str) -> Holder:
        """The holder `name` is read from now; `FileNotFoundError` when none is left."""
        left = self._holders.get(name)
        if not left:
            raise FileNotFoundError(f"{self.url}/{name}: no verified copy is left on any node of this job")
        return left[0]

    def drop(self, name: str) -> Holder:
        """Stop reading `name` from its current holder (it failed); returns that holder."""
        dropped = self._holders[name].pop(0)
        self._route()
        return dropped

    def copies_left(self) -> int:
        return sum(len(h) for h in self._holders.values())

    def read_bytes(self, name: str, *, max_bytes: int | None = None) -> bytes:
        return self.current(name).storage.read_bytes(name, max_bytes=max_bytes)

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        return self.current(name).storage.read_ranges(name, ranges)

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[Callable[[int, memoryview], None]]:
        """Direct reads from this node's disk (see `_route`)."""
        with self.current(name).storage.reading(name) as read_into:
            yield read_into

    def size(self, name: str) -> int:
        return self.current(name).storage.size(name)

    def exists(self, name: str) -> bool:
        return bool(self._holders.get(name))

    def list_names(self) -> list[str]:
        return sorted(n for n, h in self._holders.items() if h)

    def prepare(self) -> None:
        raise CheckpointError(f"{self.url}: the local tier's recovery view is read-only")

    def open_write(self, name: str) -> Any:
        raise CheckpointError(f"{self.url}: the local tier's recovery view is read-only")

    def publish(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        raise CheckpointError(f"{self.url}: the local tier's recovery view is read-only")

    def remove(self, names: Sequence[str]) -> None:
        raise CheckpointError(f"{self.url}: the local tier's recovery view is read-only")

    def close(self) -> None:
        for holders in self._holders.values():
            for holder in holders:
                holder.storage.close()
