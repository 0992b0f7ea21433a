"""A durable save by upload: a step the local tier holds goes to the durable root as its own files.

When `CheckpointManager.save(step)` makes both a local and a durable checkpoint
of one step, the local save has already written the exact shard files and
`metadata.json` the durable step needs. Instead of staging the tensors a
second time, each rank copies its own shard files of that step from its
node's `local_root` to the durable step directory, and the coordinator
publishes the local metadata there, byte for byte, last.

It is a save, so it runs the save protocol's pieces, in this order:

1. Every rank waits for the local save of the step (its write future) and
   reports its outcome (`checkpoint.save.commit.exchange_verdict`). The coordinator
   reads its node's local metadata, refuses a durable path that already holds
   a committed checkpoint, and claims the in-progress marker of the local
   save's id (`checkpoint.save.lease`), so cleanup elsewhere never deletes the files.
2. Each rank checks each of its files against the local metadata (size,
   header, checksum table and every checksum block: `checkpoint.load.verify_file`)
   and only then copies it through `open_write`, which checks the size that
   landed. A file that fails is not uploaded, and the step is not committed.
3. The commit (`exchange_verdict` again): the coordinator checks that the
   uploaded files are exactly the metadata's, with their sizes as stored
   (`checkpoint.save.commit.check_stored_sizes`), publishes `metadata.json` with
   overwrite=False, removes leftovers and releases the marker.

It runs in a background thread of the trainer process, not in the writer
process: the work is file-to-storage I/O that touches no tensor (the GIL is
released while reading and writing), it needs no staging buffer, and the
writer process's protocol is one staged save at a time. Its exchanges go
through a commit store of its own (hosted by rank 0, as the writer
processes' is), never through the training process group, so they cannot
interleave with the training's collectives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from checkpoint.async_writer.commit_store import connect_commit_store, host_commit_store
from checkpoint.load.grid import GridResolver
from checkpoint.load.verify_file import ChunkRef, verify_file
from checkpoint.save import lease
from checkpoint.save.collectives import (
    COORDINATOR,
    Exchange,
    ProcessGroupExchange,
    SingleRankExchange,
    StoreExchange,
)
from checkpoint.save.commit import check_stored_sizes, exchange_verdict, remove_leftovers
from checkpoint.tiers.tier_files import open_regular
from checkpoint.types import RankInfo
from planners.boxes import Box
from planners.errors import CheckpointExistsError, InvalidCheckpointError, StorageError
from planners.metadata import METADATA_FILE, Metadata
from planners.metadata_build import RankWriteResult
from planners.metadata_parse import parse_metadata
from storage.local import LocalStorage
from storage.metadata_file import read_metadata_bytes
from storage.spec import StorageSpec

logger = logging.getLogger(__name__)

# Bytes read from a local file per write to the durable storage (one buffer per file in flight).
UPLOAD_READ_BYTES = 8 * 1024 * 1024
# Files of one rank checked and uploaded at the same time.
UPLOAD_THREADS = 4
# A rank that sends no heartbeat for this long fails the upload (as an async save's commit).
UPLOAD_TIMEOUT_SECS = 600.0
# The upload's in-progress marker: renewed every quarter of this (seconds).
LEASE_SECS = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadJob:
    """One step to upload: where its local files are, where it goes, and the local save to wait for."""

    step: int
    local_dir: str
    spec: StorageSpec
    local_write: Future[Any]


class Uploader:
    """One rank's uploads (collective to build: rank 0 hosts the commit store, every rank connects)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        info = RankInfo.detect()
        self.rank, self.world_size = info.global_rank, info.global_world_size
        exchange: Exchange = ProcessGroupExchange(group) if group is not None else SingleRankExchange()
        self._secret = bytes.fromhex(exchange.broadcast(secrets.token_hex(16)))  # never a file or a log
        self._host, address = host_commit_store(info, exchange, timeout_secs=UPLOAD_TIMEOUT_SECS)
        self._store = (
            None if address is None else connect_commit_store(address, timeout_secs=UPLOAD_TIMEOUT_SECS)
        )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shardsafe-upload")

    def start(self, job: UploadJob) -> Future[None]:
        """Upload `job` in the background; the future ends once the durable step is committed (or failed)."""
        return self._pool.submit(self._run, job)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._store = self._host = None

    def _run(self, job: UploadJob) -> None:
        exchange: Exchange = SingleRankExchange()
        if self._store is not None:
            exchange = StoreExchange(
                self._store,
                rank=self.rank,
                world_size=self.world_size,
                prefix=f"shardsafe/upload/{job.step}",
                timeout_secs=UPLOAD_TIMEOUT_SECS,
                secret=self._secret,
            )
        beat = exchange.heartbeat() if isinstance(exchange, StoreExchange) else contextlib.nullcontext()
        try:
            with beat:
                upload_step(job, exchange)
        except Exception as e:
            logger.warning(
                "rank %d: the upload of step %d to %s failed: %s", self.rank, job.step, job.spec.url, e
            )
            raise


