"""Checking one shard file of a checkpoint against its metadata (the per-file half of `verify`).

Each file must exist with exactly its recorded size; its safetensors header is
parsed untrusted and must agree with the metadata about every chunk (key,
dtype, shape, byte range, save id); a version-2 checksum table must match the
metadata's checksums; and every checksum block is recomputed from the bytes.
Problems are returned as text, never raised, so `verify` reports all of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from checkpoint.load.header_check import owner_problems
from checkpoint.state.dtypes import dtype_from_name, safetensors_code
from planners.checksums import bad_blocks, block_span
from planners.errors import InvalidCheckpointError
from planners.grid import CHECKSUM_ENTRY
from planners.metadata import ChunkRecord, FileRecord, Metadata
from storage.backend import CheckpointStorage
from storage.checksummed_shard import checksum_slices, parse_checksum_table
from storage.safetensors_io import SafetensorsHeader, read_header

# Bytes fetched per read while checksumming (rounded down to whole checksum
# blocks): large reads keep object stores fast, and only one is held per file.
READ_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRef:
    """One chunk a shard file should hold, with the key and dtype it belongs to."""

    fqn: str
    dtype: str  # torch name, as in the metadata
    chunk: ChunkRecord


def verify_file(
    storage: CheckpointStorage,
    metadata: Metadata,
    name: str,
    record: FileRecord,
    refs: Sequence[ChunkRef],
    progress: Callable[[int], None] | None = None,
    *,
    unlocated: frozenset[str] = frozenset(),
) -> tuple[list[str], int]:
    """Problems of one shard file, and the tensor bytes checksummed.

    `unlocated`: grid keys whose chunks could not all be located (reported elsewhere); their entries
    in this file are not counted as unaccounted for.
    """
    try:
        size = storage.size(name)
    except FileNotFoundError:
        return [f"file {name}: missing (the metadata lists it with {record.nbytes} bytes)"], 0
    except InvalidCheckpointError as e:  # a link, a directory, a FIFO or a device
        return [f"file {name}: {e}"], 0
    if size != record.nbytes:  # checked first: a cut-off header's offsets would only hide the cause
        problems = [
            f"file {name}: {size} bytes on storage, the metadata records {record.nbytes}; "
            "it was truncated or replaced"
        ]
    else:
        problems = _header_problems(storage, name, metadata, record, refs, unlocated)
    data_problems, checked = _data_problems(
        storage, name, size, refs, metadata.checksum_block_bytes, progress
    )
    return problems + data_problems, checked


def _header_problems(
    storage: CheckpointStorage,
    name: str,
    metadata: Metadata,
    record: FileRecord,
    refs: Sequence[ChunkRef],
    unlocated: frozenset[str],
) -> list[str]:
    """Where the file's safetensors header (and its checksum table) disagrees with the metadata."""
    try:
        header = read_header(storage, name, where=storage.url)
    except InvalidCheckpointError as e:
        return [str(e)]
    problems = owner_problems(name, header, metadata, record)
    problems += _key_use_problems(name, header, refs, unlocated)
    problems += _entry_problems(name, header, refs)
    return problems + _table_problems(storage, name, header, refs, metadata.checksum_block_bytes)


def _data_problems(
    storage: CheckpointStorage,
    name: str,
    size: int,
    refs: Sequence[ChunkRef],
    block: int,
    progress: Callable[[int], None] | None,
) -> tuple[list[str], int]:
    """Chunks lying past the file's end, and chunks whose blocks fail their checksums; bytes checksummed."""
    problems, checked = [], 0
    for ref in refs:
        end = ref.chunk.offset_bytes + ref.chunk.nbytes
        if end > size:
            problems.append(
                f"file {name}, key {ref.fqn!r}: chunk bytes [{ref.chunk.offset_bytes}, {end}) "
                f"lie outside the file of {size} bytes"
            )
            continue
        try:
            problem = _checksum_problem(storage, name, ref, block, progress)
        except InvalidCheckpointError as e:  # truncated or replaced while it was read
            problem = str(e)
        if problem is not None:
            problems.append(problem)
        checked += ref.chunk.nbytes
    return problems, checked


