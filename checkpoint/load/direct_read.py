"""Reading a chunk region into its target tensor in one pass, on storage that can (local disk).

A load that reads each file into fresh buffers, checks their blocks and then copies them into the
targets moves every byte through memory three times, and page-faults the fresh buffers in first.
When a region's bytes are one contiguous run of the file and its box of the target is one
contiguous piece of memory with the same dtype (whole chunks at the same world size, row blocks
when resharding along the first dimension), the bytes can land in the target without them.

Unverified, a region is read straight into the target in large windows. Verified, each window is
read into a small scratch buffer that stays in the CPU cache, its blocks are checked there, and only
then are the region's bytes in it copied into the target (a verified read covers whole checksum
blocks, so a row block of a resharded load that starts or ends inside a block still lands directly:
the padding is read, checked and dropped): the checksum is computed while the bytes are still in cache, so
verification costs the CRC itself and one cache-resident copy, not a second pass over the file
(issue 26; the earlier version read every region twice, once to check and once to land). The
guarantee is per window, as on remote storage (`storage/remote_read.py`): no byte reaches a target
before the blocks holding it passed their checksums; a corrupt block raises and contributes nothing,
though windows of the same region before it may already hold their (verified) values; the caller
copies a file's buffered regions only after every direct window of that file passed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy
import torch

from planners.checksums import bad_blocks
from planners.load_plan import ReadItem

# An unverified read window, in checksum blocks: long sequential reads straight into the target.
WINDOW_BLOCKS = 16
# A verified read window, in checksum blocks: 1 MiB with 512 KiB blocks, which stays in a core's L2
# cache between the read, the CRC and the copy (a prototype on this project's 2-core EPYC VM, warm
# 256 MiB: read+check+copy in 1 MiB windows 39 ms, 512 KiB 43 ms, 2 MiB 39 ms; in memory, 8 MiB
# windows ran 10% slower than 1 MiB ones).
VERIFIED_WINDOW_BLOCKS = 2
# Reads a file's bytes from an offset into a buffer, all of them or an error (`LocalStorage.reading`).
ReadInto = Callable[[int, memoryview], None]


def direct_target(item: ReadItem, dest: torch.Tensor, *, padded: bool = False) -> memoryview | None:
    """The bytes of `dest` that `item` fills, when one read can land there as they are; else None.

    `padded`: the read may cover whole checksum blocks around the region (a verified read of row
    blocks when resharding); only the region's own bytes then land (`read_verified_into_target`).
    """
    (start, n), *more = item.runs
    first, end = item.span
    if more or n == 0:
        return None  # several runs: it goes through a buffer
    if (start, start + n) != (first, end) and not (padded and start <= first and end <= start + n):
        return None  # block padding around the region, where the reader cannot drop it
    if (
        dest.device.type != "cpu"
        or dest.dtype != item.dtype
        or end - first != item.region.numel * item.dtype.itemsize
    ):
        return None  # another device or dtype, or a region that is not contiguous in the file
    index = tuple(slice(o, o + size) for o, size in zip(item.dest.offsets, item.dest.sizes))
    view = dest.detach()[index]
    if not view.is_contiguous():
        return None
    return memoryview(view.reshape(-1).view(torch.uint8).numpy())


def read_into_target(read_into: ReadInto, item: ReadItem, out: memoryview) -> None:
    """Read the region straight into `out` (no verification), in long windows."""
    first, end = item.span
    window = WINDOW_BLOCKS * (1 << 19)
    for done in range(0, end - first, window):
        read_into(item.chunk.offset_bytes + first + done, out[done : min(end - first, done + window)])


def read_verified_into_target(
    read_into: ReadInto, item: ReadItem, out: memoryview, block_bytes: int, scratch: numpy.ndarray
) -> int | None:
    """Read the region's blocks through `scratch`, each window checked before its region bytes are copied.

    The read covers the item's run (whole blocks around the region); only the bytes of the region
    (`item.span`) land in `out`.

    Returns:
        The first bad block (the region's windows from it on are not copied), or None.
    """
    start, n = item.runs[0]
    first, end = item.span
    window = len(scratch)
    view = memoryview(scratch)
    target = numpy.frombuffer(out, dtype=numpy.uint8)
    for done in range(0, n, window):
        size = min(window, n - done)
        piece = view[:size]
        read_into(item.chunk.offset_bytes + start + done, piece)
        bad = bad_blocks(piece, item.chunk.checksums, block_bytes, first_block=(start + done) // block_bytes)
        if bad:
            return bad[0]
        lo, hi = max(first, start + done), min(end, start + done + size)  # the region's bytes in this window
        if lo < hi:
            # numpy, not torch: a 1 MiB torch copy_ wakes its intra-op threads, which cost more than the copy
            # on a loaded machine; numpy copies in this thread and releases the GIL (other files read meanwhile).
            numpy.copyto(target[lo - first : hi - first], scratch[lo - start - done : hi - start - done])
    return None


def scratch_buffer(items: list[tuple[ReadItem, memoryview]], block_bytes: int) -> numpy.ndarray:
    """One uninitialised verified window (or the largest read, if smaller) for `read_verified_into_target`.

    Windows start on block boundaries of their chunk, so every block is checked whole within one window.
    """
    largest = max(item.runs[0][1] for item, _ in items)
    return numpy.empty(min(largest, VERIFIED_WINDOW_BLOCKS * block_bytes), dtype=numpy.uint8)
