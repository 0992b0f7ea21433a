"""The save protocol over the exchange, in the order every rank runs it.

1. `checkpoint.save.local_plan.describe_local`: this rank's local plan from its
   live tensors (pure planning in `planners.save_plan`), its encoded values.
2. `prepare_save` (`plan_save` runs steps 1 and 2): the coordinator learns
   whether every rank's plan digest matches the cached global plan; only if
   not are structures exchanged and every rank's files derived again
   (`checkpoint.save.plan_exchange`). The coordinator also checks the path and
   writes this save's in-progress marker (`checkpoint.save.lease`) before any rank
   writes a shard file. The first exchange carries every rank's path too, so
   ranks that passed different paths all fail; a save refused here removes
   the directories the coordinator created for it.
3. `checkpoint.save.shard_files.write_rank_files`: each rank streams its shard files (any process: the
   trainer for a sync save; for an async one the writer process, from the
   copy `checkpoint.async_writer.staging` made) through `storage.safetensors_io`, which
   checksums every block as it writes, and reports a `RankWriteResult`.
4. `checkpoint.save.commit.commit_save`: write results go to the coordinator,
   which checks every reported file's stored size, assembles the metadata
   (`planners.metadata_build`) and writes it last (without replacing one
   unless the save passed overwrite=True); every rank learns the outcome, so
   all raise together. A save refused there takes back its shard files, its
   marker and the directories it created (`checkpoint.save.abort`).

Every rank joins every exchange even after a local failure; the failure
travels in the exchange instead of leaving the others waiting. The records
that travel to the coordinator (`RankWriteResult`, `WrittenChunk`,
`MetadataDraft`) are plain data in `planners.metadata_build`.
"""

from __future__ import annotations

import logging
import pickle
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from checkpoint.options import SaveOptions
from checkpoint.save import lease
from checkpoint.save.collectives import COORDINATOR, Exchange, ProcessGroupExchange
from checkpoint.save.local_plan import LocalSave, describe_local, describe_or_error, value_digests
from checkpoint.save.plan_exchange import (
    agree_world,
    comparable_path,
    draft_plan,
    local_structure,
    path_mismatch,
    rank_plan,
)
from planners.errors import (
    CheckpointError,
    CheckpointExistsError,
    DistributedCheckpointError,
)
from planners.metadata import METADATA_FILE
from planners.metadata_build import MetadataDraft, RankWriteResult, WrittenChunk
from planners.save_plan import FilePlan, GlobalPlan, RankPlan
from planners.union import value_senders
from planners.values import JSON
from storage.backend import CheckpointStorage

logger = logging.getLogger(__name__)

# `LocalSave`, `describe_local`, `describe_or_error` (checkpoint.save.local_plan) and the records of
# planners.metadata_build were defined here before; they stay importable from this module.
__all__ = [
    "LocalSave",
    "MetadataDraft",
    "PlanCache",
    "PreparedSave",
    "RankWriteResult",
    "WrittenChunk",
    "describe_local",
    "describe_or_error",
    "plan_save",
    "portable_error",
    "prepare_save",
    "timed",
]


# Random bytes of each save's commit secret (128 bits: not guessable within a save's lifetime).
COMMIT_SECRET_BYTES = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedSave:
    """Everything a rank needs to write and commit one save, once the plan is agreed.

    It is picklable, because it travels to the async writer process, so it holds
    no tensors, storage or threads. The trainer-side record around it is
    `checkpoint.save.pipeline.PlannedSave`, which adds what cannot travel (the
    tensors, the resolved storage, the coordinator's lease keeper).
    """

    url: str
    save_id: str
    rank: int
    world_size: int
    files: tuple[FilePlan, ...]
    rank_local_values: dict[str, JSON]
    draft: MetadataDraft | None  # coordinator only
    plan_reused: bool = False
    overwrite: bool = False  # the commit may replace an existing metadata file
    # Seals the async commit's store exchange (`checkpoint.save.collectives.StoreExchange`): hex of random bytes
    # that reach the ranks over the job's process group only, never a file, a marker or a log line.
    commit_secret: str = field(default="", repr=False)
    # The directories the coordinator's `prepare()` created for this save (coordinator only): a save
    # that fails after writing removes them once they are empty again (`checkpoint.save.abort`).
    created_dirs: tuple[str, ...] = ()
    # Incremental saves (`checkpoint.save.incremental.IncrementalPlan`): the base's chunks at this rank's boxes.
    incremental: Any = None


