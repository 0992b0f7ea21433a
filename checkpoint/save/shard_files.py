"""Step 3 of the save protocol, on the rank that writes (trainer or writer process): its shard files.

Each file of this rank's plan is streamed as safetensors (format version 2: with the block checksums
of its grid chunks inside), its byte count checked against what the format says it must be, and
the chunks it holds recorded for the metadata. Failures come back as data (`RankWriteResult.error`),
not exceptions, so the coordinator's commit can fail every rank together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from checkpoint.save.incremental import split_items
from checkpoint.save.protocol import PreparedSave
from planners.errors import StorageError
from planners.metadata import CHECKSUM_BLOCK_BYTES, ChunkRecord, shard_file_name
from planners.metadata_build import RankWriteResult, WrittenChunk
from planners.save_plan import FilePlan
from storage.backend import CheckpointStorage
from storage.checksummed_shard import write_checksummed_shard
from storage.safetensors_io import WrittenTensor, write_safetensors

logger = logging.getLogger(__name__)


def write_rank_files(
    storage: CheckpointStorage,
    prepared: PreparedSave,
    tensors: Mapping[str, torch.Tensor],
    *,
    io_threads: int,
) -> RankWriteResult:
    """Write this rank's shard files; failures are returned, not raised, so the commit can report them."""
    files, split = prepared.files, None
    try:
        if prepared.incremental is not None:  # checkpoint.save.incremental: leave out what the base holds
            split = split_items(prepared.incremental, prepared.files, tensors)
            files = split.files
        done = _map_files(
            lambda fp: _write_file(storage, prepared, fp, tensors), files, io_threads=io_threads
        )
    except Exception as e:
        logger.exception("rank %d: writing shard files to %s failed", prepared.rank, prepared.url)
        return RankWriteResult(rank=prepared.rank, error=f"{type(e).__name__}: {e}")
    return RankWriteResult(
        rank=prepared.rank,
        files={f.name: f.nbytes for f in done},
        chunks=tuple(c for f in done for c in f.chunks),
        rank_local_values=prepared.rank_local_values,
        incremental=None if split is None else split.report(tuple(c for f in done for c in f.located)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _WrittenFile:
    """One shard file as written: its name, its size and the chunk records it adds to the metadata."""

    name: str
    nbytes: int
    chunks: tuple[WrittenChunk, ...]
    located: tuple[WrittenChunk, ...] = ()  # every chunk, grid ones too (an incremental save's index)


_T = TypeVar("_T")


def _map_files(write: Callable[[FilePlan], _T], files: Sequence[FilePlan], *, io_threads: int) -> list[_T]:
    """`write` over the files in order, on up to `io_threads` threads at once."""
    if len(files) > 1 and io_threads > 1:
        with ThreadPoolExecutor(
            max_workers=min(io_threads, len(files)), thread_name_prefix="shardsafe-write"
        ) as pool:
            return list(pool.map(write, files))
    return [write(fp) for fp in files]


def _write_file(
    storage: CheckpointStorage, prepared: PreparedSave, fp: FilePlan, tensors: Mapping[str, torch.Tensor]
) -> _WrittenFile:
    """Stream one shard file and record where each of its chunks landed."""
    name = shard_file_name(prepared.save_id, fp.stem)
    header = {"format": "shardsafe", "save_id": prepared.save_id, "rank": str(prepared.rank)}
    entries = [(item.fqn, tensors[item.fqn]) for item in fp.items]
    # Version 2: a file holding grid chunks carries their checksums (storage/checksummed_shard.py).
    write = write_checksummed_shard if any(i.grid for i in fp.items) else write_safetensors
    try:
        with storage.open_write(name) as f:
            written, nbytes = write(f, entries, metadata=header, block_bytes=CHECKSUM_BLOCK_BYTES)
            if f.tell() != nbytes:
                raise StorageError(f"{f.tell()} bytes were written but the file needs {nbytes}")
    except Exception as e:
        if isinstance(e, StorageError) and name in str(e):
            raise
        raise StorageError(f"{prepared.url}/{name}: {type(e).__name__}: {e}") from e
    located = _written_chunks(fp, name, written)
    chunks = tuple(c for c, i in zip(located, fp.items) if not i.grid)
    return _WrittenFile(name=name, nbytes=nbytes, chunks=chunks, located=located)


def _written_chunks(fp: FilePlan, name: str, written: Sequence[WrittenTensor]) -> tuple[WrittenChunk, ...]:
    """Where each chunk of one written file landed, from its plan item and the storage layer's report.

    The metadata records only the plain ones: a grid key's record and the file's header locate its chunks.
    """
    return tuple(
        WrittenChunk(
            fqn=i.fqn,
            dtype=i.dtype,
            rank_local=i.rank_local,
            chunk=ChunkRecord(
                box=i.box,
                file=name,
                key=w.key,
                offset_bytes=w.offset_bytes,
                nbytes=w.nbytes,
                checksums=w.checksums,
            ),
        )
        for i, w in zip(fp.items, written)
    )
