"""Save planning: local plans, and the coordinator's global plan.

Each rank describes the chunks it holds (`LocalPlan`); the coordinator merges
all of them (`plan_global`): it checks that the ranks agree on keys, dtypes
and shapes, keeps one copy of every chunk that several ranks hold
(replicated tensors, `Replicate()` placements), gives each copy to the
holder with the fewest bytes so far, checks that each tensor's chunks tile
it exactly, and packs each rank's chunks into shard files of bounded size.
Everything here is plain data: a 4096-rank plan is computed in one process.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from planners.boxes import Box, tiling_problem
from planners.errors import InvalidStateDictError, PlanCoverageError
from planners.key_check import check_same_keys

# Keys listed in an error before it says "and N more".


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
