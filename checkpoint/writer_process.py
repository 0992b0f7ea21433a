"""What runs inside a rank's async writer process, and the messages it exchanges with its trainer.

The writer process is spawned once per rank (`checkpoint.process` starts and
watches it) and serves requests from its trainer over a pipe, one at a time:
`WriteRequest` writes this rank's shard files from the staging buffer and runs
the commit with the other ranks' writer processes; `ReleaseRequest` unmaps the
buffer before the trainer allocates a new one; `StopRequest` ends the loop.
Each request gets exactly one `WriterResponse`. The shard files and metadata
come from the same functions as a synchronous save (`write_rank_files`,
`commit_save`), so an async checkpoint is byte for byte the same format.

The staging buffer arrives as a file descriptor (passed over the pipe's Unix
socket) right after the first request that uses it; the process maps it and
keeps the mapping until it is told to release it or a new buffer arrives.

The commit's exchanges run over the store of `checkpoint.commit_store`, never
over the training job's process group, and every wait on it times out; each
writer deletes the keys it set for a save when its next save starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any

import torch

from checkpoint.barriers import Barrier, BarrierConfig, create_barrier_from_config
from checkpoint.collectives import Exchange, SingleRankExchange, StoreExchange
from checkpoint.commit import commit_save
from checkpoint.commit_store import RecordingStore, commit_exchange, connect_commit_store
from checkpoint.config import CheckpointWriterConfig
from checkpoint.hooks import WriterHook, run_post_commit
from checkpoint.save import (
    PreparedSave,
    RankWriteResult,
    portable_error,
    timed,
    write_rank_files,
)
from checkpoint.staging import StagingLayout
from storage.backend import CheckpointStorage, open_storage
from storage.remote import TransferConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterInit:
    """Everything a writer process is started with (pickled once, at spawn)."""

    rank: int
    world_size: int
    store_address: tuple[str, int] | None  # rank 0's commit store; None for a single rank
    writer_config: CheckpointWriterConfig
    barrier_config: BarrierConfig
    commit_hook: WriterHook | None
    storage_options: dict[str, Any] | None = field(repr=False)
    transfer: TransferConfig | None
    log_level: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteRequest:
    """Write and commit one save from staging buffer `buffer_id` (its descriptor follows if `fd_follows`)."""

    path: str
    prepared: PreparedSave
    layout: StagingLayout
    buffer_id: int
    buffer_nbytes: int
    fd_follows: bool
    staging_error: str | None  # the staging failed: only report it through the commit


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    """Unmap the staging buffer (the trainer is about to allocate another)."""


@dataclass(frozen=True, slots=True)
class StopRequest:
    """Answer, then exit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterResponse:
    """The outcome of one request; `error` is the original exception, `traceback` its text in the writer."""

    error: BaseException | None = None
    traceback: str | None = None
    nbytes: int = 0
    files: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class _Writer:
    """The state of a writer process between requests: its store client, barrier and mapped buffer."""

    def __init__(self, init: WriterInit) -> None:
        self.init = init
        self.store: RecordingStore | None = None
        if init.store_address is not None:
            timeout_s = init.writer_config.write_barrier_timeout_secs
            self.store = RecordingStore(connect_commit_store(init.store_address, timeout_s=timeout_s))
        self.barrier: Barrier | None = create_barrier_from_config(init.barrier_config)
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
            self.store, prepared, timeout_s=self.init.writer_config.write_barrier_timeout_secs
        )

    def write(self, request: WriteRequest) -> WriterResponse:
        """Write this rank's files and commit with the other ranks (raises what `commit_save` raises).

        A storage that cannot be opened here still takes part in the commit, as this rank's
        failure, so every rank fails at once instead of at its timeout.
        """
        if self.store is not None:
            self.store.delete_own_keys()
        prepared = request.prepared
        timings: dict[str, float] = {}
        storage: CheckpointStorage | None = None
        open_error = None
        try:
            storage = open_storage(
                prepared.url, storage_options=self.init.storage_options, transfer=self.init.transfer
            )
        except Exception as e:
            logger.exception("rank %d: cannot open %s", prepared.rank, prepared.url)
            open_error = f"the writer process cannot open the storage: {type(e).__name__}: {e}"
        exchange = self.exchange(prepared)
        heartbeat = exchange.heartbeat() if isinstance(exchange, StoreExchange) else contextlib.nullcontext()
        try:
            with heartbeat:
                with timed("write", timings):
                    if storage is None:
                        result = RankWriteResult(rank=prepared.rank, error=open_error)
                    else:
                        result = self._write_files(storage, request)
                result = self._pre_commit(request.path, result)
                with timed("commit", timings):
                    commit_save(storage, exchange, prepared, result)
            if self.barrier is not None:
                self.barrier.execute_barrier(key=prepared.save_id)
            if self.init.commit_hook is not None:
                run_post_commit(self.init.commit_hook, request.path, rank=prepared.rank)
        finally:
            if storage is not None:
                storage.close()
        return WriterResponse(nbytes=sum(result.files.values()), files=len(result.files), timings=timings)

    def _write_files(self, storage: CheckpointStorage, request: WriteRequest) -> RankWriteResult:
        rank = request.prepared.rank
        if request.staging_error is not None:
            return RankWriteResult(rank=rank, error=f"staging failed on the trainer: {request.staging_error}")
        if self.buffer is None or self.buffer_id != request.buffer_id:
            return RankWriteResult(
                rank=rank, error=f"writer process has no staging buffer {request.buffer_id}"
            )
        tensors = request.layout.views(self.buffer)
        return write_rank_files(
            storage, request.prepared, tensors, io_threads=self.init.writer_config.io_threads
        )

    def _pre_commit(self, path: str, result: RankWriteResult) -> RankWriteResult:
        hook = self.init.commit_hook
        if hook is None or result.error is not None:
            return result
        try:
            hook.pre_commit(path, rank=result.rank)
        except Exception as e:  # fails the save on every rank, through the commit exchange
            return dataclasses.replace(result, error=f"pre_commit hook failed: {type(e).__name__}: {e}")
        return result


def _failure(e: BaseException) -> WriterResponse:
    return WriterResponse(error=portable_error(e), traceback=traceback.format_exc())


def writer_main(conn: Connection, init: WriterInit) -> None:
    """Entry point of the writer process: serve requests until stopped or the trainer is gone."""
    # Ctrl-C reaches the whole process group; the trainer decides when its writer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        start = time.perf_counter()
        try:
            if isinstance(request, WriteRequest):
                if request.fd_follows:
                    fd = recv_handle(conn)
                    try:
                        writer.map_buffer(fd, request.buffer_nbytes, request.buffer_id)
                    except Exception:  # still commit: the write reports the missing buffer to every rank
                        logger.exception("mapping staging buffer %d failed", request.buffer_id)
                response = writer.write(request)
                logger.debug("wrote %s in %.3fs", request.prepared.url, time.perf_counter() - start)
            elif isinstance(request, ReleaseRequest):
                writer.release_buffer()
                response = WriterResponse()
            else:
                raise TypeError(f"writer process got an unknown request {type(request).__name__}")
        except Exception as e:
            logger.exception("request %s failed", type(request).__name__)
            response = _failure(e)
        conn.send(response)
