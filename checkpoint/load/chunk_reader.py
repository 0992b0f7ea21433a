"""Planning and running the byte-range reads of one load: which bytes of which file land in which target.

`checkpoint.load.loader` decides what a load wants (the targets, strictness, rank-local values); a
`ChunkReader` turns each wanted box into reads of the saved chunks (`planners.load_plan`), reads
them per file (several files at once), checks their block checksums before the bytes reach a
target, and copies each region into its box. Regions that can land in their target as they are go
there directly, window by window or part by part, each checked before it is copied: on local disk
through `checkpoint.load.direct_read` (one pass, checked in a cache-sized scratch window), on remote
storage through `FsspecStorage.read_ranges_into` (`storage.remote_read`: parts in flight at once).
A file's buffered regions are copied only after all its direct parts passed.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from checkpoint.load.direct_read import (
    ReadInto,
    direct_target,
    read_into_target,
    read_verified_into_target,
    scratch_buffer,
)
from checkpoint.load.grid import GridResolver
from checkpoint.load.references import follow_references
from planners.boxes import coalesce
from planners.checksums import bad_blocks, block_span
from planners.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidCheckpointError,
    MissingReferenceError,
)
from planners.load_plan import (
    LoadTarget,
    ReadItem,
    build_index,
    element_strides,
    plan_tensor_reads,
)
from planners.metadata import (
    ChunkRecord,
    Metadata,
    TensorRecord,
)
from storage.backend import CheckpointStorage

logger = logging.getLogger(__name__)

# Runs closer than this are fetched in one request: a few wasted bytes cost
# less than another round trip.
# Reads of one file closer than this are merged into one request.
COALESCE_GAP_BYTES = 64 * 1024


class ChunkReader:
    """Plans and runs the byte-range reads of one load."""

    def __init__(
        self, storage: CheckpointStorage, metadata: Metadata, *, verify: bool, io_threads: int
    ) -> None:
        self.storage = follow_references(storage, metadata)  # incremental: referenced files' own directories
        self.metadata = metadata
        self.verify = verify
        self.io_threads = io_threads
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._indexes: dict[int, Any] = {}
        self._sizes: dict[str, int] = {}
        self._grids: GridResolver | None = None

    def require_bytes(self, fqn: str, chunk: ChunkRecord) -> None:
        """Refuse a chunk its file is too short to hold, before anything is allocated for it.

        The metadata's sizes are only claims; checking them against the real
        file keeps a forged shape from sizing an allocation.
        """
        size = self._sizes.get(chunk.file)
        if size is None:
            try:
                size = self._sizes[chunk.file] = self.storage.size(chunk.file)
            except MissingReferenceError:
                raise
            except FileNotFoundError:
                raise _missing_file(self.storage.url, chunk.file, fqn) from None
        if chunk.offset_bytes + chunk.nbytes > size:
            raise InvalidCheckpointError(
                f"{self.storage.url}: file {chunk.file}, key {fqn!r}: chunk bytes [{chunk.offset_bytes}, "
                f"{chunk.offset_bytes + chunk.nbytes}) lie outside the file of {size} bytes; the file is truncated"
            )

    def plan(self, target: LoadTarget, record: TensorRecord) -> list[ReadItem]:
        if target.fqn in self.metadata.grids:  # format version 2: locate the chunks this box needs
            if self._grids is None:
                self._grids = GridResolver(self.storage, self.metadata)
            record = self._grids.record(target.fqn, target.box)
        index = self._indexes.get(id(record))
        if index is None:
            index = self._indexes[id(record)] = (record, build_index(record))
        block = self.metadata.checksum_block_bytes if self.verify else None
        return plan_tensor_reads(target, record, index[1], block_bytes=block)

    def run(self, jobs: Sequence[tuple[ReadItem, torch.Tensor]]) -> None:
        by_file: dict[str, list[tuple[ReadItem, torch.Tensor]]] = defaultdict(list)
        for item, dest in jobs:
            by_file[item.chunk.file].append((item, dest))
        if self.io_threads > 1 and len(by_file) > 1:
            with ThreadPoolExecutor(
                max_workers=min(self.io_threads, len(by_file)), thread_name_prefix="shardsafe-read"
            ) as pool:
                list(pool.map(self._run_file, by_file.items()))
        else:
            for entry in by_file.items():
                self._run_file(entry)

    def _run_file(self, entry: tuple[str, list[tuple[ReadItem, torch.Tensor]]]) -> None:
        name, jobs = entry
        direct, buffered = self._split_direct(jobs)
        pieces = self._read_buffered(name, buffered)
        if callable(getattr(self.storage, "read_ranges_into", None)):
            self._run_remote(name, direct, buffered, pieces)
            return
        with self._reading(name, direct) as read_into:
            if self.verify:  # buffered regions are in memory already: check them before anything lands
                verified: set[tuple[int, int]] = set()
                for (item, _), item_pieces in zip(buffered, pieces, strict=True):
                    self._check(name, item, item_pieces, verified)
            self._land_direct(name, direct, read_into)
            # Only after every direct window of the file passed: a corrupt file leaves these untouched.
            for (item, dest), item_pieces in zip(buffered, pieces, strict=True):
                _copy_region(item, _span_bytes(item, item_pieces), dest)

    def _split_direct(
        self, jobs: list[tuple[ReadItem, torch.Tensor]]
    ) -> tuple[list[tuple[ReadItem, memoryview]], list[tuple[ReadItem, torch.Tensor]]]:
        """The regions read straight into their targets (`checkpoint.load.direct_read`), and the others."""
        if not any(callable(getattr(self.storage, m, None)) for m in ("reading", "read_ranges_into")):
            return [], jobs  # a storage that reads only into its own buffers
        # Local windows can read whole blocks around a region and land only its bytes; remote parts land whole.
        padded = not callable(getattr(self.storage, "read_ranges_into", None))
        direct, buffered = [], []
        for item, dest in jobs:
            out = direct_target(item, dest, padded=padded)
            if out is None:
                buffered.append((item, dest))
            else:
                direct.append((item, out))
        with self._lock:
            self.bytes_read += sum(item.runs[0][1] for item, _ in direct)
        return direct, buffered

    def _run_remote(
        self,
        name: str,
        direct: list[tuple[ReadItem, memoryview]],
        buffered: list[tuple[ReadItem, torch.Tensor]],
        pieces: list[list],
    ) -> None:
        """Remote storage: each part is checked before it lands, so only verified bytes reach a target.

        Reading a remote file twice (check, then land, as on local disk) would double the traffic;
        instead a corrupt part is refused before its copy, and the buffered regions are copied only
        after every direct part of the file landed, so they never reach the target from a corrupt file.
        """
        if self.verify:
            verified: set[tuple[int, int]] = set()
            for (item, _), item_pieces in zip(buffered, pieces, strict=True):
                self._check(name, item, item_pieces, verified)
        if direct:
            self._land_remote(name, direct)
        for (item, dest), item_pieces in zip(buffered, pieces, strict=True):
            _copy_region(item, _span_bytes(item, item_pieces), dest)

    def _land_remote(self, name: str, direct: list[tuple[ReadItem, memoryview]]) -> None:
        block = self.metadata.checksum_block_bytes

        def check(index: int, start: int, data: memoryview) -> None:  # runs before the part is copied
            item = direct[index][0]
            first = (item.runs[0][0] + start) // block
            if bad := bad_blocks(data, item.chunk.checksums, block, first_block=first):
                raise self._corrupt(name, item, bad[0])

        ranges = [(item.chunk.offset_bytes + item.runs[0][0], out) for item, out in direct]
        try:
            self.storage.read_ranges_into(  # type: ignore[attr-defined]
                name, ranges, align=block if self.verify else 1, check=check if self.verify else None
            )
        except FileNotFoundError:
            raise _missing_file(self.storage.url, name, direct[0][0].fqn) from None

    def _read_buffered(self, name: str, jobs: list[tuple[ReadItem, torch.Tensor]]) -> list[list]:
        """Read the runs of `jobs` (coalesced) into buffers: per job, its ((start, n), bytes) pieces."""
        if not jobs:
            return []
        wanted = [(item.chunk.offset_bytes + s, n) for item, _ in jobs for s, n in item.runs]
        merged = coalesce(wanted, max_gap=COALESCE_GAP_BYTES)
        try:
            buffers = self.storage.read_ranges(name, merged)
        except FileNotFoundError:
            raise _missing_file(self.storage.url, name, jobs[0][0].fqn) from None
        with self._lock:  # files are read on several threads
            self.bytes_read += sum(n for _, n in merged)
        starts = [s for s, _ in merged]
        return [
            [
                (run, self._slice(merged, starts, buffers, item.chunk.offset_bytes + run[0], run[1]))
                for run in item.runs
            ]
            for item, _ in jobs
        ]

    @contextlib.contextmanager
    def _reading(self, name: str, direct: list[tuple[ReadItem, memoryview]]) -> Iterator[ReadInto | None]:
        """The file opened once for the direct reads (none: nothing is opened)."""
        if not direct:
            yield None
            return
        with contextlib.ExitStack() as stack:
            try:
                read_into = stack.enter_context(self.storage.reading(name))  # type: ignore[attr-defined]
            except FileNotFoundError:
                raise _missing_file(self.storage.url, name, direct[0][0].fqn) from None
            yield read_into

    def _land_direct(
        self, name: str, direct: list[tuple[ReadItem, memoryview]], read_into: ReadInto | None
    ) -> None:
        """Read each direct region into its target in one pass, each window checked before it lands."""
        if read_into is None:  # nothing to read directly
            return
        if not self.verify:
            for item, out in direct:
                read_into_target(read_into, item, out)
            return
        block = self.metadata.checksum_block_bytes
        scratch = scratch_buffer(direct, block)
        for item, out in direct:
            if (bad := read_verified_into_target(read_into, item, out, block, scratch)) is not None:
                raise self._corrupt(name, item, bad)

    def _corrupt(self, name: str, item: ReadItem, bad: int) -> CorruptCheckpointError:
        # Neither checksum is shown: the computed one would describe bytes that may not belong to the checkpoint.
        chunk = item.chunk
        block = self.metadata.checksum_block_bytes
        lo, hi = block_span(bad, block, offset_bytes=chunk.offset_bytes, nbytes=chunk.nbytes)
        return CorruptCheckpointError(
            f"{self.storage.url}: file {name}, key {item.fqn!r}: checksum mismatch in block "
            f"{bad} (bytes [{lo}, {hi})); the file is corrupt"
        )

    @staticmethod
    def _slice(
        merged: list[tuple[int, int]], starts: list[int], buffers: list[memoryview], offset: int, n: int
    ) -> memoryview:
        i = bisect.bisect_right(starts, offset) - 1
        base = merged[i][0]
        return buffers[i][offset - base : offset - base + n]

    def _check(self, name: str, item: ReadItem, pieces: list, verified: set[tuple[int, int]]) -> None:
        block = self.metadata.checksum_block_bytes
        chunk = item.chunk

        # `verified` holds (chunk offset, block start byte) of the blocks an earlier read of this file checked.
        def checked(index: int) -> bool:
            return (chunk.offset_bytes, index * block) in verified

        for (start, n), data in pieces:
            bad = bad_blocks(data, chunk.checksums, block, first_block=start // block, skip=checked)
            if bad:
                raise self._corrupt(name, item, bad[0])
            verified.update((chunk.offset_bytes, b) for b in range(start, start + n, block))


def _missing_file(url: str, name: str, fqn: str) -> IncompleteCheckpointError:
    return IncompleteCheckpointError(
        f"{url}: shard file {name} (key {fqn!r}) listed in the metadata is missing; the checkpoint is damaged"
    )


def _span_bytes(item: ReadItem, pieces: list[tuple[tuple[int, int], memoryview]]) -> memoryview:
    """The bytes from the region's first to its last element, without a copy when one run holds them."""
    first, end = item.span
    for (start, n), data in pieces:
        if start <= first and end <= start + n:
            return data[first - start : end - start]
    out = bytearray(end - first)
    for (start, n), data in pieces:
        lo, hi = max(start, first), min(start + n, end)
        if lo < hi:
            out[lo - first : hi - first] = data[lo - start : hi - start]
    return memoryview(out)


def _copy_region(item: ReadItem, span: memoryview, dest: torch.Tensor) -> None:
    """Copy the region (viewed in place inside `span`) into its box of `dest`."""
    src = (
        torch.frombuffer(span, dtype=torch.uint8).view(item.dtype)
        if len(span)
        else torch.empty(0, dtype=item.dtype)
    )
    src = src.as_strided(item.region.sizes, element_strides(item.chunk.box.sizes), 0)
    index = tuple(slice(o, o + n) for o, n in zip(item.dest.offsets, item.dest.sizes))
    with torch.no_grad():  # targets may be parameters that require grad; loading is not part of the graph
        dest[index].copy_(src)
