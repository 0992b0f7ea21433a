"""Load planning: which byte ranges each target chunk needs (resharding).

The target state dict decides the layout. For each target tensor, the saved
chunks that overlap its box are found through a `ChunkIndex`; each overlap
becomes a `ReadItem` naming the file, the byte runs inside the chunk, and
where the values land in the target's local tensor. A `Shard(0)` target
reads one contiguous run per saved chunk, never whole files. When checksums
are verified, runs widen to whole checksum blocks so every byte read can be
checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from planners.boxes import Box, ChunkIndex, byte_runs
from planners.errors import MismatchError
from planners.metadata import ChunkRecord, TensorRecord

# A region needing more separate runs than this is read as one bounding run.
MAX_RUNS_PER_READ = 4096


class DType(Protocol):
    """What planning needs of a dtype (a torch dtype qualifies; planning never imports torch)."""

    @property
    def itemsize(self) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadTarget:
    """What the target wants of one tensor: its global shape and dtype, and the box it holds."""

    fqn: str
    dtype: DType
    global_shape: tuple[int, ...]
    box: Box


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadItem:
    """Copy `region` (chunk coordinates) of a saved chunk into `dest` (target-local coordinates)."""

    fqn: str
    chunk: ChunkRecord
    dtype: DType
    region: Box
    dest: Box
    runs: tuple[tuple[int, int], ...]  # (offset in the chunk, nbytes), block-aligned when verifying

    @property
    def span(self) -> tuple[int, int]:
        """(first byte, end byte) of the region inside the chunk."""
        itemsize = self.dtype.itemsize
        strides = _strides(self.chunk.box.sizes, itemsize)
        first = sum(o * s for o, s in zip(self.region.offsets, strides))
        last = sum((o + n - 1) * s for o, n, s in zip(self.region.offsets, self.region.sizes, strides))
        return first, last + itemsize


def _strides(sizes: tuple[int, ...], itemsize: int) -> list[int]:
    strides = [itemsize] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        strides[d] = strides[d + 1] * sizes[d + 1]
    return strides


def element_strides(sizes: tuple[int, ...]) -> list[int]:
    return _strides(sizes, 1)


def check_compatible(target: LoadTarget, record: TensorRecord, *, where: str) -> None:
    """Refuse a target whose shape or dtype differ from the saved tensor."""
    wanted = str(target.dtype).removeprefix("torch.")
    if tuple(record.shape) != tuple(target.global_shape) or record.dtype != wanted:
        raise MismatchError(
            f"{where}: key {target.fqn!r} was saved with shape {list(record.shape)} dtype {record.dtype}, "
            f"the target has shape {list(target.global_shape)} dtype {wanted}"
        )


def plan_tensor_reads(
    target: LoadTarget, record: TensorRecord, index: ChunkIndex, *, block_bytes: int | None
) -> list[ReadItem]:
    """Read items that fill `target.box` from the saved chunks (`index` built over `record.chunks`)."""
    items = []
    for i, overlap in index.overlaps(target.box):
        chunk = record.chunks[i]
        region = overlap.relative_to(chunk.box)
        runs = byte_runs(chunk.box, region, target.dtype.itemsize, max_runs=MAX_RUNS_PER_READ)
        if block_bytes is not None:
            runs = widen_to_blocks(runs, block_bytes, chunk.nbytes)
        items.append(
            ReadItem(
                fqn=target.fqn,
                chunk=chunk,
                dtype=target.dtype,
                region=region,
                dest=overlap.relative_to(target.box),
                runs=tuple(runs),
            )
        )
    return items


def widen_to_blocks(runs: list[tuple[int, int]], block_bytes: int, limit: int) -> list[tuple[int, int]]:
    """Extend each run to whole checksum blocks (the last block may be short)."""
    out = []
    for start, n in runs:
        lo = start // block_bytes * block_bytes
        hi = min(-(-(start + n) // block_bytes) * block_bytes, limit)
        out.append((lo, hi - lo))
    return out


def build_index(record: TensorRecord) -> ChunkIndex:
    return ChunkIndex([c.box for c in record.chunks])
