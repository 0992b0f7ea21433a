"""CheckpointWriter: one synchronous save, on every rank of the job.

The writer runs the save protocol of `checkpoint.save` over the training
job's process group: plan (reused while the structure is unchanged), write
this rank's shard files, commit. It keeps the plan cache between saves.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from checkpoint.barriers import Barrier
from checkpoint.collectives import Exchange, ProcessGroupExchange, SingleRankExchange
from checkpoint.commit import commit_save
from checkpoint.config import CheckpointWriterConfig
from checkpoint.hooks import WriterHook, run_post_commit
from checkpoint.lease import LeaseKeeper
from checkpoint.save import (
    PlanCache,
    PreparedSave,
    RankWriteResult,
    plan_save,
    timed,
    write_rank_files,
)
from checkpoint.types import STATE_DICT, RankInfo
from planners.errors import CheckpointStateError
from storage.backend import CheckpointStorage, open_storage
from storage.remote import TransferConfig

logger = logging.getLogger(__name__)

SAVE_OPTIONS = frozenset({"overwrite", "allow_pickle"})


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveStats:
    """What this rank did in its last save (also logged at INFO)."""

    path: str
    plan_reused: bool
    bytes_written: int
    files_written: int
    seconds: dict[str, float]


def check_options(kwargs: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s) {unknown}; accepted: {sorted(allowed)}")


def make_exchange(rank_info: RankInfo) -> Exchange:
    """The exchange for a save's small object collectives (called by every rank at its first save).

    Object collectives on an NCCL group would stage every pickled plan through
    GPU memory; jobs on NCCL get a gloo group of their own for them instead.
    """
    if rank_info.global_world_size == 1:
        return SingleRankExchange()
    if not (dist.is_available() and dist.is_initialized()):
        raise CheckpointStateError(
            f"rank_info says {rank_info.global_world_size} ranks but no process group is initialised; "
            "call torch.distributed.init_process_group first"
        )
    if "gloo" in str(dist.get_backend()):
        return ProcessGroupExchange()
    return ProcessGroupExchange(dist.new_group(backend="gloo"))


class CheckpointWriter:
    """Writes checkpoints from this rank (every rank calls `write` together).

    Example:
        >>> writer = CheckpointWriter(CheckpointWriterConfig(), RankInfo.detect())
        >>> writer.write("/tmp/ckpt/step-1", {"w": torch.ones(2)})
    """

    def __init__(
        self,
        config: CheckpointWriterConfig,
        rank_info: RankInfo,
        barrier: Barrier | None = None,
        commit_hook: WriterHook | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        transfer: TransferConfig | None = None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._barrier = barrier
        self._commit_hook = commit_hook
        self._storage_options = storage_options
        self._transfer = transfer
        self._cache = PlanCache()
        self._exchange: Exchange | None = None
        self.last_save: SaveStats | None = None

    def write(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        """Save `state_dict` at `path` (collective).

        Args:
            path: local path or fsspec URL of the checkpoint directory.
            state_dict: what to save (see the README for what it may hold).
            overwrite: replace a complete checkpoint at `path` (default False: refuse).
            allow_pickle: store values that are not JSON-able pickled (default False: refuse).

        Raises:
            CheckpointExistsError: a complete checkpoint is at `path` and overwrite is False.
            InvalidStateDictError / PickleNotAllowedError: a leaf cannot be saved.
            DistributedCheckpointError: some rank failed; nothing was committed.
        """
        check_options(kwargs, SAVE_OPTIONS, "save")
        if self._exchange is None:
            self._exchange = make_exchange(self._rank_info)
        timings: dict[str, float] = {}
        storage = open_storage(path, storage_options=self._storage_options, transfer=self._transfer)
        try:
            with timed("plan", timings):
                local, prepared = plan_save(
                    state_dict,
                    self._exchange,
                    storage,
                    self._cache,
                    options=kwargs,
                    max_file_bytes=self._config.max_file_bytes,
                    lease_secs=self._config.save_lease_secs,
                )
            keeper = self._keep_lease(path, prepared)
            try:
                result = self._write_and_commit(storage, prepared, local.tensors, path, timings)
            finally:
                if keeper is not None:
                    keeper.release()
            if self._commit_hook is not None:
                run_post_commit(self._commit_hook, path, rank=self._rank_info.global_rank)
        finally:
            storage.close()
        self._record(storage.url, prepared, result, timings)

    def _keep_lease(self, path: str, prepared: PreparedSave) -> LeaseKeeper | None:
        """The coordinator renews the save's in-progress marker until the save ends."""
        if prepared.draft is None:  # not the coordinator
            return None
        own = open_storage(path, storage_options=self._storage_options, transfer=self._transfer)
        return LeaseKeeper(own, prepared.save_id, lease_secs=self._config.save_lease_secs)

    def _write_and_commit(
        self,
        storage: CheckpointStorage,
        prepared: PreparedSave,
        tensors: dict[str, torch.Tensor],
        path: str,
        timings: dict[str, float],
    ) -> RankWriteResult:
        """Steps 3 and 4: write this rank's files, run pre_commit, commit, then the barrier."""
        with timed("write", timings):
            result = write_rank_files(storage, prepared, tensors, io_threads=self._config.io_threads)
        if self._commit_hook is not None and result.error is None:
            try:
                self._commit_hook.pre_commit(path, rank=self._rank_info.global_rank)
            except Exception as e:  # fail the save on every rank, through the commit exchange
                result = dataclasses.replace(result, error=f"pre_commit hook failed: {type(e).__name__}: {e}")
        assert self._exchange is not None
        with timed("commit", timings):
            commit_save(storage, self._exchange, prepared, result)
        if self._barrier is not None:
            self._barrier.execute_barrier(key=prepared.save_id)
        return result

    def _record(
        self, url: str, prepared: PreparedSave, result: RankWriteResult, timings: dict[str, float]
    ) -> None:
        nbytes = sum(result.files.values())
        self.last_save = SaveStats(
            path=url,
            plan_reused=prepared.plan_reused,
            bytes_written=nbytes,
            files_written=len(result.files),
            seconds=dict(timings),
        )
        logger.info(
            "saved %s rank %d: %d bytes in %d files; plan %.3fs (reused=%s) write %.3fs commit %.3fs",
            url,
            self._rank_info.global_rank,
            nbytes,
            len(result.files),
            timings.get("plan", 0.0),
            prepared.plan_reused,
            timings.get("write", 0.0),
            timings.get("commit", 0.0),
        )

    def close(self) -> None:
        """Drop the cached plan (nothing else is held between saves)."""
        self._cache = PlanCache()
