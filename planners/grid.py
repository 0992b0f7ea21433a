"""Grid records (format version 2): one record per DTensor instead of one per chunk.

A DTensor saved from a regular layout is recorded by its mesh (shape and
the rank at each position) and placements. Everything a loader needs then
follows without a per-chunk list:

- the chunk boxes: per tensor dim, the cuts of the mesh dims that shard it
  (`planners.placement`), so a target box finds its overlapping chunks by
  bisection per dim, whatever the world size;
- the rank that wrote each chunk: its only holder, or, for a chunk several
  ranks hold, the shared greedy of `planners.global_plan.assign_shared`
  over the chunks those holders share (recomputed from the records);
- the bytes and checksums: in that rank's shard files, whose safetensors
  header names the chunk by its key and whose checksum entry
  (`CHECKSUM_ENTRY`) holds the block crcs. A loading rank reads only the
  headers of the files it reads data from.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planners.boxes import Box
from planners.dtypes import itemsize
from planners.global_plan import Mesh, WorldStructure, assign_shared, tensor_records
from planners.placement import (
    Layout,
    Placement,
    Replicate,
    Shard,
    StridedShard,
    apply_placement,
    chunk_box,
    position_of,
    replica_positions,
)
from planners.world_layout import compact_ranks, key_layouts

# The safetensors key of the U32 tensor, last in a version-2 shard file, that
# holds the crc32c of every checksum block of the file's other entries, in
# data order. Written last, so checksums are taken while the data streams.
CHECKSUM_ENTRY = "__shardsafe_crc32c__"
# More mesh positions than this along the dims sharding one tensor dim is a hostile file.
MAX_CUTS_PER_DIM = 1 << 20
# Bound on `_placement_steps` of one dim cut by strided shards (a few us per step; cached per
# distinct dim length and chain): FSDP over 4096 ranks of a TP-8 tensor takes about 3e5 steps
# (about a second); split 2**20 on 1024 ranks (2**30 steps, minutes) is a hostile file.
MAX_STRIDED_STEPS = 1 << 19


@dataclass(frozen=True, slots=True, kw_only=True)
class GridRecord:
    """A DTensor key of a version-2 checkpoint: its layout instead of its chunks."""

    dtype: str
    shape: tuple[int, ...]
    mesh: int  # index into the metadata's meshes
    placements: tuple[Placement, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Cell:
    """One saved chunk that a query overlaps: its box and the rank that wrote it."""

    box: Box
    writer: int


def placement_json(p: Placement) -> list[Any]:
    if isinstance(p, StridedShard):
        return ["strided_shard", p.dim, p.split_factor]
    if isinstance(p, Shard):
        return ["shard", p.dim]
    return ["replicate"]


def mesh_json(m: Mesh) -> dict[str, Any]:
    """A mesh; a rank list that is an arithmetic run is stored as its start and step."""
    r = m.ranks
    if isinstance(r, range):
        return {"shape": list(m.shape), "first_rank": r.start, "rank_step": r.step}
    step = r[1] - r[0] if len(r) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(r, r[1:])):
        return {"shape": list(m.shape), "first_rank": r[0], "rank_step": step}
    return {"shape": list(m.shape), "ranks": list(r)}


@functools.lru_cache(maxsize=1024)
def _cuts(
    length: int, chain: tuple[tuple[Placement, int], ...]
) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """(start, stop, sub-coordinate) of every non-empty piece of one dim, sorted by start.

    Cached: a model repeats a few (dim length, placement chain) pairs across thousands of keys.
    """
    sizes = tuple(n for _, n in chain)
    if math.prod(sizes) > MAX_CUTS_PER_DIM:
        raise ValueError(f"{math.prod(sizes)} pieces along one dim")
    if all(type(p) is Shard for p, _ in chain):
        return tuple(sorted(_nested_shards(0, length, sizes)))
    steps = _placement_steps(chain)
    if steps > MAX_STRIDED_STEPS:
        raise ValueError(f"{steps} placement steps (mesh positions x strided splits) along one dim")
    one_d = tuple(
        StridedShard(dim=0, split_factor=p.split_factor) if isinstance(p, StridedShard) else Shard(dim=0)
        for p, _ in chain
    )
    out: list[tuple[int, int, tuple[int, ...]]] = []
    _walk_chain([(0, length)] if length else [], one_d, sizes, (), out)
    return tuple(sorted(out))


def _placement_steps(chain: tuple[tuple[Placement, int], ...]) -> int:
    """An upper bound on the interval steps of `_walk_chain`, found before any walk: each level
    visits every position of the levels so far, cutting each of its (at most `intervals`) held
    intervals into the level's split pieces."""
    steps, positions, intervals = 0, 1, 1
    for p, n in chain:
        split = p.split_factor if isinstance(p, StridedShard) else 1
        positions *= n
        steps += positions * split * intervals
        intervals *= split
    return steps


