"""`consolidate`: make an incremental checkpoint self-contained (`shardsafe consolidate PATH`).

An incremental checkpoint (format version 3, `planners.references`) reads some bytes from files of
earlier checkpoints of its run. Consolidating copies exactly those bytes into new shard files of
the checkpoint itself, checked against the block checksums its metadata recorded, then replaces
its `metadata.json` (one atomic publish) with one that references nothing (format version 2,
the chunk index kept, so later saves can still reference it). Until that publish the checkpoint
is unchanged; the earlier checkpoints are never touched (retention sweeps what no step needs).

The new files are named for the checkpoint's own save and for the rank the chunks belong to: a
grid key's chunk goes to its writer rank (where a load looks for it), a plain key's to rank 0,
each file after that rank's existing ones. A consolidation interrupted before the publish leaves
those new files unlisted; they carry the checkpoint's save id, and the next consolidation of the
same checkpoint replaces them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from checkpoint.load.loader import read_metadata
from checkpoint.load.references import follow_references
from checkpoint.state.dtypes import dtype_from_name
from planners.checksums import bad_blocks
from planners.errors import CorruptCheckpointError
from planners.metadata import METADATA_FILE, SHARD_FILE_RE, ChunkRecord, FileRecord, Metadata, shard_file_name
from planners.references import IndexedChunk, References
from storage.backend import CheckpointStorage
from storage.checksummed_shard import write_checksummed_shard
from storage.spec import StorageSpec, spec_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsolidateResult:
    """What `consolidate` did: the files it wrote and the referenced bytes it copied into them."""

    path: str
    files_written: tuple[str, ...]
    bytes_copied: int


@dataclass(frozen=True, slots=True, kw_only=True)
class _Copy:
    fqn: str
    dtype: str
    rank: int
    chunk: ChunkRecord


def consolidate(
    path: str | os.PathLike[str] | StorageSpec, *, storage_options: dict[str, Any] | None = None
) -> ConsolidateResult:
    """Copy the bytes a checkpoint references into files of its own and drop its references.

    Raises:
        FileNotFoundError: no checkpoint at `path`; `MissingReferenceError` when a referenced file is gone.
        CorruptCheckpointError: referenced bytes do not match their recorded checksums (nothing is published).

    Example:
        >>> consolidate("/ckpts/run/step-000000300").bytes_copied
        13958643712
    """
    storage = spec_for(path, storage_options=storage_options).open()
    try:
        metadata = read_metadata(storage)
        refs = metadata.references
        if refs is None or not refs.files:
            return ConsolidateResult(path=storage.url, files_written=(), bytes_copied=0)
        copies = _referenced(metadata, refs)
        routed = follow_references(storage, metadata)
        moved: dict[tuple[str, tuple[int, ...]], ChunkRecord] = {}
        names: list[str] = []
        by_rank: dict[int, list[_Copy]] = defaultdict(list)
        for c in copies:
            by_rank[c.rank].append(c)
        for rank, group in sorted(by_rank.items()):
            index = _next_index(metadata, rank)
            for batch in _unique_keys(group):
                name = shard_file_name(metadata.save_id, f"r{rank:05d}-{index:03d}")
                moved.update(_write(storage, routed, metadata, name, rank, batch))
                names.append(name)
                index += 1
        sizes = {n: storage.size(n) for n in names}
        storage.publish(
            METADATA_FILE, _without_references(metadata, refs, moved, sizes).to_json(), overwrite=True
        )
        copied = sum(c.chunk.nbytes for c in copies)
        logger.info(
            "consolidated %s: %d referenced bytes copied into %d file(s)", storage.url, copied, len(names)
        )
        return ConsolidateResult(path=storage.url, files_written=tuple(names), bytes_copied=copied)
    finally:
        storage.close()


def _referenced(metadata: Metadata, refs: References) -> list[_Copy]:
    """Every chunk the checkpoint reads from another checkpoint, with the rank whose file will hold it."""
    index = metadata.grid_index()
    out = []
    for fqn, entries in refs.chunks.items():
        for e in entries.values():
            if e.chunk.file not in refs.files:
                continue
            rank = index.cells(fqn, e.chunk.box)[0].writer if fqn in metadata.grids else 0
            out.append(_Copy(fqn=fqn, dtype=metadata.tensors[fqn].dtype, rank=rank, chunk=e.chunk))
    listed = {(c.fqn, c.chunk.box.offsets) for c in out}
    for fqn, t in metadata.tensors.items():  # plain chunks the index lacks (a save with unhashed ranks)
        for ch in t.chunks:
            if ch.file in refs.files and (fqn, ch.box.offsets) not in listed:
                out.append(_Copy(fqn=fqn, dtype=t.dtype, rank=0, chunk=ch))
    return out


def _next_index(metadata: Metadata, rank: int) -> int:
    own = [
        int(m["index"])
        for n in metadata.files
        if (m := SHARD_FILE_RE.fullmatch(n)) and int(m["rank"]) == rank
    ]
    return max(own, default=-1) + 1


def _unique_keys(group: list[_Copy]) -> list[list[_Copy]]:
    """Batches in which no key appears twice (a shard file holds at most one chunk of a key)."""
    batches: list[list[_Copy]] = []
    for c in group:
        for batch in batches:
            if all(b.fqn != c.fqn for b in batch):
                batch.append(c)
                break
        else:
            batches.append([c])
    return batches


def _write(
    storage: CheckpointStorage,
    routed: CheckpointStorage,
    metadata: Metadata,
    name: str,
    rank: int,
    batch: list[_Copy],
) -> dict[tuple[str, tuple[int, ...]], ChunkRecord]:
    """Write one new shard file of the referenced chunks `batch`, each checked first; their new records."""
    entries = []
    for c in batch:
        (data,) = routed.read_ranges(c.chunk.file, [(c.chunk.offset_bytes, c.chunk.nbytes)])
        bad = bad_blocks(data, c.chunk.checksums, metadata.checksum_block_bytes)
        if bad:
            raise CorruptCheckpointError(
                f"{storage.url}: referenced file {c.chunk.file}, key {c.fqn!r}: {len(bad)} block(s) fail their "
                "checksums; nothing was consolidated"
            )
        dtype = dtype_from_name(c.dtype, where=f"{storage.url}: key {c.fqn!r}")
        entries.append(
            (
                c.fqn,
                torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(c.chunk.box.sizes),
            )
        )
    header = {"format": "shardsafe", "save_id": metadata.save_id, "rank": str(rank)}
    with storage.open_write(name) as f:
        written, _ = write_checksummed_shard(
            f, entries, metadata=header, block_bytes=metadata.checksum_block_bytes
        )
    return {
        (c.fqn, c.chunk.box.offsets): dataclasses.replace(
            c.chunk, file=name, key=w.key, offset_bytes=w.offset_bytes, nbytes=w.nbytes, checksums=w.checksums
        )
        for c, w in zip(batch, written)
    }


def _without_references(
    metadata: Metadata,
    refs: References,
    moved: dict[tuple[str, tuple[int, ...]], ChunkRecord],
    sizes: dict[str, int],
) -> Metadata:
    """The metadata with every referenced chunk at its new place, no referenced file, version 2."""
    tensors = {
        fqn: dataclasses.replace(t, chunks=tuple(moved.get((fqn, c.box.offsets), c) for c in t.chunks))
        for fqn, t in metadata.tensors.items()
    }
    chunks = {
        fqn: {
            o: IndexedChunk(chunk=moved.get((fqn, o), e.chunk), head=e.head, xxh3=e.xxh3)
            for o, e in entries.items()
        }
        for fqn, entries in refs.chunks.items()
    }
    files = {
        **metadata.files,
        **{n: FileRecord(nbytes=s, rank=int(SHARD_FILE_RE.fullmatch(n)["rank"])) for n, s in sizes.items()},
    }
    return dataclasses.replace(
        metadata, version=2, tensors=tensors, files=files, references=References(files={}, chunks=chunks)
    )


def register(group: Any) -> None:
    """Add `consolidate` to the `shardsafe` command group."""
    import click

    from checkpoint.tools.cli_common import Output, exit_on_errors, parse_storage_options, shared_options

    @click.command("consolidate", short_help="Copy the bytes an incremental checkpoint references into it.")
    @click.argument("path")
    @shared_options
    def consolidate_command(path: str, as_json: bool, quiet: bool, storage_options: str | None) -> None:
        """Make the checkpoint at PATH self-contained: the bytes it references in earlier checkpoints of its
        run are copied into new shard files of its own, then its metadata stops referencing them."""
        out = Output(as_json=as_json, quiet=quiet)
        with exit_on_errors(out):
            result = consolidate(path, storage_options=parse_storage_options(storage_options))
        doc = {
            "path": result.path,
            "files_written": list(result.files_written),
            "bytes_copied": result.bytes_copied,
        }
        if as_json:
            out.emit(doc)
        else:
            out.console.print(
                f"{result.path}: {result.bytes_copied} referenced bytes copied into "
                f"{len(result.files_written)} file(s); it references no other checkpoint",
                markup=False,
            )

    group.add_command(consolidate_command)
