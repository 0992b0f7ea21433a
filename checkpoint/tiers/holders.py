"""A read-only storage for one step of the local tier: each file read from its nearest verified holder.

Recovery hands `load_checkpoint` this storage instead of one directory: each
file name maps to its holders, nearest first (this node's own disk, then
peers, read over HTTP through fsspec's HTTP file system by byte range). Both
read straight into the target tensors (`read_ranges_into`, the loader's path
for remote storage): a peer's parts land as they arrive, own-disk bytes pass
through one bounded scratch buffer; each part is checked against the
metadata's checksums before it lands, so only verified bytes reach a target
and a load never holds a second copy of the state. Only the ranges a rank
needs are read. When a copy fails (its checksum, or it went missing), the
recovery calls `drop` and loads again: the copy is quarantined on its node
and the next holder serves that file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from planners.errors import CheckpointError

# Bytes read from this node's disk per part (then checked, then copied into the target).
LOCAL_PART_BYTES = 16 * 1024 * 1024


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
        return self._holders[name].pop(0)

    def copies_left(self) -> int:
        return sum(len(h) for h in self._holders.values())

    def read_bytes(self, name: str, *, max_bytes: int | None = None) -> bytes:
        return self.current(name).storage.read_bytes(name, max_bytes=max_bytes)

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        return self.current(name).storage.read_ranges(name, ranges)

    def read_ranges_into(
        self,
        name: str,
        ranges: Sequence[tuple[int, memoryview]],
        *,
        align: int = 1,
        check: Callable[[int, int, memoryview], None] | None = None,
    ) -> None:
        """Fill each `(offset, out)` straight from the current holder of `name`, each part checked first.

        A peer: its storage's own `read_ranges_into` (parts in flight at once). This node's disk: parts
        of `LOCAL_PART_BYTES` (a multiple of `align`) read into one scratch buffer, passed to `check`,
        then copied into `out`: never a second copy of the target.
        """
        storage = self.current(name).storage
        if callable(getattr(storage, "read_ranges_into", None)):
            storage.read_ranges_into(name, ranges, align=align, check=check)
            return
        part = max(align, LOCAL_PART_BYTES // align * align)
        longest = max((len(out) for _, out in ranges), default=0)
        scratch = memoryview(bytearray(min(part, longest)))
        with storage.reading(name) as read_into:
            for index, (offset, out) in enumerate(ranges):
                for start in range(0, len(out), part):
                    piece = scratch[: min(part, len(out) - start)]
                    read_into(offset + start, piece)
                    if check is not None:
                        check(index, start, piece)
                    out[start : start + len(piece)] = piece

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