def _walk_chain(
    held: list[tuple[int, int]],
    placements: tuple[Placement, ...],
    sizes: tuple[int, ...],
    sub: tuple[int, ...],
    out: list[tuple[int, int, tuple[int, ...]]],
) -> None:
    """Apply one mesh dim at a time, sharing each prefix of the chain across its sub-coordinates."""
    if not sizes:
        if len(held) > 1:
            raise ValueError(f"interleaved pieces {held[:4]}")
        if held:
            out.append((held[0][0], held[0][1], sub))
        return
    for i in range(sizes[0]):
        nxt = apply_placement(held, placements[0], sizes[0], i)
        if nxt:
            _walk_chain(nxt, placements[1:], sizes[1:], (*sub, i), out)


def _nested_shards(start: int, length: int, sizes: tuple[int, ...]) -> list[tuple[int, int, tuple[int, ...]]]:
    """Plain `Shard` chains: each mesh dim cuts every piece of the previous one as `torch.chunk` does."""
    if not sizes:
        return [(start, start + length, ())] if length else []
    full = -(-length // sizes[0])
    out = []
    for i in range(sizes[0]):
        lo = min(full * i, length)
        hi = min(lo + full, length)
        out += [(a, b, (i, *sub)) for a, b, sub in _nested_shards(start + lo, hi - lo, sizes[1:])]
    return out


class GridIndex:
    """Finds the saved chunks of grid records that overlap a box, and who wrote them."""

    def __init__(
        self,
        *,
        meshes: tuple[Mesh, ...],
        grids: Mapping[str, GridRecord],
        plain: Mapping[str, tuple[str, tuple[int, ...]]],
        world_size: int,
    ) -> None:
        self.meshes = meshes
        self.grids = dict(grids)
        self.plain = dict(plain)  # plain tensor keys: (dtype, shape); every rank holds them
        self.world_size = world_size
        self._cut_cache: dict[tuple, tuple[list[int], tuple]] = {}
        self._writers: dict[tuple[int, ...], dict[str, int]] = {}
        self._positions: dict[int, dict[int, int]] = {}

    def position(self, mesh: int, rank: int) -> int | None:
        """Where `rank` sits in mesh `mesh` (None: not in it); one dict per mesh, built once."""
        ranks = self.meshes[mesh].ranks
        if isinstance(ranks, range):  # arithmetic: no table for a mesh kept as a range
            return ranks.index(rank) if rank in ranks else None
        if mesh not in self._positions:
            self._positions[mesh] = {r: i for i, r in enumerate(ranks)}
        return self._positions[mesh].get(rank)

    def layout(self, g: GridRecord) -> Layout:
        m = self.meshes[g.mesh]
        return Layout(mesh_shape=m.shape, placements=g.placements, ranks=m.ranks)

    def _dim_cuts(self, g: GridRecord, d: int) -> tuple[list[int], tuple]:
        mesh_shape = self.meshes[g.mesh].shape
        chain = tuple(
            (p, mesh_shape[k])
            for k, p in enumerate(g.placements)
            if not isinstance(p, Replicate) and p.dim == d
        )
        key = (g.shape[d], chain)
        if key not in self._cut_cache:
            cuts = _cuts(g.shape[d], chain)
            self._cut_cache[key] = ([c[0] for c in cuts], cuts)
        return self._cut_cache[key]

    def chunk_stats(self, fqn: str) -> tuple[int, int]:
        """(saved chunks, elements) of `fqn`, from its cuts alone: no cell is enumerated."""
        g = self.grids[fqn]
        count = numel = 1
        for d in range(len(g.shape)):
            cuts = self._dim_cuts(g, d)[1]
            count *= len(cuts)
            numel *= sum(stop - start for start, stop, _ in cuts)
        return (count, numel) if count else (0, 0)

    def cells(self, fqn: str, query: Box) -> list[Cell]:
        """The saved chunks of `fqn` that overlap `query`, each with its writer rank."""
        g = self.grids[fqn]
        if query.numel == 0 or math.prod(g.shape) == 0:
            return []
        per_dim = []
        mesh_dims_of = []
        for d in range(len(g.shape)):
            starts, cuts = self._dim_cuts(g, d)
            lo = max(bisect.bisect_right(starts, query.offsets[d]) - 1, 0)
            hi = bisect.bisect_left(starts, query.end(d))
            per_dim.append([c for c in cuts[lo:hi] if c[1] > query.offsets[d]])
            mesh_dims_of.append(
                [k for k, p in enumerate(g.placements) if not isinstance(p, Replicate) and p.dim == d]
            )
        layout = self.layout(g)
        out = []
        for combo in itertools.product(*per_dim):
            coord = [0] * len(layout.mesh_shape)
            for d, (_, _, sub) in enumerate(combo):
                for k, c in zip(mesh_dims_of[d], sub):
                    coord[k] = c
            box = Box(offsets=tuple(c[0] for c in combo), sizes=tuple(c[1] - c[0] for c in combo))
            pos = position_of(coord, layout.mesh_shape)
            holders = tuple(sorted(layout.ranks[p] for p in replica_positions(layout, pos)))
            out.append(Cell(box=box, writer=self.writer(fqn, holders)))
        return out

    def writer(self, fqn: str, holders: tuple[int, ...]) -> int:
        """Who wrote `fqn`'s chunk held by `holders`: the same greedy the save ran."""
        if len(holders) == 1:
            return holders[0]
        if holders not in self._writers:
            self._writers[holders] = assign_shared(holders, self._shared_by(holders))
        return self._writers[holders][fqn]

    def _shared_by(self, holders: tuple[int, ...]) -> list[tuple[str, int]]:
        """Every non-empty chunk whose holders are exactly `holders` (one per key), as the save saw them."""
        first = holders[0]
        out = []
        everyone = len(holders) == self.world_size
        for fqn, (dtype, shape) in self.plain.items():
            if everyone and math.prod(shape):
                out.append((fqn, math.prod(shape) * itemsize(dtype)))
        for fqn, g in self.grids.items():
            pos = self.position(g.mesh, first)
            if pos is None or not math.prod(g.shape):
                continue
            layout = self.layout(g)
            mine = tuple(sorted(layout.ranks[p] for p in replica_positions(layout, pos)))
            if mine != holders:
                continue
            coord = _coordinate(pos, layout.mesh_shape)
            box = chunk_box(g.shape, layout.mesh_shape, coord, layout.placements)
            if box.numel:
                out.append((fqn, box.numel * itemsize(g.dtype)))
        return out


def _coordinate(pos: int, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(mesh_shape):
        pos, c = divmod(pos, n)
        out.append(c)
    return tuple(reversed(out))


def _placement(raw: Any, ndim: int) -> Placement | None:
    if not isinstance(raw, list) or not raw:
        return None
    kind, args = raw[0], raw[1:]
    if kind == "replicate" and not args:
        return Replicate()
    if not args or type(args[0]) is not int or not 0 <= args[0] < ndim:
        return None
    if kind == "shard" and len(args) == 1:
        return Shard(dim=args[0])
    if (
        kind == "strided_shard"
        and len(args) == 2
        and type(args[1]) is int
        and 1 <= args[1] <= MAX_CUTS_PER_DIM
    ):
        return StridedShard(dim=args[0], split_factor=args[1])
    return None


def parse_grid(
    key: str, raw: Any, *, dtype: str, shape: tuple[int, ...], index: GridIndex, fail: Any
) -> GridRecord:
    """Validate one untrusted `grid` entry against the meshes; its pieces must be boxes."""
    if (
        not isinstance(raw, dict)
        or type(raw.get("mesh")) is not int
        or not 0 <= raw["mesh"] < len(index.meshes)
    ):
        fail(f"key {key!r}: grid.mesh must index meshes")
    mesh = index.meshes[raw["mesh"]]
    placements = raw.get("placements")
    if not isinstance(placements, list) or len(placements) != len(mesh.shape):
        fail(f"key {key!r}: grid.placements must have one entry per mesh dim ({len(mesh.shape)})")
    parsed = tuple(_placement(p, len(shape)) for p in placements)
    if any(p is None for p in parsed):
        fail(f"key {key!r}: malformed placement in {str(placements)[:80]}")
    record = GridRecord(dtype=dtype, shape=shape, mesh=raw["mesh"], placements=parsed)  # type: ignore[arg-type]
    try:
        for d in range(len(shape)):
            index._dim_cuts(record, d)
    except ValueError as e:
        fail(f"key {key!r}: grid does not cut the tensor into boxes: {e}")
    return record


def unwritten_chunks_problem(index: GridIndex, file_ranks: set[int]) -> str | None:
    """A grid key with more saved chunks than its mesh has ranks owning a listed file, or None.

    Each rank holds one chunk of a DTensor, so a key of N non-empty chunks has N distinct writers,
    each of which must own a shard file. Checked arithmetically (chunk counts from the cuts, file
    owners counted per mesh), so a small file claiming millions of cells fails here, at parse time,
    instead of after the cells are enumerated and their headers looked for.
    """
    owners: dict[int, int] = {}
    for fqn, g in index.grids.items():
        if g.mesh not in owners:
            ranks = index.meshes[g.mesh].ranks
            members = ranks if isinstance(ranks, range) else frozenset(ranks)
            owners[g.mesh] = sum(1 for r in file_ranks if r in members)
        chunks, _ = index.chunk_stats(fqn)
        if chunks > owners[g.mesh]:
            return (
                f"key {fqn!r} is saved as {chunks} chunks, each written by a different rank of its mesh, "
                f"but only {owners[g.mesh]} rank(s) of that mesh own a listed shard file"
            )
    return None


def grid_json(g: GridRecord) -> dict[str, Any]:
    return {"mesh": g.mesh, "placements": [placement_json(p) for p in g.placements]}


def grid_fields(world: WorldStructure) -> dict[str, object]:
    """The metadata's `meshes` (interned) and the grid record of every key with a layout over the job:
    DTensor keys, and plain tensors held by some ranks only (`Replicate` over them;
    `planners.world_layout.key_layouts`)."""
    meshes: dict[Mesh, int] = {}
    by_ranks: dict[
        tuple[int, tuple[int, ...]], int
    ] = {}  # (id of a rank list, shape): hashing it costs O(world)
    grids = {}
    records = tensor_records(world)
    for fqn, layout in key_layouts(world).layouts.items():
        if layout is None:
            continue
        fast = (id(layout.ranks), layout.mesh_shape)
        m = by_ranks.get(fast)
        if m is None:
            mesh = Mesh(shape=layout.mesh_shape, ranks=compact_ranks(layout.ranks))  # one spelling per mesh
            m = by_ranks[fast] = meshes.setdefault(mesh, len(meshes))
        dtype, shape = records[fqn]
        grids[fqn] = GridRecord(dtype=dtype, shape=shape, mesh=m, placements=layout.placements)
    return {"meshes": tuple(meshes), "grids": dict(sorted(grids.items()))}
