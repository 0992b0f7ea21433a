"""Streaming uploads to S3 with several parts in flight.

s3fs's own write stream sends the parts of a multipart upload one after another, so one file moves at
the speed of one request at a time. `PartUpload` is the stream `FsspecStorage.open_write` hands out for
S3 instead: bytes written to it fill a part buffer; each full part is sent as its own `UploadPart`
request on s3fs's event loop while the writer goes on filling the next one. At most a fixed number of
parts of all of one storage's files are in flight at once (a semaphore shared by the files), which
bounds the memory held in part buffers and makes a fast producer wait for the network.

Each request is retried on its own (`storage.retry`), so one reset connection costs one part, not the
file. A file that never fills one part goes up as a single `PutObject`. The object exists only once
`CompleteMultipartUpload` (or the `PutObject`) has returned, which `commit()` waits for; on any failure
the upload is aborted, so a failed write leaves no object behind. `commit()` then reads the object's
size (and, for a multipart upload, the part count S3 puts after the dash of its ETag) back with one
`HeadObject` and fails with `StorageError` when they differ from what was sent.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import Any

from planners.errors import StorageError
from storage.redact import Redactor
from storage.retry import RetryPolicy, call_with_retry_async

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
# S3 rejects parts under 5 MiB (all but the last) and uploads of more than 10,000 parts.
MIN_PART_BYTES = 5 * MiB
MAX_PARTS = 10_000
# Connections beyond the parts or reads in flight, so that the save's small requests (the commit's, the
# lease's renewals) never wait for a connection behind a file's parts.
SPARE_CONNECTIONS = 4
# Part size doubles after every this many parts, so a file of any size fits in MAX_PARTS parts while
# ordinary files keep the configured part size.
_PARTS_PER_SIZE_STEP = 1_000


class S3Parts:
    """The five S3 requests of an upload, as coroutines on one s3fs file system's loop."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.fs.loop

    async def create(self) -> str:
        out = await self.fs._call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
        return out["UploadId"]

    async def upload(self, upload_id: str, number: int, body: bytearray) -> str:
        out = await self.fs._call_s3(
            "upload_part", Bucket=self.bucket, Key=self.key, UploadId=upload_id, PartNumber=number, Body=body
        )
        return out["ETag"]

    async def head(self) -> tuple[int, str]:
        """The stored object's size in bytes and its ETag (quotes removed)."""
        out = await self.fs._call_s3("head_object", Bucket=self.bucket, Key=self.key)
        return int(out["ContentLength"]), str(out.get("ETag", "")).strip('"')

    async def complete(self, upload_id: str, etags: list[str]) -> None:
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]
        await self.fs._call_s3(
            "complete_multipart_upload",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        self.fs.invalidate_cache(self.path)

    async def abort(self, upload_id: str) -> None:
        await self.fs._call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id)

    async def delete(self) -> None:
        await self.fs._call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        self.fs.invalidate_cache(self.path)

    async def put(self, body: bytes | bytearray) -> None:
        await self.fs._call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body)
        self.fs.invalidate_cache(self.path)


