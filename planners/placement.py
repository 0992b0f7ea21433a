"""Placement math as plain data: which box of a global tensor a mesh coordinate holds.

A DTensor's layout is fully described by its global shape, its mesh shape and
its placements; the chunk a rank holds follows from its mesh coordinate. With
placements as plain records (`Shard`, `Replicate`, `StridedShard`), any rank
can compute the chunk of any other rank without torch and without talking to
it, which is what lets every rank derive the same global save plan, and lets
a 4096-rank layout be planned in one process.

The rule is torch's (`torch.chunk` splits, placements applied left to right
over mesh dims): each tensor dim keeps the list of global indices the rank
still holds, as a list of half-open intervals. `Shard(d)` keeps one
contiguous ceil-sized piece of that list; `StridedShard(d, split_factor=s)`
(FSDP2 over a TP-sharded tensor) first cuts the list into `s` pieces, cuts
each piece into mesh-dim-size parts and keeps the rank's part of every
piece. A chunk is a box only when every dim ends as one interval; an
interleaved result is refused (`IrregularPlacementError`), since the bytes
would not be one row-major block of the global tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from planners.boxes import Box
from planners.errors import InvalidStateDictError

Interval = tuple[int, int]  # [start, stop) in global indices of one dim


@dataclass(frozen=True, slots=True, kw_only=True)
class Shard:
    """Split tensor dim `dim` across one mesh dim (uneven splits as `torch.chunk` makes them)."""

    dim: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Replicate:
    """Every coordinate along the mesh dim holds the same values."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StridedShard:
    """torch's `_StridedShard`: shard `dim` after it was cut into `split_factor` pieces."""

    dim: int
    split_factor: int


Placement = Shard | Replicate | StridedShard


class IrregularPlacementError(InvalidStateDictError):
    """A layout gives some coordinate a chunk that is not one box of the global tensor."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """How one tensor is spread over a device mesh, as plain data.

    `ranks` lists the global rank at each mesh position in row-major order
    (what `DeviceMesh.mesh.flatten()` gives), so the holders of any chunk are
    known to every rank.
    """

    mesh_shape: tuple[int, ...]
    placements: tuple[Placement, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.placements) != len(self.mesh_shape):
            raise ValueError(f"{len(self.placements)} placements for a {len(self.mesh_shape)}-D mesh")
        if len(self.ranks) != math.prod(self.mesh_shape):
            raise ValueError(f"mesh of shape {list(self.mesh_shape)} lists {len(self.ranks)} ranks")


def _take(intervals: list[Interval], start: int, size: int) -> list[Interval]:
    """Positions [start, start + size) of the concatenated index list, as intervals."""
    out: list[Interval] = []
    pos = 0
    for lo, hi in intervals:
        n = hi - lo
        a, b = max(start - pos, 0), min(start + size - pos, n)
        if a < b:
            out.append((lo + a, lo + b))
        pos += n
    return out


def _chunk_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of part `index` when `torch.chunk` cuts `n` items into `parts`."""
    full = -(-n // parts) if parts else 0
    start = min(full * index, n)
    return start, max(min(start + full, n) - start, 0)


def _count(intervals: list[Interval]) -> int:
    return sum(hi - lo for lo, hi in intervals)


def apply_placement(
    intervals: list[Interval], placement: Placement, parts: int, index: int
) -> list[Interval]:
    """The indices kept at position `index` of a mesh dim of `parts` positions."""
    n = _count(intervals)
    if isinstance(placement, StridedShard):
        kept: list[Interval] = []
        for piece in range(placement.split_factor):
            p_start, p_size = _chunk_range(n, placement.split_factor, piece)
            q_start, q_size = _chunk_range(p_size, parts, index)
            kept += _take(intervals, p_start + q_start, q_size)
        return _merge(kept)
    start, size = _chunk_range(n, parts, index)
    return _take(intervals, start, size)


def _merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for lo, hi in intervals:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def held_indices(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
    placements: Sequence[Placement],
) -> list[list[Interval]]:
    """Per tensor dim, the global indices held at `coordinate`, as sorted disjoint intervals."""
    if not (len(mesh_shape) == len(coordinate) == len(placements)):
        raise ValueError("mesh_shape, coordinate and placements must have one entry per mesh dim")
    held: list[list[Interval]] = [[(0, n)] if n else [] for n in global_shape]
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if not 0 <= placement.dim < len(global_shape):
            raise ValueError(
                f"placement {placement} names dim {placement.dim} of a {len(global_shape)}-D tensor"
            )
        held[placement.dim] = apply_placement(
            held[placement.dim], placement, mesh_shape[mesh_dim], coordinate[mesh_dim]
        )
    return held


def chunk_box(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
    placements: Sequence[Placement],
) -> Box:
    """The box of the global tensor held at `coordinate` of the mesh.

    An empty chunk has size 0 and offset equal to the dim's length, as torch
    reports it.

    Example:
        >>> chunk_box((10, 4), (2, 2), (1, 0), (Shard(dim=0), Replicate()))
        Box(offsets=(5, 0), sizes=(5, 4))

    Raises:
        IrregularPlacementError: the held indices of some dim are not one interval.
    """
    return _chunk_box(tuple(global_shape), tuple(mesh_shape), tuple(coordinate), tuple(placements))


@functools.lru_cache(maxsize=1 << 16)
def _chunk_box(
    global_shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements: tuple[Placement, ...],
) -> Box:
    """Cached: a model repeats a few (shape, layout) pairs across thousands of keys."""
    offsets, sizes = [], []
    for d, intervals in enumerate(held_indices(global_shape, mesh_shape, coordinate, placements)):
        if len(intervals) > 1:
            raise IrregularPlacementError(
                f"placements {list(placements)} give mesh coordinate {list(coordinate)} the interleaved "
                f"indices {intervals[:4]} of dim {d} (shape {list(global_shape)}); save such a tensor "
                "after redistributing it to a Shard/Replicate layout"
            )
        lo, hi = intervals[0] if intervals else (global_shape[d], global_shape[d])
        offsets.append(lo)
        sizes.append(hi - lo)
    return Box(offsets=tuple(offsets), sizes=tuple(sizes))


def coordinate_of(position: int, mesh_shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major mesh coordinate of the `position`-th entry of a mesh's rank list."""
    coord = []
    for n in reversed(mesh_shape):
        position, c = divmod(position, n)
        coord.append(c)
    return tuple(reversed(coord))


def position_of(coordinate: Sequence[int], mesh_shape: Sequence[int]) -> int:
    """Inverse of `coordinate_of`."""
    pos = 0
    for c, n in zip(coordinate, mesh_shape):
        pos = pos * n + c
    return pos


def replica_positions(layout: Layout, position: int) -> tuple[int, ...]:
    """Mesh positions holding the same chunk as `position`: those differing only along Replicate dims."""
    free = tuple(d for d, p in enumerate(layout.placements) if isinstance(p, Replicate))
    return _replica_positions(layout.mesh_shape, free, position)


@functools.lru_cache(maxsize=1 << 16)
def _replica_positions(mesh_shape: tuple[int, ...], free: tuple[int, ...], position: int) -> tuple[int, ...]:
    coord = coordinate_of(position, mesh_shape)
    out = []
    for offset in range(math.prod(mesh_shape[d] for d in free)):
        c = list(coord)
        for d in reversed(free):
            offset, c[d] = divmod(offset, mesh_shape[d])
        out.append(position_of(c, mesh_shape))
    return tuple(sorted(out))
