"""Comparing two checkpoints without loading either: `diff_checkpoints(a, b)` (and `shardsafe diff`).

Both checkpoints may be larger than memory and saved by different world sizes,
so tensors are compared block by block, each block at most `block_bytes` of
float64 (the width the differences are computed in). A block is a box that
is one contiguous run of the tensor in row-major order: it fixes a single
index of every dim before some dim d, takes a range along d and spans every
dim after d completely (`_blocks`). Cut that way, a wide row is split too,
and each saved chunk the block overlaps contributes one contiguous byte
range, so memory is bounded by a few blocks, not by a row, a chunk or the
checkpoint.

Each block is read as a load reads a box (`checkpoint.load.chunk_reader.ChunkReader`):
the same plan, the same grid resolution for DTensor keys of format version 2
(their chunks found in the writers' shard headers), the same checks of file
sizes and CRC-32C blocks before any byte is compared.

Non-tensor values are compared as their stored typed JSON (so nothing is
unpickled); rank-local entries by their per-rank checksums and values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from checkpoint.load.chunk_reader import ChunkReader
from checkpoint.load.loader import read_metadata
from checkpoint.state.dtypes import dtype_from_name
from planners.boxes import Box
from planners.load_plan import LoadTarget
from planners.metadata import Metadata
from storage.backend import CheckpointStorage
from storage.spec import StorageSpec, specs_for

# Each block of a tensor, widened to float64 for the difference, stays under this.
BLOCK_BYTES = 64 * 1024 * 1024
# Files each side reads at the same time within one block.
_READ_THREADS = 4


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
    ma, mb = read_metadata(sa), read_metadata(sb)
    ra = ChunkReader(sa, ma, verify=True, io_threads=_READ_THREADS)
    rb = ChunkReader(sb, mb, verify=True, io_threads=_READ_THREADS)
    kinds_a, kinds_b = _kinds(ma), _kinds(mb)
    both = sorted(kinds_a.keys() & kinds_b.keys())
    same = [k for k in both if kinds_a[k] == kinds_b[k]]
    return DiffReport(
        only_in_a=tuple(sorted(kinds_a.keys() - kinds_b.keys())),
        only_in_b=tuple(sorted(kinds_b.keys() - kinds_a.keys())),
        changed=tuple(Changed(key=k, a=kinds_a[k], b=kinds_b[k]) for k in both if kinds_a[k] != kinds_b[k]),
        tensors=tuple(_compare_tensor(k, ra, rb, block_bytes, progress) for k in same if k in ma.tensors),
        values={k: _value_entry(ma, k) == _value_entry(mb, k) for k in same if k not in ma.tensors},
    )


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
    a: ChunkReader,
    b: ChunkReader,
    block_bytes: int,
    progress: Callable[[int], None] | None,
) -> TensorComparison:
    record = a.metadata.tensors[key]
    dtype = dtype_from_name(record.dtype, where=key)
    equal, worst = True, 0.0
    for box in _blocks(tuple(record.shape), max(1, block_bytes // 8)):
        xa, xb = _read_box(a, key, dtype, box), _read_box(b, key, dtype, box)
        if not torch.equal(xa.reshape(-1).view(torch.uint8), xb.reshape(-1).view(torch.uint8)):
            equal = False
            worst = max(worst, _max_abs_diff(xa, xb), key=lambda x: (math.isnan(x), x))
        if progress is not None:
            progress(box.numel * dtype.itemsize)
    return TensorComparison(key=key, equal=equal, max_abs_diff=worst)


def _max_abs_diff(xa: torch.Tensor, xb: torch.Tensor) -> float:
    if xa.is_complex():
        d = (xa.to(torch.complex128) - xb.to(torch.complex128)).abs()
    else:
        d = (xa.to(torch.float64) - xb.to(torch.float64)).abs()
    if d.numel() == 0:
        return 0.0
    return float("nan") if bool(d.isnan().any()) else float(d.max())


def _blocks(shape: tuple[int, ...], max_numel: int) -> Iterator[Box]:
    """Boxes of at most `max_numel` elements (at least one) tiling `shape`, each one row-major run.

    d is the first dim whose trailing dims (after it) fit in `max_numel`; a block fixes one index
    of each dim before d, takes up to `max_numel // inner` indices of d and all of the dims after.
    """
    if math.prod(shape) == 0:
        return
    d, inner = len(shape), 1
    while d > 0 and inner * shape[d - 1] <= max_numel:
        d -= 1
        inner *= shape[d]
    if d == 0:  # the whole tensor (a 0-d one too) fits in one block
        yield Box(offsets=(0,) * len(shape), sizes=shape)
        return
    d -= 1  # the dim the blocks take ranges of; the dims after it are whole in every block
    step = max(1, max_numel // inner)
    for lead in itertools.product(*(range(n) for n in shape[:d])):
        for start in range(0, shape[d], step):
            size = min(step, shape[d] - start)
            yield Box(
                offsets=(*lead, start) + (0,) * (len(shape) - d - 1), sizes=(1,) * d + (size, *shape[d + 1 :])
            )


def _read_box(reader: ChunkReader, key: str, dtype: torch.dtype, box: Box) -> torch.Tensor:
    """One block of a saved tensor, as a load reads a box: planned, sizes checked, checksums verified."""
    record = reader.metadata.tensors[key]
    target = LoadTarget(fqn=key, dtype=dtype, global_shape=tuple(record.shape), box=box)
    items = reader.plan(target, record)
    for item in items:  # the file must hold the bytes before anything is read from it
        reader.require_bytes(key, item.chunk)
    out = torch.empty(box.sizes, dtype=dtype)
    reader.run([(item, out) for item in items])
    return out
