"""CheckpointProcess: a trainer rank's handle on its persistent async writer process.

One writer process per rank is spawned once and serves every later save
(`checkpoint.writer_process` is what runs inside it). A single background
thread of the trainer talks to it, so requests never interleave: it waits for
the staging to finish, sends the request (and, the first time a buffer is
used, its file descriptor), then waits for the answer while watching the
process's sentinel, so a writer that dies (SIGKILL, out of memory) fails the
save at once instead of leaving it waiting. Every wait has a timeout from
`CheckpointProcessConfig`; a writer that overruns is killed. A writer that
dies or is killed mid-save is replaced in the background at once, and its
trainer thread takes its part in that save's commit with the failure as its
result, so the other ranks fail promptly instead of at their barrier timeout.

The writer processes commit through the store of `checkpoint.commit_store`,
which rank 0's trainer hosts; building a `CheckpointProcess` shares its
address over the trainers' exchange (the job's process group), so construction
is collective when the world has more than one rank.

Call order (trainer rank): construct on every rank, `write()` per save (the
previous save finished first), `release_buffer()` before the stager allocates
a new buffer, `close()` once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import send_handle
from typing import Any

from checkpoint.barriers import BarrierConfig
from checkpoint.commit import commit_save
from checkpoint.commit_store import commit_exchange, connect_commit_store, host_commit_store
from checkpoint.config import CheckpointProcessConfig, CheckpointWriterConfig
from checkpoint.hooks import WriterHook
from checkpoint.save import PreparedSave, RankWriteResult
from checkpoint.staging import StagedSave
from checkpoint.types import RankInfo
from checkpoint.writer import make_exchange
from checkpoint.writer_process import (
    ReleaseRequest,
    StopRequest,
    WriteRequest,
    WriterInit,
    WriterResponse,
    writer_main,
)
from planners.errors import CheckpointError, CheckpointStateError, CheckpointTimeoutError, WriterProcessError
from storage.backend import open_storage
from storage.remote import TransferConfig

logger = logging.getLogger(__name__)


class CheckpointProcess:
    """Starts, feeds, watches and stops this rank's writer process.

    Attributes:
        rank_info: this trainer's rank and the world size.
        writer_config: shard file sizes, I/O threads and the commit's barrier timeout.
        exchange: the trainers' exchange over the job's process group (plans are agreed on it).

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
        commit_hook: WriterHook | None = None,
        storage_options: dict[str, Any] | None = None,
        transfer: TransferConfig | None = None,
    ) -> None:
        self.rank_info = rank_info
        self.writer_config = writer_config or CheckpointWriterConfig()
        self._config = config
        self._storage_options = storage_options
        self.transfer = transfer
        self.exchange = make_exchange(rank_info)  # the trainers' exchange, also for planning each save
        self._store, address = host_commit_store(
            rank_info, self.exchange, timeout_s=self.writer_config.write_barrier_timeout_secs
        )
        self._init = WriterInit(
            rank=rank_info.global_rank,
            world_size=rank_info.global_world_size,
            store_address=address,
            writer_config=self.writer_config,
            barrier_config=barrier_config or BarrierConfig(),
            commit_hook=commit_hook,
            storage_options=storage_options,
            transfer=transfer,
            log_level=logging.getLogger("checkpoint").getEffectiveLevel(),
        )
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._mapped: int | None = None  # id of the staging buffer the writer process has mapped
        self._closed = False
        rank = rank_info.global_rank
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shardsafe-writer-r{rank}")
        self._executor.submit(self._start_in_background)  # spawning takes seconds: overlap it with training

    @property
    def pid(self) -> int | None:
        """Process id of the current writer process (None before it started or after it died)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return self._storage_options

    def write(
        self,
        prepared: PreparedSave,
        staged: StagedSave,
        *,
        path: str,
        timings: dict[str, float] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> Future[None]:
        """Queue one save: the writer process writes it once `staged.future` is done, then commits.

        Returns:
            A future that completes when the save is committed on every rank, or fails with
            the writer's original error (its traceback in `__cause__`), `WriterProcessError`
            when the writer process died, or `CheckpointTimeoutError` past `write_timeout_secs`.
            `on_end` runs once the save has ended, before the future completes.
        """
        if self._closed:
            raise CheckpointStateError("CheckpointProcess is closed")
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()  # a save that other ranks take part in cannot be cancelled

        def run() -> None:
            error = None
            try:
                self._write(prepared, staged, path, timings if timings is not None else {})
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

        self._executor.submit(run)
        return future

    def release_buffer(self) -> None:
        """Make the writer process unmap its staging buffer (call when no write is running)."""
        if self._mapped is None:  # nothing mapped: do not queue behind a writer process still starting
            return
        self._executor.submit(self._release).result()

    def close(self) -> None:
        """Wait for a running save, stop the writer process (killed after the shutdown timeout)."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self._stop)
        self._executor.shutdown(wait=True)
        self._store = None

    # Everything below runs on the executor's one thread.

    def _write(
        self, prepared: PreparedSave, staged: StagedSave, path: str, timings: dict[str, float]
    ) -> None:
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
        what = f"writing {prepared.url}"
        try:
            self._ensure_running()
            fd_follows = staging_error is None and buffer is not None and self._mapped != buffer.buffer_id
            request = WriteRequest(
                path=path,
                prepared=prepared,
                layout=staged.layout,
                buffer_id=buffer.buffer_id if buffer else -1,
                buffer_nbytes=buffer.nbytes if buffer else 0,
                fd_follows=fd_follows,
                staging_error=staging_error,
            )
            self._send(request, fd=buffer.fd if fd_follows and buffer else None, what=what)
            if fd_follows and buffer:
                self._mapped = buffer.buffer_id
            response = self._await(self._config.write_timeout_secs, what)
        except Exception as e:  # no answer: the writer died, overran, or never started
            self._mapped = None  # send the descriptor again next time rather than trust the old mapping
            if self._proc is None:  # have a new writer ready before the next save
                self._replace_in_background()
            self._stand_in_commit(prepared, e)
            raise
        if response.error is not None:
            self._mapped = None
            raise self._remote_error(response)
        logger.info(
            "async save %s rank %d: %d bytes in %d files; plan %.3fs stage %.3fs write %.3fs commit %.3fs",
            prepared.url,
            prepared.rank,
            response.nbytes,
            response.files,
            timings.get("plan", 0.0),
            timings.get("stage", 0.0),
            response.timings.get("write", 0.0),
            response.timings.get("commit", 0.0),
        )

    def _start_in_background(self) -> None:
        try:
            self._ensure_running()
        except Exception:  # the first write starts it again and reports the error
            logger.warning(
                "writer process of rank %d did not start", self.rank_info.global_rank, exc_info=True
            )

    def _replace_in_background(self) -> None:
        # Queued behind the current job; spawning takes seconds, which the next save's commit
        # (other ranks waiting on this one) should not have to absorb.
        with contextlib.suppress(RuntimeError):  # close() already shut the queue
            self._executor.submit(self._start_in_background)

    def _ensure_running(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        if self._proc is not None:
            logger.warning(
                "writer process of rank %d (pid %s) exited with code %s; starting a new one",
                self.rank_info.global_rank,
                self._proc.pid,
                self._proc.exitcode,
            )
            self._discard()
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)  # a Unix socket pair: file descriptors can travel over it
        rank = self.rank_info.global_rank
        start = time.perf_counter()
        try:
            proc = ctx.Process(
                target=writer_main, args=(child, self._init), name=f"shardsafe-writer-r{rank}", daemon=True
            )
            proc.start()
        except Exception as e:
            raise WriterProcessError(
                f"could not start the writer process of rank {rank}: {type(e).__name__}: {e}"
            ) from e
        finally:
            child.close()  # the child holds the only other end, so its death reads as EOF here
        self._proc, self._conn, self._mapped = proc, parent, None
        try:
            self._receive(self._config.subprocess_init_timeout_secs, "starting")
        except Exception as e:  # died, overran, or answered an error (say, the commit store was unreachable)
            self._kill()
            if isinstance(e, CheckpointError):
                raise
            raise WriterProcessError(
                f"writer process of rank {rank} failed to start: {type(e).__name__}: {e}"
            ) from e
        logger.info(
            "writer process of rank %d started (pid %d) in %.1fs", rank, proc.pid, time.perf_counter() - start
        )

    def _send(self, request: object, *, fd: int | None = None, what: str) -> None:
        assert self._conn is not None and self._proc is not None
        try:
            self._conn.send(request)
            if fd is not None:
                send_handle(self._conn, fd, self._proc.pid)
        except OSError as e:
            raise self._died(what) from e

    def _receive(self, timeout_s: float, what: str) -> WriterResponse:
        """The next response; raises if the process dies, answers an error, or overruns `timeout_s`."""
        response = self._await(timeout_s, what)
        if response.error is not None:
            raise self._remote_error(response)
        return response

    def _await(self, timeout_s: float, what: str) -> WriterResponse:
        """The next response, error or not; raises if the process dies or overruns `timeout_s`."""
        assert self._conn is not None and self._proc is not None
        rank, pid = self.rank_info.global_rank, self._proc.pid
        if not wait([self._conn, self._proc.sentinel], timeout=timeout_s):
            self._kill()
            raise CheckpointTimeoutError(
                f"writer process of rank {rank} (pid {pid}) did not finish {what} within {timeout_s:.0f}s "
                "(CheckpointProcessConfig); it was killed and the next save() starts a new one"
            )
        try:
            if self._conn.poll():  # an answer sent just before exiting still counts
                return self._conn.recv()
        except (EOFError, OSError):
            pass
        raise self._died(what)

    def _remote_error(self, response: WriterResponse) -> BaseException:
        """The writer's original exception, with its traceback there as the cause."""
        assert response.error is not None
        error = response.error
        rank = self.rank_info.global_rank
        error.__cause__ = WriterProcessError(
            f"traceback in the writer process of rank {rank}:\n{response.traceback}"
        )
        return error

    def _stand_in_commit(self, prepared: PreparedSave, error: BaseException) -> None:
        """Take the dead writer's part in the commit, so the other ranks fail now, not at their timeout.

        The commit runs with this rank's failure as its write result: the coordinator
        publishes nothing and every rank learns the outcome. Should the writer have done
        its part before dying, the same store keys are written again, which changes nothing
        the coordinator has not read yet.
        """
        if self._init.store_address is None:
            return
        result = RankWriteResult(rank=prepared.rank, error=f"{type(error).__name__}: {error}")
        timeout_s = self.writer_config.write_barrier_timeout_secs
        try:
            if self._store is None:  # ranks other than 0 connect on first need
                self._store = connect_commit_store(self._init.store_address, timeout_s=timeout_s)
            storage = open_storage(
                prepared.url, storage_options=self._storage_options, transfer=self.transfer
            )
            try:
                commit_save(
                    storage, commit_exchange(self._store, prepared, timeout_s=timeout_s), prepared, result
                )
            finally:
                storage.close()
        except Exception:  # expected: the save failed on every rank, as intended
            logger.debug("stand-in commit for rank %d ended", prepared.rank, exc_info=True)

    def _died(self, what: str) -> WriterProcessError:
        assert self._proc is not None
        proc = self._proc
        # Its end of the pipe is closed, so the exit status follows at once.
        proc.join(timeout=self._config.subprocess_shutdown_timeout_secs)
        if proc.is_alive():
            self._kill()
        code = proc.exitcode
        how = (
            f"from signal {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"with exit code {code}"
        )
        self._discard()
        return WriterProcessError(
            f"writer process of rank {self.rank_info.global_rank} (pid {proc.pid}) died {how} while {what}; "
            "that save was not confirmed (a checkpoint is complete only once its metadata file exists) and "
            "the next save() starts a new writer process"
        )

    def _release(self) -> None:
        if self._mapped is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._send(ReleaseRequest(), what="releasing its staging buffer")
                self._receive(self._config.subprocess_init_timeout_secs, "releasing its staging buffer")
            except CheckpointError:  # it died or was killed: its mapping is gone with it
                logger.warning(
                    "releasing the staging buffer of rank %d failed",
                    self.rank_info.global_rank,
                    exc_info=True,
                )
        self._mapped = None

    def _stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        timeout = self._config.subprocess_shutdown_timeout_secs
        if proc.is_alive():
            try:
                self._send(StopRequest(), what="stopping")
                self._receive(timeout, "stopping")
            except CheckpointError:
                logger.warning(
                    "writer process of rank %d did not stop cleanly",
                    self.rank_info.global_rank,
                    exc_info=True,
                )
        if self._proc is not None:
            proc.join(timeout)
            if proc.is_alive():
                logger.warning(
                    "writer process (pid %d) still running %.0fs after stop; killing it", proc.pid, timeout
                )
                self._kill()
        self._discard()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(self._config.subprocess_shutdown_timeout_secs)
        self._discard()

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._mapped = None
