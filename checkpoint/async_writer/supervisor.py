"""WriterSupervisor: spawns, watches and stops a rank's async writer process (trainer side).

It owns the child process and its pipe: it starts the process (`spawn`,
bounded by `subprocess_init_timeout_secs`), sends one request at a time (with
the staging buffer's file descriptor when it is new to the child) and waits
for the answer while watching the process's sentinel, so a writer that dies
(SIGKILL, out of memory) fails the request at once instead of leaving it
waiting. A writer that overruns its timeout is killed; a dead one is
discarded and the next `ensure_running` starts a new one.

All methods run on the one background thread of `checkpoint.async_writer.client`,
so requests never interleave.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import signal
import sys
import time
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import send_handle

from checkpoint.async_writer.child import MAIN_GUARD_EXIT_CODE, main_guard_message, writer_main
from checkpoint.async_writer.messages import ReleaseRequest, StopRequest, WriterInit, WriterResponse
from checkpoint.config import CheckpointProcessConfig
from planners.errors import CheckpointError, CheckpointTimeoutError, WriterProcessError

logger = logging.getLogger(__name__)

# Supervisors with a writer process, for the exit handler below.
_SUPERVISORS: weakref.WeakSet[WriterSupervisor] = weakref.WeakSet()


def kill_writers_at_exit() -> None:
    """At interpreter exit, kill the writer processes a trainer never closed.

    Writers ignore SIGTERM (`checkpoint.async_writer.child.detach_from_trainer_signals`), which is
    what multiprocessing's own exit handler sends its daemonic children before joining them; this
    handler is registered after that one (this module imports multiprocessing first), so it runs
    before it, and the join that follows returns at once.
    """
    for supervisor in list(_SUPERVISORS):
        proc = supervisor.proc
        if proc is not None and proc.is_alive():
            proc.kill()


atexit.register(kill_writers_at_exit)


class WriterSupervisor:
    """The life of one rank's writer process, replaced whenever it dies.

    Attributes:
        proc: the running writer process (None before a start or after it died).
        mapped: id of the staging buffer the writer process has mapped (None: send the descriptor).
    """

    def __init__(self, init: WriterInit, config: CheckpointProcessConfig) -> None:
        self._init = init
        self._config = config
        self.proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self.mapped: int | None = None
        self.fatal: WriterProcessError | None = None
        """A start failure no new start can fix (the script lacks its main guard): raised again, not retried."""

    def ensure_running(self) -> None:
        """Start a writer process unless one is alive (a dead one is reaped and logged first)."""
        if self.fatal is not None:
            raise WriterProcessError(str(self.fatal))  # a new exception: no traceback piles up on it
        if self.proc is not None and self.proc.is_alive():
            return
        if self.proc is not None:
            logger.warning(
                "writer process of rank %d (pid %s) exited with code %s; starting a new one",
                self._init.rank,
                self.proc.pid,
                self.proc.exitcode,
            )
            self._discard()
        self._start()

    def request(self, request: object, *, fd: int | None, timeout_secs: float, what: str) -> WriterResponse:
        """Send `request` (and `fd` after it) and wait for the answer, error or not.

        Raises:
            WriterProcessError: the process died before answering.
            CheckpointTimeoutError: no answer within `timeout_secs`; the process was killed.
        """
        self._send(request, fd=fd, what=what)
        return self._await(timeout_secs, what)

    def remote_error(self, response: WriterResponse) -> BaseException:
        """The writer's original exception, with its traceback there as the cause."""
        assert response.error is not None
        error = response.error
        error.__cause__ = WriterProcessError(
            f"traceback in the writer process of rank {self._init.rank}:\n{response.traceback}"
        )
        return error

    def release(self) -> None:
        """Make the writer process unmap its staging buffer (a dead writer's mapping is gone with it)."""
        if self.mapped is not None and self.proc is not None and self.proc.is_alive():
            try:
                self._checked(
                    ReleaseRequest(), self._config.subprocess_init_timeout_secs, "releasing its buffer"
                )
            except CheckpointError:
                logger.warning(
                    "releasing the staging buffer of rank %d failed", self._init.rank, exc_info=True
                )
        self.mapped = None

    def stop(self) -> None:
        """Ask the writer process to exit; kill it past the shutdown timeout."""
        proc = self.proc
        if proc is None:
            return
        timeout = self._config.subprocess_shutdown_timeout_secs
        if proc.is_alive():
            try:
                self._checked(StopRequest(), timeout, "stopping")
            except CheckpointError:
                logger.warning(
                    "writer process of rank %d did not stop cleanly", self._init.rank, exc_info=True
                )
        if self.proc is not None:
            proc.join(timeout)
            if proc.is_alive():
                logger.warning(
                    "writer process (pid %d) still running %.0fs after stop; killing it", proc.pid, timeout
                )
                self.kill()
        self._discard()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(self._config.subprocess_shutdown_timeout_secs)
        self._discard()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)  # a Unix socket pair: file descriptors can travel over it
        rank = self._init.rank
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
        self.proc, self._conn, self.mapped = proc, parent, None
        _SUPERVISORS.add(self)
        try:
            self._checked(None, self._config.subprocess_init_timeout_secs, "starting")
        except Exception as e:  # died, overran, or answered an error (say, the commit store was unreachable)
            self.kill()
            if isinstance(e, CheckpointError):
                raise
            raise WriterProcessError(
                f"writer process of rank {rank} failed to start: {type(e).__name__}: {e}"
            ) from e
        logger.info(
            "writer process of rank %d started (pid %d) in %.1fs", rank, proc.pid, time.perf_counter() - start
        )

    def _checked(self, request: object | None, timeout_secs: float, what: str) -> WriterResponse:
        """Send `request` (None: only wait) and raise the writer's error if it answered one."""
        if request is not None:
            self._send(request, fd=None, what=what)
        response = self._await(timeout_secs, what)
        if response.error is not None:
            raise self.remote_error(response)
        return response

    def _send(self, request: object, *, fd: int | None, what: str) -> None:
        assert self._conn is not None and self.proc is not None
        try:
            self._conn.send(request)
            if fd is not None:
                send_handle(self._conn, fd, self.proc.pid)
        except OSError as e:
            raise self._died(what) from e

    def _await(self, timeout_secs: float, what: str) -> WriterResponse:
        """The next response, error or not; raises if the process dies or overruns `timeout_secs`."""
        assert self._conn is not None and self.proc is not None
        pid = self.proc.pid
        if not wait([self._conn, self.proc.sentinel], timeout=timeout_secs):
            self.kill()
            raise CheckpointTimeoutError(
                f"writer process of rank {self._init.rank} (pid {pid}) did not finish {what} within "
                f"{timeout_secs:.0f}s (CheckpointProcessConfig); it was killed and the next save() starts a new one"
            )
        try:
            if self._conn.poll():  # an answer sent just before exiting still counts
                return self._conn.recv()
        except (EOFError, OSError):
            pass
        raise self._died(what)

    def _died(self, what: str) -> WriterProcessError:
        assert self.proc is not None
        proc = self.proc
        # Its end of the pipe is closed, so the exit status follows at once.
        proc.join(timeout=self._config.subprocess_shutdown_timeout_secs)
        if proc.is_alive():
            self.kill()
        code = proc.exitcode
        how = (
            f"from signal {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"with exit code {code}"
        )
        self._discard()
        if code == MAIN_GUARD_EXIT_CODE and what == "starting":
            main = sys.modules.get("__main__")
            self.fatal = WriterProcessError(
                f"writer process of rank {self._init.rank} could not start: "
                f"{main_guard_message(getattr(main, '__file__', None) or 'the script')}"
            )
            return self.fatal
        return WriterProcessError(
            f"writer process of rank {self._init.rank} (pid {proc.pid}) died {how} while {what}; "
            "that save was not confirmed (a checkpoint is complete only once its metadata file exists) and "
            "the next save() starts a new writer process"
        )

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.proc = self._conn = None
        self.mapped = None
