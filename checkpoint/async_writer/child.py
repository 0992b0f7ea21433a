"""What runs inside a rank's async writer process (the child side of the process boundary).

The writer process is spawned once per rank (`checkpoint.async_writer.supervisor`
starts and watches it) and serves requests from its trainer over a pipe, one
at a time (the records are in `checkpoint.async_writer.messages`): `WriteRequest`
runs the async mode of `checkpoint.save.pipeline` (write this rank's shard files
from views of the staging buffer, then commit with the other ranks' writer
processes); `ReleaseRequest` unmaps the buffer before the trainer allocates a
new one; `StopRequest` ends the loop. Each request gets exactly one
`WriterResponse`. A sync save runs the same pipeline, so an async checkpoint
is byte for byte the same format.

The staging buffer arrives as a file descriptor (passed over the pipe's Unix
socket) right after the first request that uses it; the process maps it and
keeps the mapping until it is told to release it or a new buffer arrives.

The process ignores SIGINT and SIGTERM and leaves the trainer's process group
(signals sent to the job are the trainer's to handle), and exits on its own
once the trainer is gone (`detach_from_trainer_signals`).

The commit's exchanges run over the store of `checkpoint.async_writer.commit_store`, never
over the training job's process group, and every wait on it times out; each
writer deletes the keys it set for a save when its next save starts.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle

import torch

from checkpoint.async_writer.commit_store import RecordingStore, commit_exchange, connect_commit_store
from checkpoint.async_writer.messages import (
    ReleaseRequest,
    StopRequest,
    WriteRequest,
    WriterInit,
    WriterResponse,
)
from checkpoint.save.barriers import create_barrier_from_config
from checkpoint.save.collectives import Exchange, SingleRankExchange
from checkpoint.save.pipeline import CommitSteps, TensorSource, write_and_commit
from checkpoint.save.protocol import PreparedSave, portable_error

logger = logging.getLogger(__name__)

# The writer's exit status when it ends because its trainer died (nobody reads it: init reaps the orphan).
TRAINER_GONE_EXIT_CODE = 0
# The exit status of a writer process that found itself creating an async checkpointer while spawn
# re-imported the trainer's main module (no main guard): EX_CONFIG of sysexits.h, a setup error.
MAIN_GUARD_EXIT_CODE = 78


def main_guard_message(script: str) -> str:
    """What to do when the trainer's script lacks `if __name__ == "__main__":` (both sides say it)."""
    return (
        f'{script} creates an async checkpointer outside `if __name__ == "__main__":`. Its writer process is '
        "started with multiprocessing's spawn, which runs the main module's top level again in the new "
        'process; put the code that builds the checkpointer and trains under `if __name__ == "__main__":`'
    )


def refuse_in_spawn_bootstrap() -> None:
    """Called where an async checkpointer is built: inside a spawned writer's start-up, exit at once.

    A script without a main guard builds its checkpointer again while spawn re-imports it in the
    writer process, which would spawn a writer of its own and end in pages of multiprocessing
    tracebacks. Instead this process says why, in one line, and exits with `MAIN_GUARD_EXIT_CODE`,
    which the supervisor turns into a `WriterProcessError` naming the missing guard.
    """
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    script = getattr(sys.modules.get("__mp_main__") or sys.modules.get("__main__"), "__file__", "the script")
    sys.stderr.write(f"shardsafe writer process: {main_guard_message(script)}\n")
    sys.stderr.flush()
    raise SystemExit(MAIN_GUARD_EXIT_CODE)


