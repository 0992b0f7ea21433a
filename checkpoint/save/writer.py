"""CheckpointWriter: one synchronous save, on every rank of the job.

The sync mode of `checkpoint.save.pipeline`: the trainer rank plans over the
training job's process group, then writes its own tensors (nothing is
staged) and commits over that same process group, all in the calling thread.
The writer keeps the plan cache between saves.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from checkpoint.config import CheckpointWriterConfig
from checkpoint.options import SAVE_OPTIONS, SaveOptions, check_options
from checkpoint.save.barriers import Barrier
from checkpoint.save.collectives import Exchange, ProcessGroupExchange, SingleRankExchange
from checkpoint.save.hooks import CommitHook
from checkpoint.save.pipeline import (
    CommitSteps,
    PlannedSave,
    SaveStats,
    TensorSource,
    plan_step,
    write_and_commit,
)
from checkpoint.save.protocol import PlanCache
from checkpoint.types import STATE_DICT, RankInfo
from planners.errors import CheckpointStateError
from storage.spec import StorageAccess

logger = logging.getLogger(__name__)

__all__ = ["SAVE_OPTIONS", "CheckpointWriter", "SaveStats", "check_options", "make_exchange"]


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
        commit_hook: CommitHook | None = None,
        *,
        storage: StorageAccess | None = None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._steps = CommitSteps(hook=commit_hook, barrier=barrier, io_threads=config.io_threads)
        self._storage = storage or StorageAccess()
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
            TypeError: an unknown keyword argument.
            CheckpointExistsError: a complete checkpoint is at `path` and overwrite is False.
            InvalidStateDictError / PickleNotAllowedError: a leaf cannot be saved.
            DistributedCheckpointError: some rank failed; nothing was committed.
            PostCommitHookError: the commit hook failed after the checkpoint was committed.
        """
        options = SaveOptions.from_kwargs(kwargs)
        if self._exchange is None:
            self._exchange = make_exchange(self._rank_info)
        planned = plan_step(
            state_dict,
            path,
            options=options,
            exchange=self._exchange,
            cache=self._cache,
            config=self._config,
            storage=self._storage,
        )
        self._write_and_commit(planned, path)

    def _write_and_commit(self, planned: PlannedSave, path: str) -> None:
        """The pipeline's write and commit, in this thread, from the trainer's own tensors."""
        assert self._exchange is not None
        phase_secs = {"plan": planned.plan_secs}
        source = TensorSource(tensors=planned.local.tensors)
        try:
            result = write_and_commit(
                planned.spec,
                self._exchange,
                planned.prepared,
                source,
                path=path,
                steps=self._steps,
                phase_secs=phase_secs,
            )
        finally:
            if planned.lease is not None:
                planned.lease.release()
        self.last_save = SaveStats.of(planned.prepared, result, phase_secs)
        self.last_save.log(rank=self._rank_info.global_rank, mode="sync")

    def close(self) -> None:
        """Drop the cached plan (nothing else is held between saves)."""
        self._cache = PlanCache()