def _key_use_problems(
    name: str, header: SafetensorsHeader, refs: Sequence[ChunkRef], unlocated: frozenset[str]
) -> list[str]:
    """Each safetensors key belongs to exactly one chunk, and every tensor of the file to some chunk."""
    uses = Counter(ref.chunk.key for ref in refs)
    problems = [
        f"file {name}: safetensors key {k!r} is claimed by {n} chunks"
        for k, n in sorted(uses.items())
        if n > 1
    ]
    return problems + [
        f"file {name}: holds tensor {k!r} that no chunk of the metadata refers to"
        for k in sorted(set(header.tensors) - set(uses) - unlocated - {CHECKSUM_ENTRY})
    ]


def _entry_problems(name: str, header: SafetensorsHeader, refs: Sequence[ChunkRef]) -> list[str]:
    """Each chunk's header entry must have the metadata's dtype, shape and byte range."""
    problems = []
    for ref in refs:
        entry = header.tensors.get(ref.chunk.key)
        c = ref.chunk
        if entry is None:
            problems.append(f"file {name}, key {ref.fqn!r}: the header has no tensor {c.key!r}")
            continue
        code = safetensors_code(dtype_from_name(ref.dtype, where=name))
        saw = (entry.dtype, entry.shape, entry.offset_bytes, entry.nbytes)
        want = (code, c.box.sizes, c.offset_bytes, c.nbytes)
        if saw != want:
            problems.append(
                f"file {name}, key {ref.fqn!r}: the header has dtype {entry.dtype} shape {list(entry.shape)} at bytes "
                f"[{entry.offset_bytes}, {entry.offset_bytes + entry.nbytes}), the metadata {code} {list(c.box.sizes)} "
                f"at [{c.offset_bytes}, {c.offset_bytes + c.nbytes})"
            )
    return problems


def _table_problems(
    storage: CheckpointStorage, name: str, header: SafetensorsHeader, refs: Sequence[ChunkRef], block: int
) -> list[str]:
    """A version-2 file's checksum table must agree with the metadata's checksums of its explicit chunks.

    Grid chunks take their checksums from the table, so their data is checked against it; the table's
    entries for explicitly recorded chunks (rank-local tensors, say) are read by no load, so only this
    comparison finds damage there.
    """
    if CHECKSUM_ENTRY not in header.tensors:
        return []
    try:
        slices = checksum_slices(header, block_bytes=block, where=f"file {name}")
        entry = header.tensors[CHECKSUM_ENTRY]
        (raw,) = storage.read_ranges(name, [(entry.offset_bytes, entry.nbytes)])
    except InvalidCheckpointError as e:
        return [str(e)]
    table = parse_checksum_table(raw)
    return [
        f"file {name}, key {ref.fqn!r}: the file's checksum table disagrees with the metadata's checksums "
        "of this chunk; the file is corrupt"
        for ref in refs
        if ref.chunk.key in slices
        and table[slices[ref.chunk.key][0] : sum(slices[ref.chunk.key])] != ref.chunk.checksums
    ]


def _checksum_problem(
    storage: CheckpointStorage,
    name: str,
    ref: ChunkRef,
    block: int,
    progress: Callable[[int], None] | None = None,
) -> str | None:
    """Recompute every block checksum of one chunk; a description of the bad blocks, if any."""
    chunk = ref.chunk
    step = max(block, READ_BYTES // block * block)
    bad = []
    for start in range(0, chunk.nbytes, step):
        n = min(step, chunk.nbytes - start)
        (data,) = storage.read_ranges(name, [(chunk.offset_bytes + start, n)])
        bad += bad_blocks(data, chunk.checksums, block, first_block=start // block)
        if progress is not None:
            progress(n)
    if not bad:
        return None
    first, end = block_span(bad[0], block, offset_bytes=chunk.offset_bytes, nbytes=chunk.nbytes)
    return (
        f"file {name}, key {ref.fqn!r}: checksum mismatch in {len(bad)} of {len(chunk.checksums)} block(s), "
        f"first at bytes [{first}, {end}); the file is corrupt"
    )
