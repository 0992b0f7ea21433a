"""The load path: read the metadata, plan this rank's reads, fetch, verify, copy.

Loading needs no collective: every rank reads the (small) metadata, plans
the reads its own target needs (planners.load_plan) and fetches only those
byte ranges, several files at once. Every block read from a file is
verified against its checksum before anything from that file is copied into
the target, so a corrupt chunk never reaches it. Nothing is allocated from
sizes the metadata claims until the files are known to hold those bytes.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from checkpoint.flatten import FlatStateDict, fill_target, flatten_state_dict
from checkpoint.grid_load import GridResolver
from checkpoint.hf_source import read_hf_metadata
from checkpoint.load_values import ABSENT, SavedValues, rank_local_value
from checkpoint.options import DEFAULT_MAX_METADATA_BYTES, LoadOptions  # noqa: F401 (re-exported)
from planners.boxes import coalesce
from planners.checksums import bad_blocks, block_span
from planners.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidCheckpointError,
    InvalidStateDictError,
    MissingKeysError,
    RankLocalError,
)
from planners.load_plan import (
    LoadTarget,
    ReadItem,
    build_index,
    check_compatible,
    element_strides,
    plan_tensor_reads,
)
from planners.metadata import (
    METADATA_FILE,
    SHARD_FILE_RE,
    ChunkRecord,
    Metadata,
    TensorRecord,
)
from planners.metadata_parse import parse_metadata
from storage.backend import CheckpointStorage

logger = logging.getLogger(__name__)

# Runs closer than this are fetched in one request: a few wasted bytes cost
# less than another round trip.
COALESCE_GAP_BYTES = 64 * 1024
# Keys named in a missing-keys error before "and N more".
_MAX_KEYS_SHOWN = 20


def read_metadata(storage: CheckpointStorage, *, max_bytes: int = DEFAULT_MAX_METADATA_BYTES) -> Metadata:
    """The committed metadata; a path with shard files but no metadata is incomplete.

    Raises:
        FileNotFoundError: nothing at the path (`IncompleteCheckpointError` when shard files are there).
        InvalidCheckpointError: the metadata is over `max_bytes`, not a regular file, or malformed.
        CorruptCheckpointError: the metadata does not match its digest.
    """
    try:
        data = storage.read_bytes(METADATA_FILE, max_bytes=max_bytes)
    except FileNotFoundError:
        names = storage.list_names()
        if any(SHARD_FILE_RE.fullmatch(n) for n in names):
            raise IncompleteCheckpointError(
                f"checkpoint at {storage.url} is incomplete: it has shard files but no {METADATA_FILE} "
                "(the save was interrupted or is still running); load an earlier checkpoint"
            ) from None
        raise FileNotFoundError(f"no checkpoint at {storage.url}: {METADATA_FILE} not found") from None
    except IsADirectoryError as e:
        raise InvalidCheckpointError(f"{storage.url}: {METADATA_FILE} is a directory") from e
    except NotADirectoryError:
        raise CheckpointError(
            f"checkpoint path {storage.url} is a file, not a checkpoint directory"
        ) from None
    return parse_metadata(data, where=storage.url)


def load_checkpoint(
    storage: CheckpointStorage, target: Any, *, rank: int, world_size: int, options: LoadOptions
) -> tuple[Any, list[str]]:
    """Load into `target` (or, when None, the whole checkpoint); returns it and the missing keys."""
    start = time.perf_counter()
    metadata, verify = _read_source(storage, options)
    reader = _ChunkReader(storage, metadata, verify=verify, io_threads=options.io_threads)
    if target is None:
        result, missing = (
            _load_everything(metadata, reader, rank=rank, world_size=world_size, options=options),
            [],
        )
    else:
        result, missing = _load_into(
            target, metadata, reader, rank=rank, world_size=world_size, options=options
        )
    logger.info(
        "loaded %s on rank %d: %d bytes read in %.3fs",
        storage.url,
        rank,
        reader.bytes_read,
        time.perf_counter() - start,
    )
    return result, missing


def _read_source(storage: CheckpointStorage, options: LoadOptions) -> tuple[Metadata, bool]:
    """The checkpoint's metadata, or one synthesised from a Hugging Face layout (nothing to verify)."""
    try:
        metadata = read_metadata(storage, max_bytes=options.max_metadata_bytes)
    except FileNotFoundError as e:
        hf = (
            None
            if isinstance(e, IncompleteCheckpointError)
            else read_hf_metadata(storage, key_map=options.key_map)
        )
        if hf is None:
            raise
        return hf, False
    if options.key_map is not None:
        raise ValueError(
            f"key_map applies to Hugging Face layouts only, and {storage.url} is a shardsafe checkpoint"
        )
    return metadata, options.verify


