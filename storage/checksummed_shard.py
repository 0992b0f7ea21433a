"""Version-2 shard files: block checksums stored in the file, next to their data.

A version-2 shard file is a plain safetensors file whose last entry,
`CHECKSUM_ENTRY` (U32, one element per checksum block), holds the crc32c of
every block of the other entries, in data order: entry by entry, each
entry's bytes cut into blocks of `block_bytes` from its first byte (the last
block may be short). The header is written first with that entry's shape
(known from the sizes alone); its values are written last, after the data
streamed through crc32c, so checksums cost no extra pass over the data.
A loader reads the checksums only of the files it reads data from.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import BinaryIO

import torch

from planners.errors import InvalidCheckpointError
from planners.grid import CHECKSUM_ENTRY
from storage.safetensors_io import (
    SafetensorsHeader,
    WrittenTensor,
    build_header,
    write_entries,
    write_exact,
)


def _blocks(nbytes: int, block_bytes: int) -> int:
    return -(-nbytes // block_bytes)


def write_checksummed_shard(
    f: BinaryIO, entries: Sequence[tuple[str, torch.Tensor]], *, metadata: dict[str, str], block_bytes: int
) -> tuple[list[WrittenTensor], int]:
    """Stream `entries` and then their checksum table as one safetensors file.

    Returns:
        Per entry (the table excluded), where its bytes lie and their checksums, and the file's size.
    """
    nblocks = sum(_blocks(t.numel() * t.element_size(), block_bytes) for _, t in entries)
    table_stub = torch.empty(nblocks, dtype=torch.uint32)  # only its shape and dtype reach the header
    head, ranges = build_header([*entries, (CHECKSUM_ENTRY, table_stub)], metadata)
    write_exact(f, head)
    written = write_entries(f, entries, ranges, head_bytes=len(head), block_bytes=block_bytes)
    every = [c for w in written for c in w.checksums]
    write_exact(f, struct.pack(f"<{len(every)}I", *every))
    return written, len(head) + ranges[-1][0] + ranges[-1][1]


def checksum_slices(header: SafetensorsHeader, *, block_bytes: int, where: str) -> dict[str, tuple[int, int]]:
    """For each entry of a version-2 shard, (first block, block count) in the checksum table.

    Raises:
        InvalidCheckpointError: the file has no checksum table of the right size.
    """
    table = header.tensors.get(CHECKSUM_ENTRY)
    entries = sorted((e.offset_bytes, k, e.nbytes) for k, e in header.tensors.items() if k != CHECKSUM_ENTRY)
    out, first = {}, 0
    for _, key, nbytes in entries:
        out[key] = (first, _blocks(nbytes, block_bytes))
        first += out[key][1]
    if table is None or table.dtype != "U32" or table.shape != (first,):
        raise InvalidCheckpointError(
            f"{where}: shard file has no checksum table {CHECKSUM_ENTRY!r} of {first} blocks"
        )
    return out


def parse_checksum_table(raw: bytes | memoryview) -> tuple[int, ...]:
    """The little-endian U32 values of a checksum table."""
    return struct.unpack(f"<{len(raw) // 4}I", raw)
