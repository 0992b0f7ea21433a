"""Agreeing on a save plan by exchanging structures, not chunk lists.

Run on a save whose plan is not cached (the first save, or after any rank's
state dict changed). Four exchanges, each sized by the number of distinct
structures rather than by chunks x ranks:

1. gather: each rank's (plan fingerprint, structure digest), 2 x 64 bytes;
2. broadcast: the lowest rank of each distinct digest, and the rank ->
   structure table as run lengths;
3. gather: those representatives send their structure (others send None);
4. broadcast: the checked structures, or the error that names keys and ranks.

Then every rank computes its own writes (`planners.global_plan.writes_of`)
and packs them with its rank-local tensors into shard files. The
coordinator keeps the per-key records the metadata needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from checkpoint.collectives import COORDINATOR, Exchange
from planners.global_plan import (
    RankStructure,
    WorldStructure,
    from_run_lengths,
    grid_fields,
    run_lengths,
    structure_of,
    tensor_records,
    writes_of,
)
from planners.placement import Layout
from planners.save_plan import GlobalPlan, LocalPlan, RankPlan, WriteItem, pack_files
from planners.world_check import check_world


def local_structure(plan: LocalPlan, layouts: Mapping[str, Layout | None]) -> RankStructure:
    """This rank's structure: its tensor keys with their layouts, and its other keys."""
    tensors = {}
    for item in plan.items:
        if not item.rank_local:
            tensors[item.fqn] = (item.fqn, item.dtype, item.global_shape, layouts.get(item.fqn))
    others = [k for k in plan.keys if k not in tensors]
    return structure_of(list(tensors.values()), others)


def agree_world(
    structure: RankStructure, fingerprint: str, exchange: Exchange
) -> tuple[WorldStructure, list[str]]:
    """Exchanges 1-4 above (collective). Returns the checked world and, on the coordinator, every fingerprint.

    Raises:
        InvalidStateDictError: on every rank, when the structures disagree.
    """
    got = exchange.gather((fingerprint, structure.digest()))
    reps_msg = None
    if exchange.rank == COORDINATOR:
        assert got is not None
        reps_msg = _representatives([d for _, d in got])
    rep_ranks, runs = exchange.broadcast(reps_msg)
    sent = exchange.gather(structure if exchange.rank in rep_ranks else None)
    answer: Any = None
    if exchange.rank == COORDINATOR:
        assert sent is not None
        world = WorldStructure(
            structures=tuple(sent[r] for r in rep_ranks), rank_structure=from_run_lengths(runs)
        )
        try:
            check_world(world)
            answer = world.structures
        except Exception as e:  # travels to every rank, so all fail together
            answer = e
    answer = exchange.broadcast(answer)
    if isinstance(answer, BaseException):
        raise answer
    world = WorldStructure(structures=answer, rank_structure=from_run_lengths(runs))
    return world, [f for f, _ in got] if got is not None else []


def _representatives(digests: Sequence[str]) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    index: dict[str, int] = {}
    reps: list[int] = []
    table = []
    for rank, d in enumerate(digests):
        if d not in index:
            index[d] = len(reps)
            reps.append(rank)
        table.append(index[d])
    return tuple(reps), run_lengths(table)


def rank_plan(world: WorldStructure, plan: LocalPlan, *, rank: int, max_file_bytes: int) -> RankPlan:
    """This rank's files: the chunks it writes plus its rank-local tensors."""
    items = [
        WriteItem(
            fqn=w.fqn, dtype=w.dtype, global_shape=w.global_shape, box=w.box, nbytes=w.nbytes, grid=w.grid
        )
        for w in writes_of(world, rank)
    ]
    items += [i for i in plan.items if i.rank_local]
    return RankPlan(rank=rank, plan_id=world.plan_id(), files=pack_files(rank, items, max_file_bytes))


def draft_plan(world: WorldStructure) -> GlobalPlan:
    """What the coordinator's metadata needs of the plan: the tensor records (no per-rank files)."""
    return GlobalPlan(
        plan_id=world.plan_id(),
        world_size=world.world_size,
        rank_plans=(),
        tensors=tensor_records(world),
        grid_fields=grid_fields(world),
    )
