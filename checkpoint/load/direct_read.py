"""Reading a chunk region straight into its target tensor, in windows, on storage that can (local disk).

A load that reads each file into fresh buffers, checks their blocks and then copies them into the
targets moves every byte through memory three times, and page-faults the fresh buffers in first.
When a region's bytes are one contiguous run of the file and its box of the target is one
contiguous piece of memory with the same dtype (whole chunks at the same world size, row blocks
when resharding along the first dimension), the bytes can land in the target directly.

Verification keeps its guarantee (a corrupt file contributes nothing to the target): before
anything of a file is copied, `first_bad_block` streams each direct region through one small
scratch buffer and checks its blocks. `read_into_target` then reads the region into the target
window by window and checks each window again while it is still in cache, so bytes that changed
on disk in between are still refused (the target then holds part of the file: the load raises).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from planners.checksums import bad_blocks
from planners.load_plan import ReadItem

# A read window, in checksum blocks: large enough for long sequential reads, small enough to stay in cache.
WINDOW_BLOCKS = 16
# Reads a file's bytes from an offset into a buffer, all of them or an error (`LocalStorage.reading`).
ReadInto = Callable[[int, memoryview], None]


def direct_target(item: ReadItem, dest: torch.Tensor) -> memoryview | None:
    """The bytes of `dest` that `item` fills, when one read can land there as they are; else None."""
    (start, n), *more = item.runs
    first, end = item.span
    if more or (start, start + n) != (first, end) or n == 0:
        return None  # several runs, or block padding around the region: it goes through a buffer
    if dest.device.type != "cpu" or dest.dtype != item.dtype or n != item.region.numel * item.dtype.itemsize:
        return None  # another device or dtype, or a region that is not contiguous in the file
    index = tuple(slice(o, o + size) for o, size in zip(item.dest.offsets, item.dest.sizes))
    view = dest.detach()[index]
    if not view.is_contiguous():
        return None
    return memoryview(view.reshape(-1).view(torch.uint8).numpy())


def first_bad_block(read_into: ReadInto, item: ReadItem, block_bytes: int, scratch: memoryview) -> int | None:
    """Stream the region through `scratch` and return the first block whose checksum differs, or None."""
    start, n = item.runs[0]
    window = len(scratch)
    for done in range(0, n, window):
        piece = scratch[: min(window, n - done)]
        read_into(item.chunk.offset_bytes + start + done, piece)
        bad = bad_blocks(piece, item.chunk.checksums, block_bytes, first_block=(start + done) // block_bytes)
        if bad:
            return bad[0]
    return None


def read_into_target(
    read_into: ReadInto, item: ReadItem, out: memoryview, block_bytes: int | None
) -> int | None:
    """Read the region into `out` window by window; with `block_bytes`, return the first bad block, or None."""
    start, n = item.runs[0]
    window = WINDOW_BLOCKS * (block_bytes or 1 << 15)
    for done in range(0, n, window):
        piece = out[done : min(n, done + window)]
        read_into(item.chunk.offset_bytes + start + done, piece)
        if block_bytes is not None:
            bad = bad_blocks(
                piece, item.chunk.checksums, block_bytes, first_block=(start + done) // block_bytes
            )
            if bad:
                return bad[0]
    return None


def scratch_buffer(items: list[tuple[ReadItem, memoryview]], block_bytes: int) -> memoryview:
    """One uninitialised buffer of a window (or the largest region, if smaller) for `first_bad_block`."""
    largest = max(item.runs[0][1] for item, _ in items)
    return memoryview(torch.empty(min(largest, WINDOW_BLOCKS * block_bytes), dtype=torch.uint8).numpy())