@dataclass(slots=True)
class PlanCache:
    """The last global plan, reused while no rank's plan digest changes."""

    digests: list[str] | None = None  # coordinator only
    rank_plan: RankPlan | None = None
    draft_plan: GlobalPlan | None = None  # coordinator only
    # Values the coordinator's state dict lacks (a pipeline stage's optimizer param_groups) travel to it
    # in every save's first exchange, from the lowest rank holding each (`planners.union.value_senders`).
    value_keys: tuple[str, ...] = ()  # the keys this rank sends
    extra_values: dict[str, JSON] | None = None  # coordinator only: what this save's ranks sent


@dataclass(frozen=True, slots=True, kw_only=True)
class _Decision:
    save_id: str
    reuse: bool
    commit_secret: str = field(default="", repr=False)
    created_dirs: tuple[str, ...] = ()
    error: BaseException | None = None
    failures: dict[int, BaseException] = field(default_factory=dict)


def portable_error(e: BaseException) -> BaseException:
    """`e` if it survives pickling (it travels to other ranks), else a CheckpointError with its text."""
    try:
        pickle.loads(pickle.dumps(e))  # allow_pickle: our own exception object, never a file
        return e
    except Exception:
        return CheckpointError(f"{type(e).__name__}: {e}")


def _raise_failures(rank: int, failures: Mapping[int, BaseException], url: str) -> None:
    if not failures:
        return
    if rank in failures:
        raise failures[rank]
    raise DistributedCheckpointError(
        f"save to {url} failed on rank(s) {sorted(failures)}; nothing was committed",
        {r: f"{type(e).__name__}: {e}" for r, e in failures.items()},
    )


def prepare_save(
    local: LocalSave | BaseException,
    exchange: Exchange,
    storage: CheckpointStorage,
    cache: PlanCache,
    *,
    overwrite: bool,
    max_file_bytes: int,
    lease_secs: float = 300.0,
    path_per_node: bool = False,
) -> PreparedSave:
    """Agree on the plan for this save (collective: every rank calls it, even after a local error).

    The coordinator claims the save's in-progress marker (`lease_secs`) before the plan reaches any rank.
    """
    where = comparable_path(storage.url)
    if path_per_node:  # each node's own directory: the ranks agree on its name (the step) only
        where = where.rstrip("/").rpartition("/")[2]
    decision = _agree_decision(
        local, exchange, storage, cache, where, overwrite=overwrite, lease_secs=lease_secs
    )
    assert isinstance(local, LocalSave)  # _agree_decision raised this rank's error otherwise
    if not decision.reuse:
        try:
            _replan(local, exchange, cache, max_file_bytes=max_file_bytes, url=storage.url)
        except Exception:
            if exchange.rank == COORDINATOR:  # no rank writes anything of this save: its marker goes now
                # Evidence: the marker carries this save's id, and the plan failed before any write.
                lease.release_quietly(storage, decision.save_id)
                storage.remove_created_dirs()  # and so does a directory it made, if listed empty
            raise
    return _prepared(local, exchange, storage.url, cache, decision, overwrite=overwrite)


def _agree_decision(
    local: LocalSave | BaseException,
    exchange: Exchange,
    storage: CheckpointStorage,
    cache: PlanCache,
    where: str,
    *,
    overwrite: bool,
    lease_secs: float,
) -> _Decision:
    """Gather plan digests (or local errors) and paths; the coordinator decides; every rank raises its refusal."""
    if isinstance(local, BaseException):
        mine: Any = portable_error(local)
        extras: dict[str, JSON] = {}
    else:
        mine = local.fingerprint
        extras = {k: local.values[k] for k in cache.value_keys if k in local.values}
    # In the store first: a rank that skipped save() is named, not met by one of its training collectives.
    if isinstance(exchange, ProcessGroupExchange):
        exchange.meet()
    gathered = exchange.gather((mine, where, extras))
    decision = None
    if exchange.rank == COORDINATOR:
        assert gathered is not None
        mismatch = path_mismatch([url for _, url, _ in gathered])
        digests = [d for d, _, _ in gathered]
        cache.extra_values = {k: v for _, _, sent in gathered for k, v in sent.items()}
        decision = (
            _Decision(save_id="", reuse=False, error=mismatch)
            if mismatch is not None
            else _decide(digests, storage, cache, overwrite=overwrite, lease_secs=lease_secs)
        )
    decision = exchange.broadcast(decision)
    if decision.error is not None:
        raise decision.error
    _raise_failures(exchange.rank, decision.failures, storage.url)
    return decision


