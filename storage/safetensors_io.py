"""Streaming safetensors shard files.

A shard file is an ordinary safetensors file: an 8-byte little-endian header
length, a JSON header (padded with spaces to a multiple of 8), then the
tensors' bytes back to back in header order. The header is known before any
data, so the file is written front to back in bounded slices, never
assembled in memory; the crc32c of each checksum block is computed on the
slices as they go out, on a second thread while each slice is written.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from planners.checksums import block_checksums
from planners.dtypes import itemsize, name_from_code, safetensors_code
from planners.errors import InvalidCheckpointError, StorageError

if TYPE_CHECKING:
    from storage.backend import CheckpointStorage

# Bytes handed to one write() call: big enough for full-speed I/O, small
# enough that an object-store client buffers at most this much extra.
WRITE_SLICE_BYTES = 16 * 1024 * 1024
# The length prefix of every safetensors file (little-endian u64).
HEADER_PREFIX_BYTES = 8
# A longer header is refused before it is read, as the safetensors library
# does: real headers are kilobytes, so this only stops hostile length fields.
MAX_HEADER_BYTES = 100_000_000
# Dimensions and elements beyond these are a hostile header, not a tensor.
MAX_HEADER_DIMS = 64
MAX_HEADER_NUMEL = 1 << 50


@dataclass(frozen=True, slots=True, kw_only=True)
class WrittenTensor:
    """Where one entry's bytes landed in a file this process just wrote, and their block checksums.

    It is what the storage layer knows: a safetensors key and a byte range, no
    box or tensor key. The save turns it into the metadata's `ChunkRecord`
    (`checkpoint.save.protocol`); `HeaderEntry` is the reading side (parsed from a file
    that may be hostile), `checkpoint.async_writer.staging.StagedTensor` a position in the
    staging buffer, not in a file.
    """

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


def build_header(
    entries: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[int, int]]]:
    """The encoded header (length prefix included) and each tensor's data range."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    ranges = []
    offset = 0
    for key, t in entries:
        n = t.numel() * t.element_size()
        header[key] = {
            "dtype": safetensors_code(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        ranges.append((offset, n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ranges


def write_exact(f: BinaryIO, data: Any) -> None:
    """Hand all of `data` to `f`: a short count is retried for the rest, a zero count is an error.

    Raw (unbuffered) files may store fewer bytes than asked, e.g. when the disk fills up, and say so
    only through the returned count; ignoring it would leave a short file that looks written.
    """
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        if n is None:  # buffered and non-blocking streams: None means nothing was taken
            n = 0
        if n <= 0:
            raise StorageError(f"write() stored no bytes ({len(view)} left to write); the disk may be full")
        view = view[n:]


def write_safetensors(
    f: BinaryIO, entries: Sequence[tuple[str, torch.Tensor]], *, metadata: dict[str, str], block_bytes: int
) -> tuple[list[WrittenTensor], int]:
    """Stream `entries` as one safetensors file into `f`.

    Returns:
        Per entry, where its bytes lie (offsets count from the file's start),
        and the file's total size.
    """
    head, ranges = build_header(entries, metadata)
    write_exact(f, head)
    written = write_entries(f, entries, ranges, head_bytes=len(head), block_bytes=block_bytes)
    return written, len(head) + (ranges[-1][0] + ranges[-1][1] if ranges else 0)


def write_entries(
    f: BinaryIO,
    entries: Sequence[tuple[str, torch.Tensor]],
    ranges: Sequence[tuple[int, int]],
    *,
    head_bytes: int,
    block_bytes: int,
) -> list[WrittenTensor]:
    """Stream each entry's bytes after a header of `head_bytes`, checksumming every block as it goes.

    The checksums of a slice are computed on a second thread while the slice is written: a write
    mostly waits for the disk (dirty-page throttling) with the CPU idle, so the CRC costs no time
    there (a 256 MiB file written and synced on this project's 2-core VM: 109 ms with the CRC
    before each write, 94 ms beside it, 90 ms with no CRC). The bytes checksummed are the bytes
    written: both read the same memory, which does not change during the save (the caller's
    tensors while a sync save blocks, the staging buffer of an async one).
    """
    # Slices hold whole checksum blocks so each block's crc is taken from one slice.
    slice_bytes = max(block_bytes, WRITE_SLICE_BYTES // block_bytes * block_bytes)

    def write_one(
        key: str, tensor: torch.Tensor, start: int, n: int, pool: ThreadPoolExecutor | None
    ) -> WrittenTensor:
        data = tensor_bytes(tensor)
        parts: list[Any] = []  # per slice: its checksums, or their future on the pool
        for s in range(0, n, slice_bytes):
            piece = data[s : s + slice_bytes]
            parts.append(
                pool.submit(block_checksums, piece, block_bytes)
                if pool
                else block_checksums(piece, block_bytes)
            )
            write_exact(f, piece)
        checksums = tuple(c for part in parts for c in (part.result() if pool else part))
        return WrittenTensor(key=key, offset_bytes=head_bytes + start, nbytes=n, checksums=checksums)

    jobs = list(zip(entries, ranges))
    if sum(n for _, (_, n) in jobs) <= slice_bytes:  # one slice: a second thread would only cost
        return [write_one(key, tensor, start, n, None) for (key, tensor), (start, n) in jobs]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardsafe-crc") as pool:
        return [write_one(key, tensor, start, n, pool) for (key, tensor), (start, n) in jobs]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderEntry:
    """One tensor of a safetensors header, read back and validated; offsets count from the file's start.

    The reading-side counterpart of `WrittenTensor`: parsed from a file that is
    not trusted, so it carries the dtype code and shape the file claims, which
    readers check against the metadata before using the byte range.
    """

    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset_bytes: int
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SafetensorsHeader:
    """A validated safetensors header: entries tile the data area exactly."""

    file_bytes: int
    data_offset_bytes: int  # prefix + header length: the bytes a reader fetched to learn the layout
    metadata: dict[str, str]
    tensors: dict[str, HeaderEntry]


def read_header(
    storage: CheckpointStorage, name: str, *, where: str, expected_bytes: int | None = None
) -> SafetensorsHeader:
    """Read and validate the header of an untrusted safetensors file.

    The declared header length is checked against the real file size (and
    `MAX_HEADER_BYTES`) before the header is read, so a forged length never
    sizes a read or an allocation.

    Args:
        storage: the checkpoint's storage.
        name: the shard file's name inside it.
        where: the checkpoint path, for error messages.
        expected_bytes: the file's size as the checkpoint's metadata records it. Compared before
            the header is parsed, so a cut-off file is reported as truncated rather than as
            offsets past its end.

    Returns:
        The parsed header.

    Raises:
        FileNotFoundError: the file does not exist.
        InvalidCheckpointError: anything malformed, or a size other than `expected_bytes`, naming
            the checkpoint and the file.
    """
    size = storage.size(name)
    if expected_bytes is not None and size != expected_bytes:
        cause = "the file is truncated" if size < expected_bytes else "the file was replaced or appended to"
        raise InvalidCheckpointError(
            f"{where}: file {name} has {size} bytes, the metadata records {expected_bytes}; {cause}"
        )
    if size < HEADER_PREFIX_BYTES:
        raise InvalidCheckpointError(
            f"{where}: file {name}: {size} bytes is too short for a safetensors header"
        )
    (header_bytes,) = struct.unpack("<Q", bytes(storage.read_ranges(name, [(0, HEADER_PREFIX_BYTES)])[0]))
    if header_bytes > min(size - HEADER_PREFIX_BYTES, MAX_HEADER_BYTES):
        raise InvalidCheckpointError(
            f"{where}: file {name}: header length {header_bytes} exceeds the file ({size} bytes) "
            f"or the limit of {MAX_HEADER_BYTES} bytes"
        )
    raw = bytes(storage.read_ranges(name, [(HEADER_PREFIX_BYTES, header_bytes)])[0])
    return parse_header(raw, file_bytes=size, where=f"{where}: file {name}")


def parse_header(raw: bytes, *, file_bytes: int, where: str) -> SafetensorsHeader:
    """Validate the JSON header `raw` of a safetensors file of `file_bytes` bytes.

    The safetensors rules are enforced in full: known dtype codes, shapes of
    non-negative integers, `data_offsets` whose length matches shape and
    dtype, and entries that cover the data area exactly, with no gap or
    overlap, as the safetensors library itself demands.

    Raises:
        InvalidCheckpointError: the header breaks a rule; the message starts with `where`.
    """
    data_start = HEADER_PREFIX_BYTES + len(raw)
    data_bytes = file_bytes - data_start
    if data_bytes < 0:
        raise InvalidCheckpointError(
            f"{where}: header of {len(raw)} bytes exceeds the file of {file_bytes} bytes"
        )
    doc = _header_document(raw, where=where)
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidCheckpointError(f"{where}: safetensors __metadata__ must map strings to strings")
    tensors = {key: _header_entry(key, entry, data_start, data_bytes, where) for key, entry in doc.items()}
    _check_tiling(tensors, data_start, data_bytes, where)
    return SafetensorsHeader(
        file_bytes=file_bytes, data_offset_bytes=data_start, metadata=metadata, tensors=tensors
    )


def _header_document(raw: bytes, *, where: str) -> dict[str, Any]:
    """The header's JSON object (its entries not yet checked)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidCheckpointError(f"{where}: safetensors header is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidCheckpointError(f"{where}: safetensors header must be a JSON object")
    return doc


def _check_tiling(tensors: dict[str, HeaderEntry], data_start: int, data_bytes: int, where: str) -> None:
    """The entries, in offset order, must cover the data area exactly: no gap, no overlap, no tail."""
    end = 0
    for key, e in sorted(tensors.items(), key=lambda kv: (kv[1].offset_bytes, kv[1].nbytes)):
        start = e.offset_bytes - data_start
        if start != end:
            problem = (
                "overlaps the previous tensor"
                if start < end
                else f"leaves a gap of {start - end} bytes before it"
            )
            raise InvalidCheckpointError(f"{where}: tensor {key!r} at data offset {start} {problem}")
        end = start + e.nbytes
    if end != data_bytes:
        raise InvalidCheckpointError(
            f"{where}: tensors cover {end} bytes but the data area holds {data_bytes}: the file is truncated or padded"
        )


def _header_entry(key: str, entry: Any, data_start: int, data_bytes: int, where: str) -> HeaderEntry:
    def bad(problem: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(f"{where}: tensor {key[:200]!r}: {problem}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("entry must be an object with exactly dtype, shape and data_offsets")
    dtype = name_from_code(entry["dtype"], where=f"{where}: tensor {key[:200]!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_HEADER_DIMS
        and all(type(d) is int and d >= 0 for d in shape)
    ):
        raise bad(
            f"shape {str(shape)[:80]} must be a list of at most {MAX_HEADER_DIMS} non-negative integers"
        )
    if math.prod(shape) > MAX_HEADER_NUMEL:
        raise bad(f"shape {shape} is too large")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"data_offsets {str(offsets)[:80]} must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise bad(f"data_offsets [{begin}, {end}] lie outside the data area of {data_bytes} bytes")
    nbytes = math.prod(shape) * itemsize(dtype)
    if end - begin != nbytes:
        raise bad(
            f"data_offsets span {end - begin} bytes but shape {shape} of {entry['dtype']} needs {nbytes}"
        )
    return HeaderEntry(
        dtype=entry["dtype"], shape=tuple(shape), offset_bytes=data_start + begin, nbytes=nbytes
    )