def _load_into(
    target: Any, metadata: Metadata, reader: _ChunkReader, *, rank: int, world_size: int, options: LoadOptions
) -> tuple[Any, list[str]]:
    """Plan every read the target needs, refuse a strict load with missing keys, then read and fill."""
    flat = flatten_state_dict(target, for_load=True)
    jobs, missing = _plan_tensors(flat, metadata, reader)
    saved = SavedValues(metadata, reader, jobs, options)
    new_values = {}
    for fqn, path in flat.value_paths.items():
        value = saved.at(fqn, path)
        if value is ABSENT:
            missing.append(fqn)
        else:
            new_values[fqn] = value
    for fqn, holder in flat.rank_local.items():
        record = metadata.rank_local.get(fqn)
        if record is None:
            missing.append(fqn)
            continue
        _check_rank_local_world(reader.storage.url, fqn, record.world_size, rank=rank, world_size=world_size)
        new_values[fqn] = rank_local_value(record, rank, holder.value, reader, jobs, fqn, options)
    if options.strict and missing:
        raise _missing_keys_error(reader.storage.url, missing)
    reader.run(jobs)
    new_values = {fqn: saved.placed(v) if fqn in saved.produced else v for fqn, v in new_values.items()}
    return fill_target(target, flat, new_values), sorted(missing)


def _plan_tensors(
    flat: FlatStateDict, metadata: Metadata, reader: _ChunkReader
) -> tuple[list[tuple[ReadItem, torch.Tensor]], list[str]]:
    """The reads that fill the target's tensors, and the tensor keys the checkpoint lacks."""
    where = reader.storage.url
    missing: list[str] = []
    jobs: list[tuple[ReadItem, torch.Tensor]] = []
    for fqn, leaf in flat.tensors.items():
        if leaf.local.device.type == "meta":
            raise InvalidStateDictError(
                f"{where}: target key {fqn!r} is on the meta device; materialise it (e.g. to_empty()) before loading"
            )
        record = metadata.tensors.get(fqn)
        if record is None:
            missing.append(fqn)
            continue
        lt = LoadTarget(fqn=fqn, dtype=leaf.local.dtype, global_shape=leaf.global_shape, box=leaf.box)
        check_compatible(lt, record, where=where)
        jobs += [(item, leaf.local) for item in reader.plan(lt, record)]
    return jobs, missing


def _check_rank_local_world(where: str, fqn: str, saved_by: int, *, rank: int, world_size: int) -> None:
    """A rank-local entry goes back only to the world size that saved it (one entry per rank)."""
    if saved_by != world_size:
        raise RankLocalError(
            f"{where}: rank-local key {fqn!r} was saved by {saved_by} ranks and cannot go back to "
            f"rank {rank} of {world_size}; load it with the saving world size, or drop it from the target"
        )


def _missing_keys_error(where: str, missing: list[str]) -> MissingKeysError:
    shown = ", ".join(repr(k) for k in sorted(missing)[:_MAX_KEYS_SHOWN])
    more = f" and {len(missing) - _MAX_KEYS_SHOWN} more" if len(missing) > _MAX_KEYS_SHOWN else ""
    return MissingKeysError(
        f"checkpoint at {where} lacks {len(missing)} key(s) the target asks for: {shown}{more}",
        sorted(missing),
    )


def _load_everything(
    metadata: Metadata, reader: _ChunkReader, *, rank: int, world_size: int, options: LoadOptions
) -> Any:
    jobs: list[tuple[ReadItem, torch.Tensor]] = []
    saved = SavedValues(metadata, reader, jobs, options)
    result = saved.subtree(metadata.structure)
    reader.run(jobs)
    return saved.placed(result)


class _ChunkReader:
    """Plans and runs the byte-range reads of one load."""

    def __init__(
        self, storage: CheckpointStorage, metadata: Metadata, *, verify: bool, io_threads: int
    ) -> None:
        self.storage = storage
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
        wanted = [(item.chunk.offset_bytes + s, n) for item, _ in jobs for s, n in item.runs]
        merged = coalesce(wanted, max_gap=COALESCE_GAP_BYTES)
        try:
            buffers = self.storage.read_ranges(name, merged)
        except FileNotFoundError:
            raise _missing_file(self.storage.url, name, jobs[0][0].fqn) from None
        with self._lock:  # files are read on several threads
            self.bytes_read += sum(n for _, n in merged)
        starts = [s for s, _ in merged]
        verified: set[tuple[int, int]] = set()
        pieces = [
            [
                (run, self._slice(merged, starts, buffers, item.chunk.offset_bytes + run[0], run[1]))
                for run in item.runs
            ]
            for item, _ in jobs
        ]
        if self.verify:  # every block of the file first: a corrupt file contributes nothing to the target
            for (item, _), item_pieces in zip(jobs, pieces, strict=True):
                self._check(name, item, item_pieces, verified)
        for (item, dest), item_pieces in zip(jobs, pieces, strict=True):
            _copy_region(item, _span_bytes(item, item_pieces), dest)

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
                # Neither checksum is shown: the computed one would describe bytes that may not
                # belong to the checkpoint at all.
                lo, hi = block_span(bad[0], block, offset_bytes=chunk.offset_bytes, nbytes=chunk.nbytes)
                raise CorruptCheckpointError(
                    f"{self.storage.url}: file {name}, key {item.fqn!r}: checksum mismatch in block "
                    f"{bad[0]} (bytes [{lo}, {hi})); the file is corrupt"
                )
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
