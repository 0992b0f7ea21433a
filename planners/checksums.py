"""Block checksums of shard bytes: computed once when written, checked on every load and by `verify`.

A chunk's bytes are cut into fixed blocks of `checksum_block_bytes` (recorded in the metadata) and the crc32c of
each block is stored beside the chunk. Blocks, not one checksum per chunk, so that a resharding load that reads a
few rows of a large chunk checks only the blocks it read, and `verify` can name which bytes went bad. The writer
(storage/safetensors_io.py), the loader (checkpoint/load/loader.py) and `verify` (checkpoint/tools/verify.py) all go through
these functions, so the three cannot drift apart on where a block starts or which checksum belongs to it.

Pure: bytes in, integers out; no file is opened here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import crc32c


def block_checksums(data: bytes | memoryview, block_bytes: int) -> list[int]:
    """The crc32c of each `block_bytes` block of `data`, in order; the last block may be shorter.

    Args:
        data: bytes that start on a block boundary of their chunk.
        block_bytes: the checkpoint's checksum block size.

    Returns:
        One checksum per block (none for empty `data`).
    """
    return [crc32c.crc32c(data[b : b + block_bytes]) for b in range(0, len(data), block_bytes)]


def bad_blocks(
    data: bytes | memoryview,
    expected: Sequence[int],
    block_bytes: int,
    *,
    first_block: int = 0,
    skip: Callable[[int], bool] | None = None,
) -> list[int]:
    """The indexes (within the chunk) of the blocks of `data` whose checksum differs from `expected`.

    Args:
        data: bytes of one chunk starting at block `first_block` (a block boundary).
        expected: the chunk's recorded checksums, one per block of the whole chunk.
        block_bytes: the checkpoint's checksum block size.
        first_block: the index of the block `data` starts with.
        skip: blocks for which it returns True are not recomputed (already checked by an earlier read).

    Returns:
        Mismatching block indexes, ascending; empty when every checked block matches.
    """
    bad = []
    for b in range(0, len(data), block_bytes):
        index = first_block + b // block_bytes
        if skip is not None and skip(index):
            continue
        if crc32c.crc32c(data[b : b + block_bytes]) != expected[index]:
            bad.append(index)
    return bad


def block_span(index: int, block_bytes: int, *, offset_bytes: int, nbytes: int) -> tuple[int, int]:
    """The file byte range `[start, end)` of block `index` of a chunk at `offset_bytes` holding `nbytes` bytes."""
    start = index * block_bytes
    return offset_bytes + start, offset_bytes + min(start + block_bytes, nbytes)