class _Writer:
    """The state of a writer process between requests: its store client, commit steps and mapped buffer."""

    def __init__(self, init: WriterInit) -> None:
        self.init = init
        self.store: RecordingStore | None = None
        if init.store_address is not None:
            timeout_secs = init.writer_config.write_barrier_timeout_secs
            self.store = RecordingStore(connect_commit_store(init.store_address, timeout_secs=timeout_secs))
        self.steps = CommitSteps(
            hook=init.commit_hook,
            barrier=create_barrier_from_config(init.barrier_config),
            io_threads=init.writer_config.io_threads,
        )
        self.buffer: torch.Tensor | None = None
        self.buffer_id: int | None = None
        self._map: mmap.mmap | None = None

    def map_buffer(self, fd: int, nbytes: int, buffer_id: int) -> None:
        self.release_buffer()
        try:
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)  # the mapping keeps the memory; the descriptor is not needed any more
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self.buffer_id = buffer_id

    def release_buffer(self) -> None:
        self.buffer = self.buffer_id = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view outlived its save: the GC unmaps it later
                self._map.close()
            self._map = None

    def exchange(self, prepared: PreparedSave) -> Exchange:
        if self.store is None:
            return SingleRankExchange()
        return commit_exchange(
            self.store, prepared, timeout_secs=self.init.writer_config.write_barrier_timeout_secs
        )

    def write(self, request: WriteRequest) -> WriterResponse:
        """Run the pipeline's write and commit for one save (raises what `write_and_commit` raises)."""
        if self.store is not None:
            self.store.delete_own_keys()
        prepared = request.prepared
        phase_secs: dict[str, float] = {}
        result = write_and_commit(
            request.storage,
            self.exchange(prepared),
            prepared,
            self._source(request),
            path=request.path,
            steps=self.steps,
            phase_secs=phase_secs,
        )
        return WriterResponse(
            bytes_written=sum(result.files.values()), files_written=len(result.files), phase_secs=phase_secs
        )

    def _source(self, request: WriteRequest) -> TensorSource:
        """Views of the staging buffer, or why there are none (which fails the save on every rank)."""
        if request.staging_error is not None:
            return TensorSource(error=f"staging failed on the trainer: {request.staging_error}")
        if self.buffer is None or self.buffer_id != request.buffer_id:
            return TensorSource(error=f"writer process has no staging buffer {request.buffer_id}")
        return TensorSource(tensors=request.layout.views(self.buffer))

    def serve(self, request: object, conn: Connection) -> WriterResponse:
        """Answer one request other than `StopRequest`."""
        if isinstance(request, WriteRequest):
            start = time.perf_counter()
            if request.fd_follows:
                fd = recv_handle(conn)
                try:
                    self.map_buffer(fd, request.buffer_nbytes, request.buffer_id)
                except Exception:  # still commit: the write reports the missing buffer to every rank
                    logger.exception("mapping staging buffer %d failed", request.buffer_id)
            response = self.write(request)
            logger.debug("wrote %s in %.3fs", request.prepared.url, time.perf_counter() - start)
            return response
        if isinstance(request, ReleaseRequest):
            self.release_buffer()
            return WriterResponse()
        raise TypeError(f"writer process got an unknown request {type(request).__name__}")


def _failure(e: BaseException) -> WriterResponse:
    return WriterResponse(error=portable_error(e), traceback=traceback.format_exc())


def detach_from_trainer_signals() -> None:
    """Signals meant for the trainer leave the writer alone; the writer exits once its trainer is gone.

    torchrun forwards SIGTERM to its whole process group and a terminal's Ctrl-C sends SIGINT to the
    foreground group: the trainer decides what they mean (`save_on_signals` saves first), and a writer
    killed by them would have to be respawned, its staging buffer mapped again, inside the preemption
    grace period. So the writer ignores both and leaves the trainer's process group. What ends it is
    `StopRequest`, the supervisor's SIGKILL, or its trainer's death: a watcher thread waits on the
    parent's sentinel and exits the process then, so no writer outlives its job.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # already a group leader (never, when spawned): the ignores still hold
        os.setpgid(0, 0)
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def exit_when_trainer_is_gone() -> None:
        wait([parent.sentinel])
        logger.warning(
            "the trainer of this writer process (pid %s) is gone; writer process exits", parent.pid
        )
        os._exit(TRAINER_GONE_EXIT_CODE)  # mid-save too: no trainer waits for its answer

    threading.Thread(target=exit_when_trainer_is_gone, name="shardsafe-trainer-watch", daemon=True).start()


def writer_main(conn: Connection, init: WriterInit) -> None:
    """Entry point of the writer process: serve requests until stopped or the trainer is gone."""
    detach_from_trainer_signals()
    logging.basicConfig(
        level=init.log_level,
        format=f"%(asctime)s writer[rank {init.rank}] %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(1)  # the process only moves bytes; no intra-op pool to spin
    try:
        writer = _Writer(init)
    except Exception as e:
        conn.send(_failure(e))
        return
    conn.send(WriterResponse())
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the trainer exited without close(): nothing is left to serve
            logger.warning("trainer of rank %d went away; writer process exits", init.rank)
            return
        if isinstance(request, StopRequest):
            writer.release_buffer()
            conn.send(WriterResponse())
            return
        try:
            response = writer.serve(request, conn)
        except Exception as e:
            logger.exception("request %s failed", type(request).__name__)
            response = _failure(e)
        conn.send(response)
