"""Comparing two checkpoints without loading either: `diff_checkpoints(a, b)` (and `shardsafe diff`).

Both checkpoints may be larger than memory and saved by different world sizes,
so tensors are compared block by block: a block is a run of whole rows along
the first dimension, at most `block_bytes` of float64 (the width the
differences are computed in). Rows are contiguous inside every chunk whatever
the saved sharding, because a block spans every other dimension completely:
each chunk overlapping a block contributes one contiguous byte range, read
alone, checked against its CRC-32C blocks and copied into place. Memory is
therefore bounded by a few blocks, not by the tensor or the checkpoint.

Non-tensor values are compared as their stored typed JSON (so nothing is
unpickled); rank-local entries by their per-rank checksums and values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import crc32c
import torch

from checkpoint.dtypes import dtype_from_name
from checkpoint.grid_load import GridResolver
from checkpoint.load import read_metadata
from planners.errors import CorruptCheckpointError
from planners.metadata import ChunkRecord, Metadata, TensorRecord
from storage.backend import CheckpointStorage
from storage.spec import StorageSpec, specs_for

# Each block of a tensor, widened to float64 for the difference, stays under this.
BLOCK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorComparison:
    """A tensor present in both with the same dtype and shape.

    Attributes:
        key: its fully qualified name.
        equal: bit for bit.
        max_abs_diff: the largest |a - b| (computed in float64; NaN where one side is NaN); 0.0 when equal.
    """

    key: str
    equal: bool
    max_abs_diff: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Changed:
    """A key present in both whose kind, dtype or shape differs (values not compared)."""

    key: str
    a: str  # e.g. "float32[4, 8]", "value", "rank-local"
    b: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DiffReport:
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    changed: tuple[Changed, ...]
    tensors: tuple[TensorComparison, ...]
    values: dict[str, bool] = field(default_factory=dict)  # key -> equal (non-tensor and rank-local keys)

    @property
    def identical(self) -> bool:
        return (
            not self.only_in_a
            and not self.only_in_b
            and not self.changed
            and all(t.equal for t in self.tensors)
            and all(self.values.values())
        )


def diff_checkpoints(
    a: str | StorageSpec,
    b: str | StorageSpec,
    *,
    storage_options: Mapping[str, Any] | None = None,
    block_bytes: int = BLOCK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> DiffReport:
    """Compare the checkpoints at `a` and `b` key by key, streaming tensors block by block.

    Args:
        a, b: checkpoint directories (local paths or fsspec URLs), or `StorageSpec`s resolved earlier.
        storage_options: fsspec options for remote paths (both, where given as strings).
        block_bytes: bound on each compared block (float64 bytes); memory stays a small multiple of it.
        progress: called with the bytes of `a` compared after each block (for a progress bar).

    Raises:
        FileNotFoundError: no checkpoint at `a` or `b` (`IncompleteCheckpointError` if uncommitted).
        InvalidCheckpointError: a metadata file is invalid; `CorruptCheckpointError` when a byte
            read fails its checksum.

    Example:
        >>> report = diff_checkpoints("/ckpts/run/step-000000100", "/ckpts/run/step-000000200")
        >>> [t.key for t in report.tensors if not t.equal]
        ['model.w']
    """
    sa, sb = (spec.open() for spec in specs_for(a, b, storage_options=storage_options))
    try:
        return _diff(sa, sb, block_bytes, progress)
    finally:
        sa.close()
        sb.close()


def _diff(
    sa: CheckpointStorage, sb: CheckpointStorage, block_bytes: int, progress: Callable[[int], None] | None
) -> DiffReport:
    """`diff_checkpoints` once both storages are open: keys by kind first, then tensors and values."""
    ma, mb = _located(sa, read_metadata(sa)), _located(sb, read_metadata(sb))
    kinds_a, kinds_b = _kinds(ma), _kinds(mb)
    both = sorted(kinds_a.keys() & kinds_b.keys())
    same = [k for k in both if kinds_a[k] == kinds_b[k]]
    return DiffReport(
        only_in_a=tuple(sorted(kinds_a.keys() - kinds_b.keys())),
        only_in_b=tuple(sorted(kinds_b.keys() - kinds_a.keys())),
        changed=tuple(Changed(key=k, a=kinds_a[k], b=kinds_b[k]) for k in both if kinds_a[k] != kinds_b[k]),
        tensors=tuple(
            _compare_tensor(k, (sa, ma), (sb, mb), block_bytes, progress) for k in same if k in ma.tensors
        ),
        values={k: _value_entry(ma, k) == _value_entry(mb, k) for k in same if k not in ma.tensors},
    )


def _located(storage: CheckpointStorage, m: Metadata) -> Metadata:
    """`m` with every grid key's chunks located (format version 2 records none in the metadata).

    The writers' shard headers are read here, each checked against the size the metadata records,
    so a truncated file is reported as such before any of its bytes are compared.
    """
    if not m.grids:
        return m
    return dataclasses.replace(m, tensors={**m.tensors, **GridResolver(storage, m).all_records()})


def _kinds(m: Metadata) -> dict[str, str]:
    kinds = {k: f"{t.dtype}{list(t.shape)}" for k, t in m.tensors.items()}
    kinds.update({k: "value" for k in m.values})
    kinds.update({k: f"rank-local x{r.world_size}" for k, r in m.rank_local.items()})
    return kinds


def _value_entry(m: Metadata, key: str) -> Any:
    """What identifies a non-tensor entry's content: its typed JSON, or per rank (dtype, sizes, crcs) / value."""
    if key in m.values:
        return m.values[key]
    record = m.rank_local[key]
    return [
        (t[0], t[1].box.sizes, t[1].checksums) if t is not None else ("value", v)
        for t, v in zip(record.tensors, record.values)
    ]


