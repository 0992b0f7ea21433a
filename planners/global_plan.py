"""Decentralized save planning: every rank derives its share of the global plan.

A rank's *structure* is what it holds, as plain data: per tensor its key,
dtype, global shape and layout (mesh shape, placements, the global rank at
each mesh position; none for a plain tensor), plus the keys of its values
and rank-local entries. Data-parallel replicas have equal structures;
pipeline stages and sub-mesh replicas differ. Given the few distinct structures and which rank has
which (`WorldStructure`), any rank can compute which chunk every rank holds
(`planners.placement`), so no rank needs another's chunk list:

1. Ranks exchange structure digests; one representative per distinct digest
   sends its structure (traffic per rank grows with distinct structures, not
   with chunks x ranks). The coordinator checks that structures agree
   (`check_world`) and broadcasts them.
2. Each rank calls `planners.world_layout.writes_of` for itself, which
   first resolves each key's layout over the job (pipeline stages and
   sub-mesh replicas included): a chunk held by several ranks
   (a `Replicate` mesh dim, a plain tensor) is written by one of its
   holders. The holders of a chunk all see the same ordered list of the
   chunks they share, so each runs the same greedy (largest chunk first, to
   the holder with the fewest bytes so far) and gets the same answer. The
   cost is the rank's own tensors times log(holders), whatever the world size.

Balance is per holder group: bytes a rank writes for other groups do not
enter this group's greedy, which keeps the rule local (the imbalance is at
most one chunk per group).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from planners.boxes import Box
from planners.errors import InvalidStateDictError
from planners.placement import Layout, Placement


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    """A device mesh as plain data: its shape and the global rank at each position (row-major)."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...] | range  # a range when parsed from first_rank/rank_step (planners.grid)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorDescriptor:
    """One tensor key of a rank's state dict; `mesh` indexes `RankStructure.meshes` (None: plain tensor)."""

    fqn: str
    dtype: str
    global_shape: tuple[int, ...]
    mesh: int | None = None
    placements: tuple[Placement, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RankStructure:
    """What one rank holds, without any chunk: equal on data-parallel replicas."""

    meshes: tuple[Mesh, ...]
    tensors: tuple[TensorDescriptor, ...]  # sorted by fqn
    other_keys: tuple[str, ...]  # values and rank-local keys, sorted

    def digest(self) -> str:
        """Stable digest; equal digests mean equal structures."""
        doc = [
            [[list(m.shape), list(m.ranks)] for m in self.meshes],
            [
                [t.fqn, t.dtype, list(t.global_shape), t.mesh, [repr(p) for p in t.placements]]
                for t in self.tensors
            ],
            list(self.other_keys),
        ]
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()

    def layout(self, t: TensorDescriptor) -> Layout | None:
        if t.mesh is None:
            return None
        m = self.meshes[t.mesh]
        return Layout(mesh_shape=m.shape, placements=t.placements, ranks=m.ranks)


def structure_of(
    tensors: Sequence[tuple[str, str, tuple[int, ...], Layout | None]], other_keys: Sequence[str]
) -> RankStructure:
    """Build a rank's structure from (fqn, dtype name, global shape, layout) entries; meshes are interned."""
    meshes: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    # Layouts of one DeviceMesh share its rank tuple: look it up by identity first, since hashing
    # a rank tuple costs O(world size) and a model has thousands of tensors on one mesh.
    by_id: dict[tuple[int, tuple[int, ...]], int] = {}
    descs = []
    for fqn, dtype, shape, layout in sorted(tensors, key=lambda t: t[0]):
        mesh = None
        if layout is not None:
            fast = (id(layout.ranks), layout.mesh_shape)
            mesh = by_id.get(fast)
            if mesh is None:
                mesh = by_id[fast] = meshes.setdefault((layout.mesh_shape, layout.ranks), len(meshes))
        descs.append(
            TensorDescriptor(
                fqn=fqn,
                dtype=dtype,
                global_shape=tuple(shape),
                mesh=mesh,
                placements=layout.placements if layout is not None else (),
            )
        )
    return RankStructure(
        meshes=tuple(Mesh(shape=s, ranks=r) for (s, r) in meshes),
        tensors=tuple(descs),
        other_keys=tuple(sorted(other_keys)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorldStructure:
    """The distinct structures of a job and which rank has which (`rank_structure[rank]`)."""

    structures: tuple[RankStructure, ...]
    rank_structure: tuple[int, ...]
    _ranks_of: dict[frozenset[int], tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)
    _positions: dict[tuple[int, int], dict[int, int]] = field(default_factory=dict, compare=False, repr=False)
    # Derived once per world by pure functions of it (`planners.world_layout.key_layouts`).
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return len(self.rank_structure)

    def representative(self, index: int) -> int:
        """The lowest rank with structure `index` (named in errors)."""
        return self.rank_structure.index(index)

    def ranks_with(self, indices: frozenset[int]) -> tuple[int, ...]:
        """Ranks whose structure is one of `indices`, ascending (cached: O(world size) once per set)."""
        if indices not in self._ranks_of:
            self._ranks_of[indices] = tuple(r for r, s in enumerate(self.rank_structure) if s in indices)
        return self._ranks_of[indices]

    def position(self, t: TensorDescriptor, index: int, rank: int) -> int:
        """Where `rank` sits in the mesh of `t` (cached per mesh: a rank list is scanned once)."""
        assert t.mesh is not None
        ranks = self.structures[index].meshes[t.mesh].ranks
        key = (index, t.mesh)  # not the rank tuple: hashing it costs O(world size)
        table = self._positions.get(key)
        if table is None:
            table = self._positions[key] = {r: i for i, r in enumerate(ranks)}
        if rank not in table:
            raise InvalidStateDictError(
                f"rank {rank} holds key {t.fqn!r} on a mesh of ranks {list(ranks)[:16]} that lacks it"
            )
        return table[rank]


def run_lengths(values: Sequence[int]) -> list[tuple[int, int]]:
    """`values` as (value, count) runs: a rank table of a pipeline job is a handful of runs."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


def from_run_lengths(runs: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    return tuple(v for v, n in runs for _ in range(n))


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkWrite:
    """A chunk this rank writes: `box` of tensor `fqn`."""

    fqn: str
    dtype: str
    global_shape: tuple[int, ...]
    box: Box
    nbytes: int
    grid: bool = False  # a DTensor chunk: recorded by its key's grid, not by a chunk record


def plain_key_sets(world: WorldStructure) -> dict[str, frozenset[int]]:
    """For each plain tensor key, the structures that hold it."""
    sets: dict[str, set[int]] = {}
    for i, s in enumerate(world.structures):
        for t in s.tensors:
            if t.mesh is None:
                sets.setdefault(t.fqn, set()).add(i)
    return {k: frozenset(v) for k, v in sets.items()}


def assign_shared(holders: tuple[int, ...], chunks: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Writer of each (fqn, nbytes) chunk that all of `holders` hold: largest first, to the holder
    with the fewest bytes so far (ties: the lower rank). Saving and loading both call this."""
    heap = [(0, i) for i in range(len(holders))]
    out = {}
    for fqn, nbytes in sorted(chunks, key=lambda c: (-c[1], c[0])):
        load, i = heapq.heappop(heap)
        out[fqn] = holders[i]
        heapq.heappush(heap, (load + nbytes, i))
    return out


def tensor_records(world: WorldStructure) -> dict[str, tuple[str, tuple[int, ...]]]:
    """fqn -> (dtype, global shape) of every tensor key, across structures (after `check_world`)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for s in world.structures:
        for t in s.tensors:
            out.setdefault(t.fqn, (t.dtype, t.global_shape))
    return dict(sorted(out.items()))
