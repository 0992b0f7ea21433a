"""Reading the untrusted `meshes` of format version 2 into `Mesh` records, without expanding them.

A mesh written as `first_rank`/`rank_step` (`planners.grid.mesh_json`) stays a `range`:
its bounds are checked arithmetically, and rank lookups (`GridIndex.position`) use
`range.index`, so a few hundred bytes claiming 2**28 ranks cost nothing to refuse. An
explicit rank list must name distinct ranks of the world. Every mesh is capped at
`MAX_MESH_RANKS`, which bounds the per-mesh work a load does (positions, replica groups).
"""

from __future__ import annotations

import math
from typing import Any

from planners.global_plan import Mesh
from planners.grid import MAX_CUTS_PER_DIM

# Ranks in one mesh: ten times the largest jobs run today (about 100k accelerators); a replica
# group or an explicit rank list of this size stays in the tens of MB.
MAX_MESH_RANKS = 1 << 20


def parse_meshes(raw: Any, *, world_size: int, fail: Any) -> tuple[Mesh, ...]:
    """Validate the untrusted `meshes` list; `fail(problem)` raises.

    A mesh given by `first_rank`/`rank_step` stays a `range` (bounds checked arithmetically);
    an explicit list must be distinct ranks. Either way at most `MAX_MESH_RANKS` ranks.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_CUTS_PER_DIM:
        fail("meshes must be a list")
    out = []
    for i, m in enumerate(raw):
        shape = m.get("shape") if isinstance(m, dict) else None
        if not (
            isinstance(shape, list)
            and 1 <= len(shape) <= 16
            and all(type(n) is int and 1 <= n <= world_size for n in shape)
        ):
            fail(f"meshes[{i}].shape must list 1 to 16 sizes in [1, {world_size}]")
        n = math.prod(shape)
        if n > min(world_size, MAX_MESH_RANKS):
            limit = "the world size" if n > world_size else "the most a mesh may have"
            fail(f"meshes[{i}] has {n} ranks, more than {min(world_size, MAX_MESH_RANKS)} ({limit})")
        ranks = _mesh_ranks(m, n, world_size)
        if ranks is None:
            fail(f"meshes[{i}] must list {n} distinct ranks in [0, {world_size})")
        out.append(Mesh(shape=tuple(shape), ranks=ranks))
    return tuple(out)


def _mesh_ranks(m: dict, n: int, world_size: int) -> tuple[int, ...] | range | None:
    """The `n` ranks of mesh record `m` (None: malformed, repeated or outside the world)."""
    if "ranks" in m:
        ranks = m["ranks"]
        if not (isinstance(ranks, list) and len(ranks) == n and all(type(r) is int for r in ranks)):
            return None
        ok = len(set(ranks)) == n and all(0 <= r < world_size for r in ranks)
        return tuple(ranks) if ok else None
    first, step = m.get("first_rank"), m.get("rank_step")
    if type(first) is not int or type(step) is not int or step < 1:
        return None
    ranks = range(first, first + n * step, step)
    return ranks if first >= 0 and ranks[-1] < world_size else None
