"""AsyncCheckpointer: a save blocks training only while this rank's chunks are copied.

The async mode of `checkpoint.save.pipeline`. On the trainer rank, `save()` runs
the pipeline's plan step (flatten, local plan, and the plan exchange over the
training job's process group; plans are reused while the structure is
unchanged; the coordinator checks the path and claims the lease). It then
stages exactly the chunks the global plan gives this rank into the reused
shared buffer (`checkpoint.async_writer.staging`) and hands the save to the rank's writer
process (`checkpoint.async_writer.client`), which runs the pipeline's write and
commit steps from views of that buffer, committing with the other ranks'
writer processes outside the training job's process group.

A new save first waits for the previous one. If that one failed, the new save
does not start: every rank joins the plan exchange with the failure instead
of a plan, so all ranks raise together and none is left waiting in a
collective; the save after that starts afresh (with a new writer process if
the old one died).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

from checkpoint.async_writer.client import CheckpointProcess
from checkpoint.async_writer.early_stage import EarlyStager
from checkpoint.async_writer.staging import CheckpointStager, StagedSave, staging_layout
from checkpoint.checkpointer import Checkpointer
from checkpoint.load.reader import CheckpointReader
from checkpoint.options import SaveOptions
from checkpoint.save.pipeline import PlannedSave, SaveStats, plan_step
from checkpoint.save.protocol import PlanCache
from checkpoint.types import STATE_DICT
from planners.errors import PostCommitHookError, WriterProcessError

logger = logging.getLogger(__name__)


class AsyncCheckpointer(Checkpointer):
    """Saves in the background through a writer process per rank; loads synchronously.

    Example:
        >>> ckpt = make_async_checkpointer()
        >>> stage_future, write_future = ckpt.save(state_dict, "/tmp/run/step-100")
        >>> stage_future.result()  # the training may change its tensors from here on
        >>> write_future.result()  # committed: loadable by any world size
        >>> ckpt.close()
    """

    def __init__(
        self,
        checkpoint_stager: CheckpointStager,
        checkpoint_process: CheckpointProcess,
        reader: CheckpointReader,
    ) -> None:
        super().__init__()
        self._stager = checkpoint_stager
        self._early = EarlyStager(checkpoint_stager)
        self._process = checkpoint_process
        self._reader = reader
        self._rank_info = checkpoint_process.rank_info
        self._writer_config = checkpoint_process.writer_config
        self._exchange = checkpoint_process.exchange
        self._cache = PlanCache()
        self._write_future: Future[None] | None = None
        self._write_path: str | None = None

    @property
    def checkpoint_process(self) -> CheckpointProcess:
        """This rank's writer process handle (its `pid` names the process, e.g. for monitoring)."""
        return self._process

    @property
    def checkpoint_stager(self) -> CheckpointStager:
        return self._stager

    @property
    def last_save(self) -> SaveStats | None:
        """`SaveStats` of this rank's last completed save (set before its write future completes), or None."""
        return self._process.last_save

    def _save(self, state_dict: STATE_DICT, path: str, **kwargs: Any) -> tuple[Future[None], Future[None]]:
        """Plan (collective), stage, and queue the write; see `Checkpointer.save` for the arguments.

        Returns:
            `(stage_future, write_future)`: the training may change its tensors once the
            first is done; the checkpoint is committed on every rank once the second is.

        Raises:
            TypeError: an unknown keyword argument.
            CheckpointExistsError, InvalidStateDictError, PickleNotAllowedError: as a sync save.
            WriterProcessError: the previous async save failed (its error is the cause; a
                `PostCommitHookError` is only logged: that save is committed), so
                this one did not start; DistributedCheckpointError when another rank's did.
        """
        options = SaveOptions.from_kwargs(kwargs)
        previous = self._previous_failure(path)
        try:
            planned = plan_step(
                state_dict,
                path,
                options=options,
                exchange=self._exchange,
                cache=self._cache,
                config=self._writer_config,
                storage=self._process.storage,
                failure=previous,
                on_local=self._early.start,  # the copy runs while the plan is agreed
            )
        except BaseException:
            self._early.drop()
            raise
        try:
            staged_future, self._write_future = self._stage_and_queue(planned, path)
        except Exception:
            if planned.lease is not None:  # the save never reached its writer: nothing else ends the lease
                planned.lease.release()
            raise
        self._write_path = path
        return staged_future, self._write_future

    def _stage_and_queue(self, planned: PlannedSave, path: str) -> tuple[Future[None], Future[None]]:
        """Stage this rank's chunks and queue the write; the save's lease ends with the write."""
        tensors = planned.local.tensors
        phase_secs = {"plan": planned.plan_secs}
        stage_start = time.perf_counter()
        staged = self._early.take(
            planned.prepared.files
        )  # started before the agreement, on the files agreed now
        if staged is None:
            layout = staging_layout(planned.prepared.files, tensors)
            if not self._stager.fits(layout):
                self._process.release_buffer()  # the writer unmaps the old buffer before a new one exists
            try:
                staged = self._stager.stage(tensors, layout)
            except Exception as e:  # the write still runs, to fail the commit on every rank together
                logger.exception("staging for %s failed on rank %d", path, self._rank_info.global_rank)
                staged = StagedSave.failed(layout, e)
        self._early.remember(planned.local, planned.prepared.files)
        staged.future.add_done_callback(
            lambda _: phase_secs.__setitem__("stage", time.perf_counter() - stage_start)
        )
        lease = planned.lease
        write_future = self._process.write(
            planned, staged, path=path, timings=phase_secs, on_end=lease.release if lease else None
        )
        return staged.future, write_future

    def _previous_failure(self, path: str) -> BaseException | None:
        """Wait for the previous save; its failure (reported once) becomes this save's."""
        future, self._write_future = self._write_future, None
        if future is None:
            return None
        try:
            future.result()  # bounded: the writer thread's own waits all time out
            return None
        except PostCommitHookError as e:
            # The checkpoint is committed; only the hook failed. Refusing the next save for it
            # would lose a step of a training loop over a registry outage.
            logger.warning(
                "the previous async save to %s is committed, but its hook failed: %s", self._write_path, e
            )
            return None
        except Exception as e:
            error = WriterProcessError(
                f"the previous async save to {self._write_path} failed, so the save to {path} did not start; "
                f"call save() again to retry: {type(e).__name__}: {e}"
            )
            error.__cause__ = e
            return error

    def _close(self) -> None:
        self._process.close()  # first: a running save still reads the staging buffer
        self._stager.close()
        logger.debug("AsyncCheckpointer closed")
