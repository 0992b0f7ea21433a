"""CheckpointProcess: a trainer rank's handle on its persistent async writer process (trainer side).

One writer process per rank is spawned once and serves every later save
(`checkpoint.async_writer.child` is what runs inside it; `checkpoint.async_writer.supervisor`
spawns, watches, times out and kills it). A single background thread of the
trainer talks to it, so requests never interleave: it waits for the staging
to finish, sends the request (and, the first time a buffer is used, its file
descriptor), then waits for the answer. A writer that dies or is killed
mid-save is replaced in the background at once, and this trainer thread takes
its part in that save's commit with the failure as its result
(`checkpoint.save.pipeline.commit_failure`), so the other ranks learn the
outcome promptly instead of at their barrier timeout. The writer may have died
after the save's metadata went out, so that outcome is read from storage: a
save whose metadata holds its id is committed (reported as `PostCommitHookError`,
"IS committed"), and nothing of it is deleted.

The writer processes commit through the store of `checkpoint.async_writer.commit_store`,
which rank 0's trainer hosts; building a `CheckpointProcess` shares its
address over the trainers' exchange (the job's process group), so construction
is collective when the world has more than one rank.

Call order (trainer rank): construct on every rank, `write()` per save (the
previous save finished first), `release_buffer()` before the stager allocates
a new buffer, `close()` once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.process import BaseProcess
from typing import Any

from checkpoint.async_writer.child import refuse_in_spawn_bootstrap
from checkpoint.async_writer.commit_store import commit_exchange, connect_commit_store, host_commit_store
from checkpoint.async_writer.messages import WriteRequest, WriterInit, WriterResponse
from checkpoint.async_writer.staging import StagedSave
from checkpoint.async_writer.supervisor import WriterSupervisor
from checkpoint.config import CheckpointProcessConfig, CheckpointWriterConfig
from checkpoint.save.barriers import BarrierConfig
from checkpoint.save.collectives import Exchange, SingleRankExchange
from checkpoint.save.hooks import CommitHook
from checkpoint.save.pipeline import PlannedSave, SaveStats, commit_failure
from checkpoint.save.protocol import PreparedSave
from checkpoint.save.writer import make_exchange
from checkpoint.types import RankInfo
from planners.errors import CheckpointStateError, PostCommitHookError
from storage.spec import StorageAccess, StorageSpec

logger = logging.getLogger(__name__)


class CheckpointProcess:
    """Feeds this rank's writer process one save at a time and reports each save's outcome.

    Attributes:
        rank_info: this trainer's rank and the world size.
        writer_config: shard file sizes, I/O threads and the commit's barrier timeout.
        exchange: the trainers' exchange over the job's process group (plans are agreed on it).
        storage: the storage options and transfer settings every path is opened with.
        last_save: `SaveStats` of the last save that completed, or None.

    Example:
        >>> process = CheckpointProcess(RankInfo.detect(), CheckpointProcessConfig())
        >>> write_future = process.write(prepared, staged, path="/tmp/run/step-1")
        >>> write_future.result()  # committed on every rank
        >>> process.close()
    """

    def __init__(
        self,
        rank_info: RankInfo,
        config: CheckpointProcessConfig,
        *,
        writer_config: CheckpointWriterConfig | None = None,
        barrier_config: BarrierConfig | None = None,
        commit_hook: CommitHook | None = None,
        storage: StorageAccess | None = None,
    ) -> None:
        refuse_in_spawn_bootstrap()  # a script without a main guard, re-run by spawn in a writer process
        self.rank_info = rank_info
        self.writer_config = writer_config or CheckpointWriterConfig()
        self._config = config
        self.storage = storage or StorageAccess()
        self.last_save: SaveStats | None = None
        self.exchange = make_exchange(rank_info)  # the trainers' exchange, also for planning each save
        self._store, address = host_commit_store(
            rank_info, self.exchange, timeout_secs=self.writer_config.write_barrier_timeout_secs
        )
        self._init = WriterInit(
            rank=rank_info.global_rank,
            world_size=rank_info.global_world_size,
            store_address=address,
            writer_config=self.writer_config,
            barrier_config=barrier_config or BarrierConfig(),
            commit_hook=commit_hook,
            log_level=logging.getLogger("checkpoint").getEffectiveLevel(),
        )
        self._supervisor = WriterSupervisor(self._init, config)
        self._closed = False
        rank = rank_info.global_rank
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shardsafe-writer-r{rank}")
        self._executor.submit(self._start_in_background)  # spawning takes seconds: overlap it with training

    @property
    def pid(self) -> int | None:
        """Process id of the current writer process (None before it started or after it died)."""
        proc = self._supervisor.proc
        return proc.pid if proc is not None else None

    @property
    def _proc(self) -> BaseProcess | None:
        """The current writer process itself (tests kill it to check recovery)."""
        return self._supervisor.proc

    @property
    def storage_options(self) -> Mapping[str, Any] | None:
        """The fsspec options paths are opened with."""
        return self.storage.storage_options

    def write(
        self,
        prepared: PreparedSave | PlannedSave,
        staged: StagedSave,
        *,
        path: str,
        timings: dict[str, float] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> Future[None]:
        """Queue one save: the writer process writes it once `staged.future` is done, then commits.

        Args:
            prepared: the save's plan (`PlannedSave` from `checkpoint.save.pipeline.plan_step`, or the
                bare `PreparedSave`, whose path is then resolved again here).
            staged: this rank's chunks in the shared staging buffer.
            path: the checkpoint path as the user gave it (handed to the commit hook).
            timings: seconds of the trainer's phases so far (`plan`, `stage`), for `last_save`.
            on_end: runs once the save has ended, before the future completes.

        Returns:
            A future that completes when the save is committed on every rank, or fails with
            the writer's original error (its traceback in `__cause__`), `WriterProcessError`
            when the writer process died, or `CheckpointTimeoutError` past `write_timeout_secs`.
        """
        if self._closed:
            raise CheckpointStateError("CheckpointProcess is closed")
        if isinstance(prepared, PlannedSave):
            spec, prepared = prepared.spec, prepared.prepared
        else:
            spec = self.storage.resolve(path)
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()  # a save that other ranks take part in cannot be cancelled
        phase_secs = timings if timings is not None else {}
        self._executor.submit(self._run, future, spec, prepared, staged, path, phase_secs, on_end)
        return future

    def release_buffer(self) -> None:
        """Make the writer process unmap its staging buffer (call when no write is running)."""
        if self._supervisor.mapped is None:  # nothing mapped: do not queue behind a writer still starting
            return
        self._executor.submit(self._supervisor.release).result()

    def close(self) -> None:
        """Wait for a running save, stop the writer process (killed after the shutdown timeout)."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self._supervisor.stop)
        self._executor.shutdown(wait=True)
        self._store = None

    # Everything below runs on the executor's one thread.

    def _run(
        self,
        future: Future[None],
        spec: StorageSpec,
        prepared: PreparedSave,
        staged: StagedSave,
        path: str,
        phase_secs: dict[str, float],
        on_end: Callable[[], None] | None,
    ) -> None:
        error = None
        try:
            self._write(spec, prepared, staged, path, phase_secs)
        except Exception as e:
            error = e
        if on_end is not None:
            try:
                on_end()
            except Exception:
                logger.warning("cleanup after the save to %s failed", path, exc_info=True)
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _write(
        self,
        spec: StorageSpec,
        prepared: PreparedSave,
        staged: StagedSave,
        path: str,
        phase_secs: dict[str, float],
    ) -> None:
        request = self._request(spec, prepared, staged, path)
        supervisor = self._supervisor
        try:
            supervisor.ensure_running()  # a new writer process has no mapping: the descriptor follows
            new_buffer = request.fd_follows and supervisor.mapped != request.buffer_id
            request = dataclasses.replace(request, fd_follows=new_buffer)
            fd = staged.buffer.fd if new_buffer and staged.buffer is not None else None
            timeout_secs = self._config.write_timeout_secs
            response = supervisor.request(
                request, fd=fd, timeout_secs=timeout_secs, what=f"writing {prepared.url}"
            )
        except Exception as e:  # no answer: the writer died, overran, or never started
            supervisor.mapped = None  # send the descriptor again next time rather than trust the old mapping
            if supervisor.proc is None:  # have a new writer ready before the next save
                self._replace_in_background()
            if self._stand_in_commit(spec, prepared, e):
                raise PostCommitHookError(
                    f"rank {prepared.rank}: the checkpoint at {path} IS committed and loadable (its metadata "
                    f"holds save {prepared.save_id}), but the writer process failed after the commit, so the "
                    f"steps after it (leftover removal, barrier, post_commit hook) may not have run: "
                    f"{type(e).__name__}: {e}"
                ) from e
            raise
        if response.error is not None:
            supervisor.mapped = None  # send the descriptor again next time rather than trust the old mapping
            raise supervisor.remote_error(response)
        if request.fd_follows:
            supervisor.mapped = request.buffer_id
        self._record(prepared, response, phase_secs)

    def _request(
        self, spec: StorageSpec, prepared: PreparedSave, staged: StagedSave, path: str
    ) -> WriteRequest:
        """The request for one save, once its staging has ended (a failed staging still commits)."""
        staging_error = None
        try:
            staged.future.result()
        except Exception as e:  # still commit, so the other ranks learn of it instead of timing out
            staging_error = f"{type(e).__name__}: {e}"
        buffer = staged.buffer
        if staging_error is None and (buffer is None or buffer.fd is None):
            staging_error = (
                "the staging buffer is not in shared memory (CheckpointStagerConfig.use_shared_memory)"
            )
        return WriteRequest(
            path=path,
            storage=spec,
            prepared=prepared,
            layout=staged.layout,
            buffer_id=buffer.buffer_id if buffer else -1,
            buffer_nbytes=buffer.nbytes if buffer else 0,
            fd_follows=staging_error is None and buffer is not None,  # narrowed once the writer runs
            staging_error=staging_error,
        )

    def _record(self, prepared: PreparedSave, response: WriterResponse, phase_secs: dict[str, float]) -> None:
        """Keep and log the stats of a save the writer process completed."""
        self.last_save = SaveStats(
            path=prepared.url,
            plan_reused=prepared.plan_reused,
            bytes_written=response.bytes_written,
            files_written=response.files_written,
            phase_secs={**phase_secs, **response.phase_secs},
        )
        self.last_save.log(rank=prepared.rank, mode="async")

    def _stand_in_commit(self, spec: StorageSpec, prepared: PreparedSave, error: BaseException) -> bool:
        """Take the dead writer's part in the commit (`checkpoint.save.pipeline.commit_failure`).

        Returns whether the save is committed all the same (its metadata holds its save id).
        """
        exchange: Exchange | None = SingleRankExchange()
        if self._init.store_address is not None:
            timeout_secs = self.writer_config.write_barrier_timeout_secs
            try:
                if self._store is None:  # ranks other than 0 connect on first need
                    self._store = connect_commit_store(self._init.store_address, timeout_secs=timeout_secs)
                exchange = commit_exchange(self._store, prepared, timeout_secs=timeout_secs)
            except Exception:
                logger.warning(
                    "stand-in commit for rank %d could not reach the commit store",
                    prepared.rank,
                    exc_info=True,
                )
                exchange = None
        return commit_failure(spec, exchange, prepared, error)

    def _start_in_background(self) -> None:
        if self._supervisor.fatal is not None:  # said once already; the next write raises it
            return
        try:
            self._supervisor.ensure_running()
        except Exception as e:  # the first write starts it again and reports the error
            if self._supervisor.fatal is not None:  # the script lacks its main guard: one line says it all
                logger.error("%s", e)
                return
            logger.warning(
                "writer process of rank %d did not start", self.rank_info.global_rank, exc_info=True
            )

    def _replace_in_background(self) -> None:
        # Queued behind the current job; spawning takes seconds, which the next save's commit
        # (other ranks waiting on this one) should not have to absorb.
        with contextlib.suppress(RuntimeError):  # close() already shut the queue
            self._executor.submit(self._start_in_background)