def part_bytes_for(number: int, base_bytes: int) -> int:
    """Size of part `number` (1-based): `base_bytes`, doubled after every 1,000 parts."""
    return base_bytes << ((number - 1) // _PARTS_PER_SIZE_STEP)


class PartUpload:
    """A write-only stream that uploads one object in parts, several at once.

    Call order (one writer thread): `write()` any number of times, then `commit()` once; `abort()`
    instead of `commit()` when the producer failed. Part requests run on the s3fs loop thread.

    Example:
        >>> upload = PartUpload(S3Parts(fs, "bucket/ckpt/shard.safetensors"), part_bytes=16 * MiB,
        ...                     slots=threading.BoundedSemaphore(8), retry=RetryPolicy(),
        ...                     where="s3://bucket/ckpt/shard.safetensors", redact=Redactor())
        >>> upload.write(b"..."); upload.commit()
    """

    def __init__(
        self,
        parts: S3Parts,
        *,
        part_bytes: int,
        slots: threading.Semaphore,
        retry: RetryPolicy,
        where: str,
        redact: Redactor,
    ) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(
                f"part_bytes must be at least {MIN_PART_BYTES} (the S3 minimum), got {part_bytes}"
            )
        self._parts = parts
        self._base_bytes = part_bytes
        self._slots = slots
        self._retry = retry
        self._where = where
        self._redact = redact
        self._buffer = bytearray(part_bytes)
        self._filled = 0
        self._upload_id: str | None = None
        self._pending: list[Future[str]] = []
        self._written = 0
        self._done = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, data: Any) -> int:
        """Copy `data` into part buffers, sending each one as it fills; returns its length.

        Raises:
            StorageError: an earlier part failed for good (the upload is then aborted by the caller).
        """
        if self._done:
            raise StorageError(f"{self._where}: write to an upload that was already committed or aborted")
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            room = len(self._buffer) - self._filled
            take = min(room, len(view))
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == len(self._buffer):
                self._send_full_part()
        self._written += total
        return total

    def commit(self) -> None:
        """Send what is buffered, wait for every part and complete the upload: the object then exists.

        Raises:
            StorageError: a request failed for good; the upload has been aborted.
        """
        self._check_open()
        committed = False
        try:
            if self._upload_id is None:
                # Smaller than one part: one PUT, which S3 makes visible atomically.
                del self._buffer[self._filled :]
                self._run(lambda: self._parts.put(self._buffer), "upload")
            else:
                if self._filled:
                    self._submit_part(self._take_buffer())
                etags = [f.result() for f in self._pending]
                self._run(lambda: self._parts.complete(self._upload_id, etags), "complete multipart upload")
            self._check_stored(len(self._pending))
            committed = True
        finally:
            if not committed:
                self.abort()
        self._done = True
        self._buffer = bytearray()

    def _check_stored(self, parts: int) -> None:
        """The object's stored size (and multipart ETag part count) must match what was sent."""
        size, etag = self._run(self._parts.head, "check the uploaded size")
        suffix = etag.rpartition("-")[2]
        problem = None
        if size != self._written:
            problem = f"the stored object holds {size} bytes but {self._written} were sent"
        elif parts and "-" in etag and suffix.isdigit() and int(suffix) != parts:
            problem = f"the stored object's ETag {etag!r} says {suffix} parts but {parts} were sent"
        if problem is None:
            return
        try:  # a wrong object must not stay under a shard file's name
            self._run(self._parts.delete, "delete the wrongly stored object")
        except Exception as e:
            logger.warning("%s: could not delete the wrongly stored object: %s", self._where, e)
        raise StorageError(f"{self._where}: {problem}")

    def abort(self) -> None:
        """Stop the upload and discard its parts (best effort: see the log line when it fails).

        Evidence: the parts belong to this writer's own upload id, which nothing else can reference
        (an unfinished multipart upload is not an object).
        """
        if self._done:
            return
        self._done = True
        self._buffer = bytearray()
        for f in self._pending:
            f.cancel()  # a part still in flight is rejected by S3 once the upload is aborted
        if self._upload_id is not None:
            upload_id = self._upload_id
            try:
                self._run(lambda: self._parts.abort(upload_id), "abort multipart upload")
            except Exception as e:  # already a redacted StorageError
                logger.warning(
                    "%s: could not abort the multipart upload (%s); its parts stay billed until a bucket lifecycle "
                    "rule (AbortIncompleteMultipartUpload) removes them",
                    self._where,
                    e,
                )

    def _check_open(self) -> None:
        if self._done:
            raise StorageError(f"{self._where}: upload already committed or aborted")

    def _take_buffer(self) -> bytearray:
        body = self._buffer
        del body[self._filled :]
        number = len(self._pending) + 2
        self._buffer = bytearray(part_bytes_for(number, self._base_bytes))
        self._filled = 0
        return body

    def _send_full_part(self) -> None:
        for f in self._pending:  # fail fast: stop producing once a part has failed for good
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        if self._upload_id is None:
            self._upload_id = self._run(self._parts.create, "start multipart upload")
        if len(self._pending) + 1 >= MAX_PARTS:
            raise StorageError(f"{self._where}: more than {MAX_PARTS} parts; raise upload_part_bytes")
        self._submit_part(self._take_buffer())

    def _submit_part(self, body: bytearray) -> None:
        number = len(self._pending) + 1
        upload_id = self._upload_id
        assert upload_id is not None
        request = call_with_retry_async(
            lambda: self._parts.upload(upload_id, number, body),
            policy=self._retry,
            what=f"upload part {number}",
            where=self._where,
            redact=self._redact,
        )
        self._slots.acquire()  # back-pressure: wait while too many parts are in flight
        future = asyncio.run_coroutine_threadsafe(request, self._parts.loop)
        future.add_done_callback(lambda _: self._slots.release())
        self._pending.append(future)

    def _run(self, make: Any, what: str) -> Any:
        """Run one retried request on the loop and wait for it."""
        coro = call_with_retry_async(
            make, policy=self._retry, what=what, where=self._where, redact=self._redact
        )
        return asyncio.run_coroutine_threadsafe(coro, self._parts.loop).result()


def speaks_s3(fs: Any) -> bool:
    """An s3fs file system (or subclass) in blocking mode, whose requests `PartUpload` can issue."""
    return (
        callable(getattr(fs, "_call_s3", None))
        and callable(getattr(fs, "split_path", None))
        and not getattr(fs, "asynchronous", False)
    )


def widen_connection_pool(fs: Any, in_flight: int) -> None:
    """Let an s3fs client open `in_flight + SPARE_CONNECTIONS` connections, unless its options chose a pool.

    s3fs builds its botocore client at the first request, with botocore's pool of 10 connections: more
    parts in flight than connections would queue for one, and a file would move at the speed of 10
    streams however many parts are sent. The file system is fsspec's cached instance, shared with
    whoever uses the same options; a larger pool only allows more connections, it opens none. A client
    built before (by another user of the instance) keeps its pool: the parts then queue, as before.
    """
    options = getattr(fs, "config_kwargs", None)
    if not isinstance(options, dict) or "max_pool_connections" in options:
        return  # not s3fs, or the user chose (`storage_options={"config_kwargs": {...}}`)
    if getattr(fs, "_s3", None) is not None:
        logger.debug("s3fs client already built; its connection pool stays as it is")
        return
    fs.config_kwargs = {**options, "max_pool_connections": in_flight + SPARE_CONNECTIONS}
