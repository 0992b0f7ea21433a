"""Each tensor key's layout over the whole job, and the chunks every rank writes.

A rank's structure (`planners.global_plan.RankStructure`) says how *that
rank* holds each key. Real 3-D jobs hold keys in ways one mesh per key does
not describe:

- pipeline stages: a key lives on the ranks of one stage only, as a plain
  tensor or as a DTensor on the stage's mesh;
- sub-mesh replicas: FSDP over the `dp` dim of a `dp x tp` mesh gives each
  `tp` coordinate its own `dp` sub-mesh, and each sub-mesh holds a whole copy
  of the key (so do Lightning's `ModelParallelStrategy` defaults on one node,
  and experts on an expert-parallel sub-mesh beside the `dp` mesh).

`key_layouts` folds these into one `Layout` per key over the job, so that
the writer rule, the metadata's version-2 grid records and the loader keep
one description per key and the metadata stays flat in world size:

- a plain tensor held by every rank stays plain (`None`);
- a plain tensor held by some ranks (a stage's) is `Replicate` over them;
- a DTensor held on one mesh keeps it;
- a DTensor held on several disjoint meshes of one shape and placements
  gets one mesh with an extra `Replicate` dim across those groups: their
  boxes are identical replicas, each group covers the tensor. The extra dim
  goes last when that makes the rank list an arithmetic run (`dp` sub-meshes
  of a `dp x tp` mesh interleave into `range(0, 4)`), first otherwise.

Anything else (groups whose meshes overlap or differ in shape or
placements) is refused, naming the key and two ranks. `writes_of` then gives
each rank the chunks it writes: a chunk held by several ranks is written by
one of them, chosen by `planners.global_plan.assign_shared`, as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from planners.boxes import Box, full_box
from planners.dtypes import itemsize
from planners.errors import InvalidStateDictError
from planners.global_plan import (
    ChunkWrite,
    Mesh,
    TensorDescriptor,
    WorldStructure,
    assign_shared,
    plain_key_sets,
)
from planners.placement import Layout, Replicate, chunk_box, coordinate_of, replica_positions


@dataclass(frozen=True, slots=True, kw_only=True)
class WorldLayouts:
    """Every tensor key's layout over the job (`None`: a plain tensor held by every rank)."""

    layouts: dict[str, Layout | None]
    world_size: int
    # id(rank tuple) -> (the tuple, rank -> position): a rank list is scanned once, not per key.
    _positions: dict[int, tuple[Sequence[int], dict[int, int]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def position(self, layout: Layout, rank: int) -> int | None:
        """Where `rank` sits in `layout`'s mesh, or None (a range is solved, a tuple indexed once)."""
        ranks = layout.ranks
        if isinstance(ranks, range):
            return ranks.index(rank) if rank in ranks else None
        table = self._positions.get(id(ranks))
        if table is None or table[0] is not ranks:
            table = self._positions[id(ranks)] = (ranks, {r: i for i, r in enumerate(ranks)})
        return table[1].get(rank)


def key_layouts(world: WorldStructure) -> WorldLayouts:
    """One layout per tensor key over the job (cached on `world`).

    Raises:
        InvalidStateDictError: a key is plain on some ranks and a DTensor on others, or its
            meshes overlap or differ in shape or placements; the message names the key and ranks.
    """
    cached = world.memo.get("key_layouts")
    if cached is not None:
        return cached
    layouts = _plain_layouts(world)
    combined: dict[tuple[tuple[int, int], ...], tuple[Mesh, bool]] = {}
    by_fqn: dict[int, dict[str, TensorDescriptor]] = {}  # per structure, built once (a scan per key was quadratic)
    for fqn, key in _mesh_groups(world).items():
        if fqn in layouts:
            _refuse_mixed(world, fqn, key)
        first = world.structures[key[0][0]]
        if key[0][0] not in by_fqn:
            by_fqn[key[0][0]] = {t.fqn: t for t in first.tensors}
        t = by_fqn[key[0][0]][fqn]
        if len(key) == 1:
            mesh = first.meshes[key[0][1]]
            layouts[fqn] = Layout(mesh_shape=mesh.shape, placements=t.placements, ranks=mesh.ranks)
            continue
        if key not in combined:
            combined[key] = _combine(world, fqn, key)
        mesh, last = combined[key]
        placements = (*t.placements, Replicate()) if last else (Replicate(), *t.placements)
        layouts[fqn] = Layout(mesh_shape=mesh.shape, placements=placements, ranks=mesh.ranks)
    out = WorldLayouts(layouts=dict(sorted(layouts.items())), world_size=world.world_size)
    world.memo["key_layouts"] = out
    return out


def _plain_layouts(world: WorldStructure) -> dict[str, Layout | None]:
    """Plain keys: None where every rank holds them, else `Replicate` over their holders."""
    out: dict[str, Layout | None] = {}
    for fqn, structures in plain_key_sets(world).items():
        ranks = world.ranks_with(structures)
        if len(ranks) == world.world_size:
            out[fqn] = None
        else:
            out[fqn] = Layout(mesh_shape=(len(ranks),), placements=(Replicate(),), ranks=compact_ranks(ranks))
    return out


def _mesh_groups(world: WorldStructure) -> dict[str, tuple[tuple[int, int], ...]]:
    """DTensor key -> the distinct meshes holding it, each as (structure, mesh index) of its first holder."""
    interned: dict[Mesh, tuple[int, int]] = {}
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, s in enumerate(world.structures):
        ids = [interned.setdefault(mesh, (i, m)) for m, mesh in enumerate(s.meshes)]
        for t in s.tensors:
            if t.mesh is not None:
                holders = groups.setdefault(t.fqn, [])
                if ids[t.mesh] not in holders:
                    holders.append(ids[t.mesh])
    return {fqn: tuple(sorted(g)) for fqn, g in groups.items()}


def _refuse_mixed(world: WorldStructure, fqn: str, groups: tuple[tuple[int, int], ...]) -> None:
    plain = plain_key_sets(world)[fqn]
    a, b = world.representative(min(plain)), world.representative(groups[0][0])
    raise InvalidStateDictError(
        f"key {fqn!r}: rank {a} holds a plain tensor, rank {b} a DTensor; every rank that holds a key "
        "must hold it the same way"
    )


def _combine(world: WorldStructure, fqn: str, key: tuple[tuple[int, int], ...]) -> tuple[Mesh, bool]:
    """One mesh over several groups' meshes (equal shapes, disjoint ranks) with the groups' dim added,
    and whether that dim is the last one."""
    meshes = [world.structures[i].meshes[m] for i, m in key]
    first = meshes[0]
    owner = [world.representative(i) for i, _ in key]
    members: set[int] = set()
    for n, mesh in enumerate(meshes):
        if mesh.shape != first.shape:
            raise InvalidStateDictError(
                f"key {fqn!r}: rank {owner[0]} holds it on a mesh of shape {list(first.shape)}, rank "
                f"{owner[n]} on one of shape {list(mesh.shape)}; replicas of a key on different meshes "
                "must share the mesh shape and placements"
            )
        overlap = members.intersection(mesh.ranks)
        if overlap:
            raise InvalidStateDictError(
                f"key {fqn!r}: rank {min(overlap)} is in two meshes that hold the key (those of rank "
                f"{owner[0]} and rank {owner[n]}); the meshes of one key's replicas must not overlap"
            )
        members.update(mesh.ranks)
    order = sorted(meshes, key=lambda m: min(m.ranks))
    per = len(first.ranks)
    last = [order[g].ranks[p] for p in range(per) for g in range(len(order))]
    compact = compact_ranks(last)
    if isinstance(compact, range):
        return Mesh(shape=(*first.shape, len(order)), ranks=compact), True
    return Mesh(
        shape=(len(order), *first.shape), ranks=compact_ranks([r for m in order for r in m.ranks])
    ), False


def compact_ranks(ranks: Sequence[int]) -> tuple[int, ...] | range:
    """`ranks` as a range when it is an ascending arithmetic run (stored as two numbers), else a tuple."""
    if len(ranks) == 1:
        return range(ranks[0], ranks[0] + 1)
    step = ranks[1] - ranks[0]
    if step > 0 and all(b - a == step for a, b in zip(ranks, ranks[1:])):
        return range(ranks[0], ranks[-1] + 1, step)
    return tuple(ranks)


def writes_of(world: WorldStructure, rank: int) -> list[ChunkWrite]:
    """The chunks `rank` writes, in key order; computed from the structures alone.

    Raises:
        InvalidStateDictError: the rank is missing from a mesh it holds a tensor of.
    """
    layouts = key_layouts(world)
    s = world.structures[world.rank_structure[rank]]
    mine: list[ChunkWrite] = []
    shared: dict[tuple[int, ...], list[ChunkWrite]] = {}
    everyone = tuple(range(world.world_size))
    for t in s.tensors:
        layout = layouts.layouts[t.fqn]
        box, holders = _holders(layouts, layout, t.fqn, t.global_shape, rank, everyone)
        write = ChunkWrite(
            fqn=t.fqn,
            dtype=t.dtype,
            global_shape=t.global_shape,
            box=box,
            nbytes=box.numel * itemsize(t.dtype),
            grid=layout is not None,
        )
        if math.prod(t.global_shape) == 0:
            # An empty tensor: a plain one keeps one (empty) chunk record; a grid needs no chunk at all.
            if layout is None and holders[0] == rank:
                mine.append(write)
        elif box.numel == 0:
            continue
        elif len(holders) == 1:
            mine.append(write)
        else:
            shared.setdefault(holders, []).append(write)
    for holders, writes in shared.items():
        writers = assign_shared(holders, [(w.fqn, w.nbytes) for w in writes])
        mine += [w for w in writes if writers[w.fqn] == rank]
    return sorted(mine, key=lambda w: (w.fqn, w.box.offsets))


def _holders(
    layouts: WorldLayouts,
    layout: Layout | None,
    fqn: str,
    shape: tuple[int, ...],
    rank: int,
    everyone: tuple[int, ...],
) -> tuple[Box, tuple[int, ...]]:
    """This rank's box of a key and the ranks holding the same box (ascending)."""
    if layout is None:
        return full_box(shape), everyone
    pos = layouts.position(layout, rank)
    if pos is None:
        raise InvalidStateDictError(
            f"rank {rank} holds key {fqn!r} on a mesh of ranks {list(layout.ranks)[:16]} that lacks it"
        )
    box = chunk_box(shape, layout.mesh_shape, coordinate_of(pos, layout.mesh_shape), layout.placements)
    if not any(isinstance(p, Replicate) for p in layout.placements):
        return box, (rank,)
    return box, tuple(sorted(layout.ranks[p] for p in replica_positions(layout, pos)))