def upload_step(job: UploadJob, exchange: Exchange) -> None:
    """The three steps of the module docstring for one rank (collective over `exchange`).

    Raises:
        CheckpointExistsError: the durable path already holds a committed checkpoint.
        DistributedCheckpointError: the local save failed, or a rank's upload or the commit failed.
    """
    start = time.perf_counter()
    outcome = _local_outcome(job.local_write, exchange.rank)
    keeper = exchange_verdict(exchange, outcome, lambda results: _claim(job, results), url=job.spec.url)
    waited = time.perf_counter() - start
    try:
        result, metadata, data = _upload_own(job, exchange.rank)
        exchange_verdict(
            exchange, result, lambda results: _commit(job, metadata, data, results), url=job.spec.url
        )
    finally:
        if keeper is not None:
            keeper.release()
    logger.info(
        "rank %d: step %d uploaded from %s to %s: %d bytes in %d files (local save waited %.3fs, "
        "upload and commit %.3fs)",
        exchange.rank,
        job.step,
        job.local_dir,
        job.spec.url,
        sum(result.files.values()),
        len(result.files),
        waited,
        time.perf_counter() - start - waited,
    )


def _local_outcome(future: Future[Any], rank: int) -> RankWriteResult:
    try:
        future.result()
    except Exception as e:
        return RankWriteResult(
            rank=rank, error=f"the local save of this step failed: {type(e).__name__}: {e}"
        )
    return RankWriteResult(rank=rank)


def _read_local_metadata(local_dir: str) -> tuple[Metadata, bytes]:
    data = read_metadata_bytes(LocalStorage(local_dir))
    return parse_metadata(data, where=os.path.join(local_dir, METADATA_FILE)), data


def _claim(
    job: UploadJob, results: list[RankWriteResult]
) -> tuple[lease.LeaseKeeper | None, tuple[dict[int, str], BaseException | None]]:
    """Coordinator: every local save committed, the durable path is free; claim the local save's marker."""
    failures = {r.rank: r.error for r in results if r.error is not None}
    if failures:
        return None, (failures, None)
    storage = job.spec.open()
    try:
        metadata, _ = _read_local_metadata(job.local_dir)
        storage.prepare()
        if storage.exists(METADATA_FILE):
            error = CheckpointExistsError(
                f"a complete checkpoint already exists at {job.spec.url}; the upload of step {job.step} "
                "from the local tier does not replace it"
            )
            return None, ({}, error)
        lease.claim(storage, metadata.save_id, LEASE_SECS)
    except Exception as e:
        storage.remove_created_dirs()
        return None, ({COORDINATOR: f"cannot start the upload: {type(e).__name__}: {e}"}, None)
    finally:
        storage.close()
    return lease.LeaseKeeper(job.spec.open(), metadata.save_id, lease_secs=LEASE_SECS), ({}, None)


def _upload_own(job: UploadJob, rank: int) -> tuple[RankWriteResult, Metadata | None, bytes]:
    """Check and copy this rank's files; a failure becomes this rank's result (the commit then fails)."""
    try:
        metadata, data = _read_local_metadata(job.local_dir)
        local = LocalStorage(job.local_dir)
        names = sorted(n for n, f in metadata.files.items() if f.rank == rank)
        refs = own_chunk_refs(local, metadata, rank)
        durable = job.spec.open()
        try:
            with ThreadPoolExecutor(min(UPLOAD_THREADS, max(1, len(names)))) as pool:
                sizes = list(
                    pool.map(lambda n: _upload_file(local, durable, metadata, n, refs.get(n, [])), names)
                )
        finally:
            durable.close()
    except Exception as e:
        logger.error("rank %d: upload of step %d failed: %s", rank, job.step, e)
        return RankWriteResult(rank=rank, error=f"{type(e).__name__}: {e}"), None, b""
    return RankWriteResult(rank=rank, files=dict(zip(names, sizes))), metadata, data


def _upload_file(
    local: LocalStorage, durable: Any, metadata: Metadata, name: str, refs: list[ChunkRef]
) -> int:
    """Check one local file against the metadata, then copy it; the bytes copied."""
    record = metadata.files[name]
    problems, _ = verify_file(local, metadata, name, record, refs)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidCheckpointError(
            f"{local.url}/{name}: the local copy fails its checks and is not uploaded: {problems[0]}{more}; "
            "the durable step is not committed (the manager stages the next durable save instead)"
        )
    copied = 0
    fd, _ = open_regular(os.path.join(local.url, name))  # never through a symbolic link
    with os.fdopen(fd, "rb") as src, durable.open_write(name) as out:
        while copied < record.nbytes:
            block = src.read(min(UPLOAD_READ_BYTES, record.nbytes - copied))
            if not block:
                break
            out.write(block)
            copied += len(block)
    if copied != record.nbytes:
        raise StorageError(f"{local.url}/{name}: copied {copied} bytes, the metadata records {record.nbytes}")
    return copied


