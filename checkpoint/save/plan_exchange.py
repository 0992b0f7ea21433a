"""Agreeing on a save plan by exchanging structures, not chunk lists.

Run on a save whose plan is not cached (the first save, or after any rank's
state dict changed). Four exchanges, each sized by the number of distinct
structures rather than by chunks x ranks:

1. gather: each rank's (plan fingerprint, structure digest, digest of its
   small plain tensors' values), 3 x 64 bytes;
2. broadcast: the lowest rank of each distinct structure digest, the rank ->
   structure table as run lengths, and the lowest rank of each distinct
   (structure, values) pair;
3. gather: those representatives send their structure, nesting tree and
   values (a stage's values rank 0 lacks), and the value representatives
   their per-key digests of small plain tensors (others None);
4. broadcast: the checked structures, or the error that names keys and ranks.

The coordinator keeps the union of the trees for the metadata, and warns
about plain tensors whose values differ between ranks (`planners.union`).

Before any of these, the first exchange of every save (`checkpoint.save.protocol`)
carries each rank's path, as `comparable_path` spells it, so that ranks
passing different paths all fail (`path_mismatch`) before anything is written.

Then every rank computes its own writes (`planners.world_layout.writes_of`)
and packs them with its rank-local tensors into shard files. The
coordinator keeps the per-key records the metadata needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from checkpoint.save.collectives import COORDINATOR, Exchange
from planners.boxes import tiling_problem
from planners.errors import CheckpointPathError, PlanCoverageError
from planners.global_plan import (
    RankStructure,
    WorldStructure,
    from_run_lengths,
    run_lengths,
    structure_of,
    tensor_records,
)
from planners.grid import grid_fields
from planners.placement import Layout
from planners.save_plan import GlobalPlan, LocalPlan, RankPlan, WriteItem, pack_files
from planners.union import replica_mismatches, union_tree
from planners.values import JSON
from planners.world_check import check_world
from planners.world_layout import writes_of
from storage.redact import display_url

logger = logging.getLogger(__name__)


def local_structure(
    plan: LocalPlan, layouts: Mapping[str, Layout | None], *, rank: int
) -> RankStructure | PlanCoverageError:
    """This rank's structure: its tensor keys with their layouts, and its other keys.

    Each chunk the rank holds must be the one its layout implies (the whole
    tensor for a plain one); otherwise the error is returned, to travel in
    the first exchange.
    """
    tensors = {}
    for item in plan.items:
        if not item.rank_local:
            layout = layouts.get(item.fqn)
            problem = _chunk_problem(item, layout)
            if problem is not None:
                return PlanCoverageError(
                    f"key {item.fqn!r}: {problem} (rank {rank}); check the tensor's placements"
                )
            tensors[item.fqn] = (item.fqn, item.dtype, item.global_shape, layout)
    others = [k for k in plan.keys if k not in tensors]
    return structure_of(list(tensors.values()), others)


def _chunk_problem(item: WriteItem, layout: Layout | None) -> str | None:
    """A plain tensor's chunk must be the whole tensor. A DTensor's box was derived from its
    layout when flattened (checkpoint/state/descriptors.py), which also checked the local shape."""
    if layout is None:
        return tiling_problem(item.global_shape, [item.box])
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class AgreedWorld:
    """The outcome of the exchange: the checked world, and on the coordinator what the metadata needs."""

    world: WorldStructure
    fingerprints: list[str]  # coordinator only: every rank's plan fingerprint
    tree: JSON = None  # coordinator only: the union of every structure's nesting (`planners.union`)
    values: dict[str, JSON] = field(default_factory=dict)  # coordinator only: values its own dict lacks


def agree_world(
    structure: RankStructure | BaseException,
    fingerprint: str,
    exchange: Exchange,
    *,
    tree: JSON = None,
    digests: Mapping[str, str] | None = None,
    values: Mapping[str, JSON] | None = None,
) -> AgreedWorld:
    """Exchanges 1-4 above (collective). Returns the checked world; on the coordinator also every
    fingerprint and the union of the ranks' nesting `tree`s.

    A rank whose own plan is inconsistent passes its error as `structure`; it
    travels in the first exchange, so every rank raises it. `digests` (key ->
    digest of a small plain tensor's bytes) are compared across ranks: the
    coordinator warns about keys whose values differ (`planners.union`).

    Raises:
        InvalidStateDictError: on every rank, when the structures disagree.
    """
    digests = dict(digests or {})
    values_digest = hashlib.sha256(repr(sorted(digests.items())).encode()).hexdigest()
    mine = (
        structure
        if isinstance(structure, BaseException)
        else (fingerprint, structure.digest(), values_digest)
    )
    got = exchange.gather(mine)
    reps_msg: Any = None
    if exchange.rank == COORDINATOR:
        assert got is not None
        errors = [e for e in got if isinstance(e, BaseException)]
        reps_msg = errors[0] if errors else _representatives([(d, v) for _, d, v in got])
    reps_msg = exchange.broadcast(reps_msg)
    if isinstance(reps_msg, BaseException):
        raise reps_msg
    assert isinstance(structure, RankStructure)
    rep_ranks, runs, value_ranks = reps_msg
    rep = exchange.rank in rep_ranks
    sent = exchange.gather(
        (
            structure if rep else None,
            tree if rep else None,
            digests if exchange.rank in value_ranks else None,
            dict(values or {}) if rep else None,
        )
    )
    answer: Any = None
    union: JSON = None
    others: dict[str, JSON] = {}
    if exchange.rank == COORDINATOR:
        assert sent is not None
        world = WorldStructure(
            structures=tuple(sent[r][0] for r in rep_ranks), rank_structure=from_run_lengths(runs)
        )
        try:
            check_world(world)
            answer = world.structures
            union = union_tree([sent[r][1] for r in rep_ranks])
            own = sent[COORDINATOR][3]
            for r in rep_ranks:  # values of other stages that the coordinator's own dict lacks
                others.update((k, v) for k, v in sent[r][3].items() if k not in own and k not in others)
            for message in replica_mismatches([(r, sent[r][2]) for r in value_ranks]):
                logger.warning("%s", message)
                warnings.warn(message, UserWarning, stacklevel=2)
        except Exception as e:  # travels to every rank, so all fail together
            answer = e
    answer = exchange.broadcast(answer)
    if isinstance(answer, BaseException):
        raise answer
    world = WorldStructure(structures=answer, rank_structure=from_run_lengths(runs))
    fingerprints = [f for f, _, _ in got] if got is not None else []
    return AgreedWorld(world=world, fingerprints=fingerprints, tree=union, values=others)


def _representatives(
    digests: Sequence[tuple[str, str]],
) -> tuple[tuple[int, ...], list[tuple[int, int]], tuple[int, ...]]:
    """The lowest rank of each distinct structure, the rank -> structure runs, and the lowest rank of each
    distinct (structure, values) pair: those send their value digests, so every distinct value is seen."""
    index: dict[str, int] = {}
    reps: list[int] = []
    table = []
    pairs: dict[tuple[str, str], int] = {}
    for rank, (d, v) in enumerate(digests):
        if d not in index:
            index[d] = len(reps)
            reps.append(rank)
        table.append(index[d])
        pairs.setdefault((d, v), rank)
    return tuple(reps), run_lengths(table), tuple(sorted(pairs.values()))


def rank_plan(world: WorldStructure, plan: LocalPlan, *, rank: int, max_file_bytes: int) -> RankPlan:
    """This rank's files: the chunks it writes plus its rank-local tensors."""
    items = [
        WriteItem(
            fqn=w.fqn, dtype=w.dtype, global_shape=w.global_shape, box=w.box, nbytes=w.nbytes, grid=w.grid
        )
        for w in writes_of(world, rank)
    ]
    items += [i for i in plan.items if i.rank_local]
    return RankPlan(rank=rank, files=pack_files(rank, items, max_file_bytes))


def draft_plan(world: WorldStructure, tree: JSON = None) -> GlobalPlan:
    """What the coordinator's metadata needs of the plan: the tensor records (no per-rank files), and
    the union of the ranks' nesting `tree`s (None: the coordinator's own is the whole)."""
    return GlobalPlan(
        world_size=world.world_size,
        rank_plans=(),
        tensors=tensor_records(world),
        grid_fields=grid_fields(world),
        structure=tree,
    )


def comparable_path(url: str) -> str:
    """The path as this rank resolves it: two spellings of one directory compare equal."""
    return url.rstrip("/") if "://" in url else os.path.abspath(url)


def path_mismatch(urls: Sequence[str], *, call: str = "save()") -> CheckpointPathError | None:
    """The error for ranks that passed different paths to one `call` (every rank must pass the same)."""
    other = next((r for r, url in enumerate(urls) if url != urls[COORDINATOR]), None)
    if other is None:
        return None
    return CheckpointPathError(
        f"the ranks passed different paths to {call}: rank {COORDINATOR} {display_url(urls[COORDINATOR])!r}, "
        f"rank {other} {display_url(urls[other])!r}; every rank must pass the same checkpoint directory "
        "(one checkpoint holds every rank's shards: do not put the rank in the path)"
    )