def _prepared(
    local: LocalSave, exchange: Exchange, url: str, cache: PlanCache, decision: _Decision, *, overwrite: bool
) -> PreparedSave:
    """This rank's part of the agreed plan; the coordinator's also carries the metadata draft."""
    assert cache.rank_plan is not None
    draft = None
    if exchange.rank == COORDINATOR:
        assert cache.draft_plan is not None
        # The union of every rank's nesting (pipeline stages hold different keys), else this rank's own.
        tree = cache.draft_plan.structure if cache.draft_plan.structure is not None else local.structure
        values = {**(cache.extra_values or {}), **local.values}  # stage-only values, then rank 0's own
        draft = MetadataDraft(global_plan=cache.draft_plan, values=values, structure=tree)
    return PreparedSave(
        url=url,
        save_id=decision.save_id,
        rank=exchange.rank,
        world_size=exchange.world_size,
        files=cache.rank_plan.files,
        rank_local_values=local.rank_local_values,
        draft=draft,
        plan_reused=decision.reuse,
        overwrite=overwrite,
        commit_secret=decision.commit_secret,
        created_dirs=decision.created_dirs if exchange.rank == COORDINATOR else (),
    )


def plan_save(
    state_dict: Any,
    exchange: Exchange,
    storage: CheckpointStorage,
    cache: PlanCache,
    *,
    options: SaveOptions,
    max_file_bytes: int,
    lease_secs: float = 300.0,
    failure: BaseException | None = None,
    on_local: Callable[[LocalSave], None] | None = None,
) -> tuple[LocalSave, PreparedSave]:
    """Steps 1 and 2 for a trainer rank (collective); `failure` replaces this rank's local step.

    `options` are the save() keyword arguments, typed at the API boundary. `on_local` sees this
    rank's local step before the agreement starts (an async save starts staging there,
    `checkpoint.async_writer.early_stage`); it must not raise.
    """
    local = failure or describe_or_error(state_dict, exchange.rank, allow_pickle=options.allow_pickle)
    if on_local is not None and isinstance(local, LocalSave):
        on_local(local)
    prepared = prepare_save(
        local,
        exchange,
        storage,
        cache,
        overwrite=options.overwrite,
        max_file_bytes=max_file_bytes,
        lease_secs=lease_secs,
        path_per_node=options.path_per_node,
    )
    assert isinstance(local, LocalSave)  # prepare_save raised otherwise
    return local, prepared


def _decide(
    digests: list[Any], storage: CheckpointStorage, cache: PlanCache, *, overwrite: bool, lease_secs: float
) -> _Decision:
    save_id = secrets.token_hex(6)
    failures = {r: d for r, d in enumerate(digests) if isinstance(d, BaseException)}
    if failures:
        return _Decision(save_id=save_id, reuse=False, failures=failures)
    try:
        created = tuple(storage.prepare() or ())
    except Exception as e:
        return _Decision(save_id=save_id, reuse=False, error=portable_error(e))
    try:
        if storage.exists(METADATA_FILE) and not overwrite:
            raise CheckpointExistsError(
                f"a complete checkpoint already exists at {storage.url}; pass overwrite=True to save() to replace it"
            )
        lease.claim(storage, save_id, lease_secs)
    except Exception as e:
        storage.remove_created_dirs()  # evidence: made by this prepare() a moment ago, and listed empty
        return _Decision(save_id=save_id, reuse=False, error=portable_error(e))
    return _Decision(
        save_id=save_id,
        reuse=cache.digests == digests,
        commit_secret=secrets.token_hex(COMMIT_SECRET_BYTES),
        created_dirs=created,
    )


def _replan(local: LocalSave, exchange: Exchange, cache: PlanCache, *, max_file_bytes: int, url: str) -> None:
    """Agree on structures and derive this rank's files (checkpoint/save/plan_exchange.py); no chunk list travels."""
    cache.digests = None
    fingerprint = local.fingerprint
    structure = local_structure(local.plan, local.layouts, rank=exchange.rank)
    digests = value_digests(local)  # small plain tensors, compared across ranks (planners/union.py)
    agreed = agree_world(
        structure, fingerprint, exchange, tree=local.structure, digests=digests, values=local.values
    )
    cache.rank_plan = rank_plan(agreed.world, local.plan, rank=exchange.rank, max_file_bytes=max_file_bytes)
    cache.value_keys = value_senders(agreed.world).get(exchange.rank, ())
    if exchange.rank == COORDINATOR:
        cache.extra_values = {**(cache.extra_values or {}), **agreed.values}
    if exchange.rank == COORDINATOR:
        cache.draft_plan = draft_plan(agreed.world, agreed.tree)
        cache.digests = agreed.fingerprints


def timed(label: str, timings: dict[str, float]):
    """Context manager that adds the elapsed seconds of a phase to `timings`."""
    return _Timer(label, timings)


class _Timer:
    def __init__(self, label: str, timings: dict[str, float]) -> None:
        self.label, self.timings = label, timings

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.label] = self.timings.get(self.label, 0.0) + time.perf_counter() - self.start
