"""The save pipeline: plan, write, pre_commit, commit, barrier, post_commit, written once.

A sync save and an async save run the same steps; only three things differ,
and they are parameters here:

- where the tensors come from (`TensorSource`): the trainer's own tensors for
  a sync save; views of the shared staging buffer for an async one;
- which exchange the commit runs over: the job's process group (sync) or the
  commit store of `checkpoint.async_writer.commit_store` (async writer processes);
- which process runs `write_and_commit`: the trainer rank (sync,
  `checkpoint.save.writer`) or the rank's writer process (async,
  `checkpoint.async_writer.child`).

`plan_step` always runs on the trainer rank (it is collective over the job's
process group): it resolves the storage once (`storage.spec.StorageSpec`),
agrees the plan (`checkpoint.save.protocol.plan_save`: the coordinator checks the path
and claims the save's lease) and starts the coordinator's lease keeper.
`commit_failure` is the same pipeline for a rank whose writer died: it takes
that rank's part in the commit with the failure as its result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from checkpoint.config import CheckpointWriterConfig
from checkpoint.options import SaveOptions
from checkpoint.save.abort import take_back_interrupted
from checkpoint.save.barriers import Barrier
from checkpoint.save.collectives import Exchange, StoreExchange
from checkpoint.save.commit import commit_save, commit_stand_in, metadata_holds
from checkpoint.save.hooks import CommitHook, run_post_commit
from checkpoint.save.incremental import base_name, plan_incremental
from checkpoint.save.lease import LeaseKeeper
from checkpoint.save.local_plan import LocalSave
from checkpoint.save.protocol import PlanCache, PreparedSave, plan_save, timed
from checkpoint.save.shard_files import write_rank_files
from planners.errors import PostCommitHookError
from planners.metadata_build import RankWriteResult
from storage.backend import CheckpointStorage
from storage.spec import StorageAccess, StorageSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveStats:
    """What this rank did in one save; logged at INFO when the save ends, in both modes."""

    path: str
    """The checkpoint directory as shown in logs (no credentials)."""
    plan_reused: bool
    """Whether the cached global plan was reused (the state dict's structure was unchanged)."""
    bytes_written: int
    """Bytes of shard files this rank wrote."""
    files_written: int
    """Shard files this rank wrote."""
    phase_secs: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: `plan`, `stage` (async only), `write`, `commit`."""

    @classmethod
    def of(
        cls, prepared: PreparedSave, result: RankWriteResult, phase_secs: Mapping[str, float]
    ) -> SaveStats:
        return cls(
            path=prepared.url,
            plan_reused=prepared.plan_reused,
            bytes_written=sum(result.files.values()),
            files_written=len(result.files),
            phase_secs=dict(phase_secs),
        )

    def log(self, *, rank: int, mode: str) -> None:
        """The one INFO line per save."""
        secs = " ".join(f"{phase} {s:.3f}s" for phase, s in self.phase_secs.items())
        logger.info(
            "%s save %s rank %d: %d bytes in %d files (plan reused=%s); %s",
            mode,
            self.path,
            rank,
            self.bytes_written,
            self.files_written,
            self.plan_reused,
            secs,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedSave:
    """A save after `plan_step`, on a trainer rank: the agreed plan plus what stays in the trainer.

    `prepared` (`checkpoint.save.protocol.PreparedSave`) is the part that can travel to the async
    writer process; this record adds what cannot be pickled or must stay with the trainer:
    the live tensors (`local`), the resolved storage spec, the coordinator's lease keeper
    (a thread) and the plan's duration. The two are not merged so that what crosses the
    process boundary is exactly `PreparedSave`.
    """

    spec: StorageSpec
    local: LocalSave
    prepared: PreparedSave
    lease: LeaseKeeper | None
    """The coordinator's lease keeper (None elsewhere); whoever ends the save releases it."""
    plan_secs: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSource:
    """Where this rank's tensors come from, or why they cannot (which fails the save on every rank)."""

    tensors: Mapping[str, torch.Tensor] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitSteps:
    """What runs around the commit in the process that writes; the same in both modes."""

    hook: CommitHook | None = None
    barrier: Barrier | None = None
    io_threads: int = 8


def plan_step(
    state_dict: Any,
    path: str,
    *,
    options: SaveOptions,
    exchange: Exchange,
    cache: PlanCache,
    config: CheckpointWriterConfig,
    storage: StorageAccess,
    failure: BaseException | None = None,
    on_local: Callable[[LocalSave], None] | None = None,
) -> PlannedSave:
    """Steps 1 and 2 on a trainer rank (collective): resolve the storage, agree the plan, keep the lease.

    `failure` replaces this rank's local step (a previous async save failed), so every rank
    raises together; `on_local` as in `plan_save`. Raises what `checkpoint.save.protocol.plan_save` raises.
    """
    start = time.perf_counter()
    base = None if options.base is None else base_name(path, os.fspath(options.base), storage)
    spec = storage.resolve(path)
    storage = spec.open()
    try:
        local, prepared = plan_save(
            state_dict,
            exchange,
            storage,
            cache,
            options=options,
            max_file_bytes=config.max_file_bytes,
            lease_secs=config.save_lease_secs,
            failure=failure,
            on_local=on_local,
        )
    finally:
        storage.close()
    if options.incremental or base is not None:  # checkpoint.save.incremental: what the base holds
        prepared = dataclasses.replace(prepared, incremental=plan_incremental(spec, base, prepared.files))
    lease = None
    if prepared.draft is not None:  # the coordinator renews the in-progress marker until the save ends
        lease = LeaseKeeper(spec.open(), prepared.save_id, lease_secs=config.save_lease_secs)
    plan_secs = time.perf_counter() - start
    return PlannedSave(spec=spec, local=local, prepared=prepared, lease=lease, plan_secs=plan_secs)


def write_and_commit(
    spec: StorageSpec,
    exchange: Exchange,
    prepared: PreparedSave,
    source: TensorSource,
    *,
    path: str,
    steps: CommitSteps,
    phase_secs: dict[str, float],
) -> RankWriteResult:
    """Steps 3 to 6 in the process that writes: write, pre_commit, commit, barrier, post_commit.

    A rank that cannot write (no storage, no tensors, a failed pre_commit) still takes part
    in the commit with its failure as its result, so every rank raises together instead of
    at its timeout. Raises what `checkpoint.save.commit.commit_save` raises, and
    `PostCommitHookError` when the hook fails after the commit.
    """
    storage, open_error = _open(spec, prepared)
    if open_error is not None:
        source = TensorSource(error=open_error)
    heartbeat = exchange.heartbeat() if isinstance(exchange, StoreExchange) else contextlib.nullcontext()
    try:
        with heartbeat:
            with timed("write", phase_secs):
                try:
                    result = _write(storage, prepared, source, steps.io_threads)
                except KeyboardInterrupt:  # Ctrl-C in a sync save: its result never reached the commit
                    take_back_interrupted(storage, prepared)
                    raise
            result = run_pre_commit(steps.hook, path, result)
            with timed("commit", phase_secs):
                commit_save(storage, exchange, prepared, result)
        if steps.barrier is not None:
            _run_barrier(steps.barrier, path, prepared)
        if steps.hook is not None:
            run_post_commit(steps.hook, path, rank=prepared.rank)
    finally:
        if storage is not None:
            storage.close()
    return result


def commit_failure(
    spec: StorageSpec, exchange: Exchange | None, prepared: PreparedSave, error: BaseException
) -> bool:
    """Take a dead writer's part in the commit, so the other ranks learn the outcome now, not at their timeout.

    The writer may have died before, during or after the commit, so the outcome is read from
    storage (`checkpoint.save.commit.commit_stand_in`), never assumed from the missing report: the
    path's metadata holding this save's id means the save is committed, and nothing is deleted.
    Should the writer have done its part before dying, the same exchange keys are written again,
    which changes nothing the coordinator has not read yet. `exchange`: None when the commit store
    cannot be reached; the storage is still read.

    Returns:
        Whether the save is committed: its metadata, read after the exchange, holds its save id.
    """
    storage, _ = _open(spec, prepared)
    result = RankWriteResult(rank=prepared.rank, error=f"{type(error).__name__}: {error}")
    try:
        if exchange is not None:
            heartbeat = (
                exchange.heartbeat() if isinstance(exchange, StoreExchange) else contextlib.nullcontext()
            )
            with heartbeat:
                commit_stand_in(storage, exchange, prepared, result)
    except Exception:  # the save failed on every rank, or the exchange broke: storage tells which
        logger.debug("stand-in commit for rank %d ended", prepared.rank, exc_info=True)
    try:
        return metadata_holds(storage, prepared.save_id) is True
    finally:
        if storage is not None:
            storage.close()


def _run_barrier(barrier: Barrier, path: str, prepared: PreparedSave) -> None:
    """The barrier after a commit; its failure says the checkpoint is committed (a missing peer is no verdict)."""
    try:
        barrier.execute_barrier(key=prepared.save_id)
    except Exception as e:
        raise PostCommitHookError(
            f"rank {prepared.rank}: the checkpoint at {path} IS committed and loadable (save {prepared.save_id}), "
            f"but the barrier after the commit failed: {type(e).__name__}: {e}"
        ) from e


def run_pre_commit(hook: CommitHook | None, path: str, result: RankWriteResult) -> RankWriteResult:
    """Run `hook.pre_commit` after a successful write; its failure becomes this rank's write error."""
    if hook is None or result.error is not None:
        return result
    try:
        hook.pre_commit(path, rank=result.rank, files=tuple(sorted(result.files)))
    except Exception as e:  # fails the save on every rank, through the commit exchange
        return dataclasses.replace(result, error=f"pre_commit hook failed: {type(e).__name__}: {e}")
    return result


def _open(spec: StorageSpec, prepared: PreparedSave) -> tuple[CheckpointStorage | None, str | None]:
    try:
        return spec.open(), None
    except Exception as e:
        logger.exception("rank %d: cannot open %s", prepared.rank, prepared.url)
        return None, f"cannot open the storage: {type(e).__name__}: {e}"


def _write(
    storage: CheckpointStorage | None, prepared: PreparedSave, source: TensorSource, io_threads: int
) -> RankWriteResult:
    if source.error is not None or storage is None or source.tensors is None:
        return RankWriteResult(rank=prepared.rank, error=source.error or "no tensors to write")
    return write_rank_files(storage, prepared, dict(source.tensors), io_threads=io_threads)
