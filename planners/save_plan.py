"""Save planning records: local plans, write items, shard files; `plan_global`.

Each rank describes the chunks it holds (`LocalPlan`, built by `plan_local`
from plain `LocalChunk` descriptors; `checkpoint.save.local_plan` reads those off
the live tensors). A save then agrees its plan by exchanging structures
(`planners.global_plan`, over `checkpoint.save.plan_exchange`), and each rank
packs its writes into shard files of bounded size (`pack_files`).

`plan_global` merges full local plans in one place instead (a save no longer
calls it; tests do): it checks that the ranks agree on keys, dtypes and
shapes, keeps one copy of every chunk that several ranks hold (replicated
tensors, `Replicate()` placements), gives each copy to the holder with the
fewest bytes so far, and checks that each tensor's chunks tile it exactly.
Everything here is plain data: a 4096-rank plan is computed in one process.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from planners.boxes import Box, tiling_problem
from planners.errors import InvalidStateDictError, PlanCoverageError
from planners.key_check import check_same_keys
from planners.placement import Layout


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteItem:
    """One chunk a rank holds: `box` of tensor `fqn`, or a whole rank-local tensor."""

    fqn: str
    dtype: str
    global_shape: tuple[int, ...]
    box: Box
    nbytes: int
    rank_local: bool = False
    grid: bool = False  # a DTensor chunk recorded by its key's grid (format version 2), not by a chunk record


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalPlan:
    """What one rank holds, before deduplication."""

    rank: int
    items: tuple[WriteItem, ...]
    keys: tuple[str, ...]  # every key of the rank's state dict, sorted (an empty shard has no item)

    def fingerprint(self) -> str:
        """Stable digest of the plan: equal digests mean the plan can be reused."""
        return hashlib.sha256(repr(self).encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalChunk:
    """What one rank holds of one tensor key, as plain data (the tensor itself stays with the caller).

    Unlike a `WriteItem` (a chunk the plan writes), a `LocalChunk` is what the
    state dict holds, including a shard with no elements, and carries the
    key's layout, which the plan exchange needs to derive every rank's chunks.
    """

    fqn: str
    dtype: str  # dtype name (planners.dtypes), checked to be storable
    global_shape: tuple[int, ...]
    box: Box  # the part of the global tensor this rank holds
    nbytes: int  # bytes of the rank's local tensor
    layout: Layout | None = None  # a DTensor's layout; None: a plain tensor, held whole by every rank
    rank_local: bool = False  # a `RankLocal` tensor: this rank's own, saved whole


def plan_local(rank: int, chunks: Sequence[LocalChunk], *, other_keys: Iterable[str]) -> LocalPlan:
    """The local plan of one rank: a write item per held chunk, in the order given, and every key.

    Args:
        rank: the rank whose plan this is.
        chunks: the rank's tensor keys, one chunk each.
        other_keys: keys of its non-tensor leaves (values and rank-local values).
    """
    items = tuple(
        WriteItem(
            fqn=c.fqn,
            dtype=c.dtype,
            global_shape=c.global_shape,
            box=c.box,
            nbytes=c.nbytes,
            rank_local=c.rank_local,
        )
        for c in chunks
        if c.rank_local or c.nbytes or not c.box.numel  # a rank's empty shard holds nothing to write
    )
    keys = tuple(sorted([*(c.fqn for c in chunks), *other_keys]))
    return LocalPlan(rank=rank, items=items, keys=keys)


def chunk_layouts(chunks: Iterable[LocalChunk]) -> dict[str, Layout | None]:
    """The layout of every tensor key that is not rank-local (None for a plain tensor)."""
    return {c.fqn: c.layout for c in chunks if not c.rank_local}


@dataclass(frozen=True, slots=True, kw_only=True)
class FilePlan:
    """One shard file: its name stem and the chunks it holds, in file order."""

    stem: str
    items: tuple[WriteItem, ...]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)


@dataclass(frozen=True, slots=True, kw_only=True)
class RankPlan:
    """The coordinator's answer to one rank: which files it writes."""

    rank: int
    files: tuple[FilePlan, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalPlan:
    """All ranks' final plans plus what the metadata needs about each tensor."""

    world_size: int
    rank_plans: tuple[RankPlan, ...]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # fqn -> (dtype, global shape)
    # Version 2: the meshes and grid records of DTensor keys (see planners/grid.py); empty for plain saves.
    grid_fields: dict[str, Any] = field(default_factory=dict)
    # The union of every rank's nesting tree (planners.union); None: the coordinator's own tree is the whole.
    structure: Any = None


def plan_global(local_plans: Sequence[LocalPlan], *, max_file_bytes: int) -> GlobalPlan:
    """Merge the ranks' local plans into one deduplicated, balanced global plan.

    Raises:
        InvalidStateDictError: ranks disagree on keys, dtypes or shapes.
        PlanCoverageError: a tensor's chunks leave a gap or overlap.
    """
    if max_file_bytes <= 0:
        raise ValueError(f"max_file_bytes must be positive, got {max_file_bytes}")
    plans = sorted(local_plans, key=lambda p: p.rank)
    _check_same_keys(plans)
    tensors = _check_same_tensors(plans)
    assigned = _assign_writers(plans)
    boxes: dict[str, list[Box]] = defaultdict(list)
    for item in (i for rank_items in assigned for i in rank_items if not i.rank_local):
        boxes[item.fqn].append(item.box)
    for fqn, (_, shape) in tensors.items():
        problem = tiling_problem(shape, boxes[fqn])
        if problem is not None:
            raise PlanCoverageError(f"key {fqn!r}: {problem}; check the tensor's placements on every rank")
    rank_plans = tuple(
        RankPlan(rank=p.rank, files=pack_files(p.rank, items, max_file_bytes))
        for p, items in zip(plans, assigned)
    )
    return GlobalPlan(world_size=len(plans), rank_plans=rank_plans, tensors=tensors)


def _check_same_keys(plans: Sequence[LocalPlan]) -> None:
    check_same_keys([(p.rank, set(p.keys)) for p in plans])


def _check_same_tensors(plans: Sequence[LocalPlan]) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    first_rank: dict[str, int] = {}
    for p in plans:
        for item in p.items:
            if item.rank_local:
                continue
            seen = tensors.setdefault(item.fqn, (item.dtype, item.global_shape))
            first_rank.setdefault(item.fqn, p.rank)
            if seen != (item.dtype, item.global_shape):
                raise InvalidStateDictError(
                    f"key {item.fqn!r}: rank {first_rank[item.fqn]} has dtype {seen[0]} shape {list(seen[1])}, "
                    f"rank {p.rank} has dtype {item.dtype} shape {list(item.global_shape)}"
                )
    return tensors


def _assign_writers(plans: Sequence[LocalPlan]) -> list[list[WriteItem]]:
    """Give each distinct chunk to one holder, evening out bytes per rank."""
    index = {p.rank: i for i, p in enumerate(plans)}
    holders: dict[tuple[str, Box], list[int]] = defaultdict(list)
    items: dict[tuple[str, Box], WriteItem] = {}
    assigned: list[list[WriteItem]] = [[] for _ in plans]
    load = [0] * len(plans)
    for p in plans:
        for item in p.items:
            if item.rank_local:
                assigned[index[p.rank]].append(item)
                load[index[p.rank]] += item.nbytes
                continue
            key = (item.fqn, item.box)
            holders[key].append(index[p.rank])
            items[key] = item
    # Chunks only one rank holds bind that rank; place them before the shared ones.
    order = sorted(holders, key=lambda k: (len(holders[k]) > 1, -items[k].nbytes, k[0], k[1].offsets))
    for key in order:
        best = min(holders[key], key=lambda i: (load[i], i))
        assigned[best].append(items[key])
        load[best] += items[key].nbytes
    return assigned


def pack_files(rank: int, items: list[WriteItem], max_file_bytes: int) -> tuple[FilePlan, ...]:
    """Split a rank's chunks into files of at most `max_file_bytes` (a bigger chunk gets its own file)."""
    files: list[list[WriteItem]] = []
    size = 0
    for item in sorted(items, key=lambda i: (i.fqn, i.box.offsets)):
        if not files or (size + item.nbytes > max_file_bytes and files[-1]):
            files.append([])
            size = 0
        files[-1].append(item)
        size += item.nbytes
    return tuple(FilePlan(stem=f"r{rank:05d}-{n:03d}", items=tuple(f)) for n, f in enumerate(files))