def own_chunk_refs(storage: LocalStorage, metadata: Metadata, rank: int) -> dict[str, list[ChunkRef]]:
    """Every chunk the files of `rank` hold; grid chunks located through this rank's own headers only."""
    own = {n for n, f in metadata.files.items() if f.rank == rank}
    refs: dict[str, list[ChunkRef]] = defaultdict(list)
    for fqn, record in metadata.tensors.items():
        for chunk in record.chunks:
            if chunk.file in own:
                refs[chunk.file].append(ChunkRef(fqn=fqn, dtype=record.dtype, chunk=chunk))
    for fqn, values in metadata.rank_local.items():
        for entry in values.tensors:
            if entry is not None and entry[1].file in own:
                refs[entry[1].file].append(ChunkRef(fqn=fqn, dtype=entry[0], chunk=entry[1]))
    if metadata.grids:
        resolver = GridResolver(storage, metadata)
        for fqn, grid in metadata.grids.items():
            for cell in resolver.index.cells(fqn, Box(offsets=(0,) * len(grid.shape), sizes=grid.shape)):
                if cell.writer == rank:
                    chunk = resolver.chunk(fqn, cell)
                    refs[chunk.file].append(ChunkRef(fqn=fqn, dtype=grid.dtype, chunk=chunk))
    return refs


def _commit(
    job: UploadJob, metadata: Metadata | None, data: bytes, results: list[RankWriteResult]
) -> tuple[Metadata | None, tuple[dict[int, str], BaseException | None]]:
    """Coordinator: the uploaded files are exactly the metadata's, as stored; then the metadata, last."""
    failures = {r.rank: r.error for r in results if r.error is not None}
    if failures:
        return None, (failures, None)
    assert metadata is not None
    storage = job.spec.open()
    try:
        reported = {name: n for r in results for name, n in r.files.items()}
        expected = {name: f.nbytes for name, f in metadata.files.items()}
        if reported != expected:
            missing = sorted(set(expected) - set(reported))[:3]
            raise InvalidCheckpointError(
                f"{job.spec.url}: the uploaded files are not the step's: missing {missing}, "
                f"{len(reported)} reported of {len(expected)}"
            )
        check_stored_sizes(storage, results)
        storage.publish(METADATA_FILE, data, overwrite=False)
    except FileExistsError:
        error = CheckpointExistsError(
            f"another save committed a checkpoint at {job.spec.url} while step {job.step} was uploading; "
            "the upload was not committed and the other checkpoint stays"
        )
        return None, ({}, error)
    except Exception as e:
        logger.exception("committing the upload to %s failed", job.spec.url)
        return None, ({COORDINATOR: f"commit failed: {type(e).__name__}: {e}"}, None)
    else:
        remove_leftovers(storage, metadata)
    finally:
        storage.close()
    return metadata, ({}, None)


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadSave:
    """The durable save of a step the local tier is saving: its files are uploaded, not staged again.

    Used by the manager in place of its checkpointer's `save()` (same arguments and results):
    with an async checkpointer the upload runs in the background (`checkpoint.tiers.upload`)
    and the stage future is done at once; with a sync one it is waited for, and should it fail
    (on every rank together) the step is staged and saved as usual. A failed background upload
    is logged; the manager's next `save()` learns it (`LocalTier.upload_failed`) and saves that
    step durably, staged, whatever the interval.
    """

    tier: Any  # the LocalTier whose step is uploaded (typed loosely: local_tier imports this module)
    checkpointer: Any
    step: int

    def save(self, state: Any, path: str, *, overwrite: bool) -> tuple[Future[None], Future[None]] | None:
        from checkpoint.async_writer.async_checkpointer import AsyncCheckpointer
        from storage.spec import StorageSpec

        spec = StorageSpec.resolve(path, storage_options=self.checkpointer.storage_options)
        upload = self.tier.upload(self.step, spec)
        if isinstance(self.checkpointer, AsyncCheckpointer):
            staged: Future[None] = Future()
            staged.set_result(None)  # nothing to stage: the local save staged the tensors already
            return staged, upload
        with contextlib.suppress(Exception):  # the uploader logged it; the ranks agree below
            upload.result()
        if not self.tier.upload_failed():
            return None
        logger.warning("step %d: the upload from the local tier failed; saving it staged instead", self.step)
        return self.checkpointer.save(state, path, overwrite=overwrite)