def _compare_tensor(
    key: str,
    a: tuple[CheckpointStorage, Metadata],
    b: tuple[CheckpointStorage, Metadata],
    block_bytes: int,
    progress: Callable[[int], None] | None,
) -> TensorComparison:
    record = a[1].tensors[key]
    dtype = dtype_from_name(record.dtype, where=key)
    shape = tuple(record.shape)
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if shape else 1
    step = max(1, block_bytes // max(1, row_numel * 8))
    equal, worst = True, 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        xa = _read_rows(*a, key, dtype, r0, r1)
        xb = _read_rows(*b, key, dtype, r0, r1)
        if not torch.equal(xa.reshape(-1).view(torch.uint8), xb.reshape(-1).view(torch.uint8)):
            equal = False
            worst = max(worst, _max_abs_diff(xa, xb), key=lambda x: (math.isnan(x), x))
        if progress is not None:
            progress((r1 - r0) * row_numel * dtype.itemsize)
    return TensorComparison(key=key, equal=equal, max_abs_diff=worst)


def _max_abs_diff(xa: torch.Tensor, xb: torch.Tensor) -> float:
    if xa.is_complex():
        d = (xa.to(torch.complex128) - xb.to(torch.complex128)).abs()
    else:
        d = (xa.to(torch.float64) - xb.to(torch.float64)).abs()
    if d.numel() == 0:
        return 0.0
    return float("nan") if bool(d.isnan().any()) else float(d.max())


def _read_rows(
    storage: CheckpointStorage, m: Metadata, key: str, dtype: torch.dtype, r0: int, r1: int
) -> torch.Tensor:
    """Rows [r0, r1) of a tensor (the whole of a 0-d one), assembled from the chunks that hold them."""
    record: TensorRecord = m.tensors[key]
    shape = tuple(record.shape)
    if not shape:
        out = torch.empty((), dtype=dtype)
        for chunk in record.chunks:
            out.view(1).copy_(_chunk_bytes(storage, m, key, chunk, 0, chunk.nbytes).view(dtype))
        return out
    out = torch.empty((r1 - r0, *shape[1:]), dtype=dtype)
    for chunk in record.chunks:
        lo = max(r0, chunk.box.offsets[0])
        hi = min(r1, chunk.box.offsets[0] + chunk.box.sizes[0])
        if lo >= hi or chunk.nbytes == 0:
            continue
        row_bytes = chunk.nbytes // chunk.box.sizes[0]
        start = (lo - chunk.box.offsets[0]) * row_bytes
        data = _chunk_bytes(storage, m, key, chunk, start, (hi - lo) * row_bytes)
        piece = data.view(dtype).reshape(hi - lo, *chunk.box.sizes[1:])
        index = (slice(lo - r0, hi - r0),) + tuple(
            slice(o, o + n) for o, n in zip(chunk.box.offsets[1:], chunk.box.sizes[1:])
        )
        out[index].copy_(piece)
    return out


def _chunk_bytes(
    storage: CheckpointStorage, m: Metadata, key: str, chunk: ChunkRecord, start: int, n: int
) -> torch.Tensor:
    """Bytes [start, start + n) of a chunk, read in whole checksum blocks and verified."""
    block = m.checksum_block_bytes
    lo = start // block * block
    hi = min(-(-(start + n) // block) * block, chunk.nbytes)
    (data,) = storage.read_ranges(chunk.file, [(chunk.offset_bytes + lo, hi - lo)])
    for b in range(lo, hi, block):
        view = data[b - lo : min(b - lo + block, hi - lo)]
        if crc32c.crc32c(view) != chunk.checksums[b // block]:
            raise CorruptCheckpointError(
                f"{storage.url}: file {chunk.file}, key {key!r}: checksum mismatch in bytes "
                f"[{chunk.offset_bytes + b}, {chunk.offset_bytes + b + len(view)}); the file is corrupt"
            )
    return torch.frombuffer(data, dtype=torch.uint8)[start - lo : start - lo + n]
