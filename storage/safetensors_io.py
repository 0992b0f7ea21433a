"""Streaming safetensors shard files.

A shard file is an ordinary safetensors file: an 8-byte little-endian header
length, a JSON header (padded with spaces to a multiple of 8), then the
tensors' bytes back to back in header order. The header is known before any
data, so the file is written front to back in bounded slices, never
assembled in memory; the crc32c of each checksum block is computed on the
slices as they go out.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import crc32c
import torch

from planners.dtypes import safetensors_code

# Bytes handed to one write() call: big enough for full-speed I/O, small
# enough that an object-store client buffers at most this much extra.
WRITE_SLICE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class WrittenTensor:
    """Where a tensor's bytes landed in the file, and their block checksums."""

    key: str
    offset_bytes: int
    nbytes: int
    checksums: tuple[int, ...]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The row-major bytes of a CPU tensor, without a copy when it is already contiguous."""
    t = tensor.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def build_header(entries: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> tuple[bytes, list[tuple[int, int]]]:
    """The encoded header (length prefix included) and each tensor's data range."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    ranges = []
    offset = 0
    for key, t in entries:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": safetensors_code(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        ranges.append((offset, n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ranges


def write_safetensors(
    f: BinaryIO, entries: Sequence[tuple[str, torch.Tensor]], *, metadata: dict[str, str], block_bytes: int
) -> tuple[list[WrittenTensor], int]:
    """Stream `entries` as one safetensors file into `f`.

    Returns:
        Per entry, where its bytes lie (offsets count from the file's start),
        and the file's total size.
    """
    head, ranges = build_header(entries, metadata)
    f.write(head)
    written = []
    # Slices hold whole checksum blocks so each block's crc is taken from one slice.
    slice_bytes = max(block_bytes, WRITE_SLICE_BYTES // block_bytes * block_bytes)
    for (key, tensor), (start, n) in zip(entries, ranges):
        data = tensor_bytes(tensor)
        checksums = []
        for s in range(0, n, slice_bytes):
            piece = data[s : s + slice_bytes]
            checksums.extend(crc32c.crc32c(piece[b : b + block_bytes]) for b in range(0, len(piece), block_bytes))
            f.write(piece)
        written.append(WrittenTensor(key=key, offset_bytes=len(head) + start, nbytes=n, checksums=tuple(checksums)))
    return written, len(head) + (ranges[-1][0] + ranges[-1][1] if ranges else 0)
