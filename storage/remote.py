"""Any fsspec file system: object stores (S3, GCS, Azure), `memory://`, and the rest.

Commit rule on object stores: there is no rename, but one PUT is atomic and an object exists only
once its upload has completed. `open_write` returns only after the store confirmed the shard file
(`CompleteMultipartUpload`, or the final request of the backend's own stream); the coordinator
publishes `metadata.json` with a single PUT, and only after every rank has reported its shard files
confirmed. So a reader that finds the metadata finds every byte it names; a save that died before
that point leaves shard files without metadata, which a load reports as incomplete. Other fsspec
file systems follow the same rule through `fs.open(..., "wb")` and `pipe_file`.

Throughput: on S3 a shard file streams as a multipart upload with several parts in flight
(`storage.multipart`); other backends use their own write stream. Reads split large byte ranges
into parts requested concurrently (`storage.remote_read`): `read_ranges_into` lands each checked
part straight in the caller's memory (a load's target tensors), `read_ranges` returns fresh buffers.
Every request is retried on transient errors (`storage.retry`); shardsafe never creates a bucket,
so a missing one fails the save at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar, cast

import fsspec.asyn

from planners.errors import CheckpointError, CheckpointExistsError, InvalidCheckpointError, StorageError
from storage.checked_stream import CheckedStream
from storage.local import not_a_directory, too_large_message
from storage.multipart import MIN_PART_BYTES, PartUpload, S3Parts, speaks_s3, widen_connection_pool
from storage.redact import Redactor
from storage.remote_read import PartCheck, Remote, fetch_ranges, read_ranges_into
from storage.retry import (
    RetryPolicy,
    call_with_retry,
    error_code,
    http_status,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1024 * 1024
# Part size of streamed uploads: S3's minimum, so a file spreads over as many parallel requests as possible
# (a 64 MiB shard file: 13 parts, all in flight; 8 MiB parts gave it 8 streams and a save through a 10 MB/s-
# per-connection link 4.7x one stream, issue 26 item 6). Part buffers: (MAX_PARTS_IN_FLIGHT + 2) x this.
UPLOAD_PART_BYTES = MIN_PART_BYTES
# Parts of one storage's files in flight at once: enough to fill a link that a single request cannot (one
# TCP stream each). The s3fs connection pool is widened to match (`storage.multipart.widen_connection_pool`).
MAX_PARTS_IN_FLIGHT = 16
# Byte ranges longer than this are fetched as several concurrent ranged GETs.
READ_PART_BYTES = 16 * MiB
# Ranged reads of one file in flight at once (a load reads up to `io_threads` files at once).
MAX_READS_IN_FLIGHT = 8
# Protocols with buckets instead of directories: nothing to create, and a missing bucket is an error.
_OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferConfig:
    """Tunables of remote transfers.

    Attributes:
        upload_part_bytes: part size of streamed uploads (S3: at least 5 MiB).
        max_parts_in_flight: upload parts in flight at once, over all files of one storage.
        read_part_bytes: byte ranges longer than this are read as several concurrent requests.
        max_reads_in_flight: ranged reads of one file in flight at once, for regions read straight
            into their targets (a load reads up to `io_threads` files at once).
        retry: how transient errors are retried.
    """

    upload_part_bytes: int = UPLOAD_PART_BYTES
    max_parts_in_flight: int = MAX_PARTS_IN_FLIGHT
    read_part_bytes: int = READ_PART_BYTES
    max_reads_in_flight: int = MAX_READS_IN_FLIGHT
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.upload_part_bytes < MIN_PART_BYTES:
            raise ValueError(
                f"TransferConfig.upload_part_bytes must be at least {MIN_PART_BYTES} (the S3 minimum part), "
                f"got {self.upload_part_bytes!r}"
            )
        for name in ("max_parts_in_flight", "read_part_bytes", "max_reads_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransferConfig.{name} must be positive, got {getattr(self, name)!r}")


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class FsspecStorage:
    """A checkpoint directory on an fsspec file system.

    Args:
        fs: the file system (its instance is shared with fsspec's cache, so it is never closed here).
        root: the directory's path on `fs`, without protocol.
        url: the directory as shown in messages (credentials already removed).
        transfer: part sizes, concurrency and retries.
        redact: hides credentials in the text of client errors.
    """

    def __init__(
        self,
        fs: Any,
        root: str,
        *,
        url: str,
        transfer: TransferConfig | None = None,
        redact: Redactor | None = None,
    ) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.transfer = transfer or TransferConfig()
        self._redact = redact or Redactor()
        self._s3 = speaks_s3(fs)
        self._object_store = self._s3 or bool(_OBJECT_STORE_PROTOCOLS.intersection(_protocols(fs)))
        self._created = False  # prepare() made the directory (file systems with real directories)
        self._part_slots = threading.BoundedSemaphore(self.transfer.max_parts_in_flight)
        if self._s3:
            widen_connection_pool(
                fs, max(self.transfer.max_parts_in_flight, self.transfer.max_reads_in_flight)
            )

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _where(self, name: str | None) -> str:
        return self.url if name is None else f"{self.url}/{name}"

    def _call(self, what: str, name: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_with_retry(
            lambda: fn(*args, **kwargs),
            policy=self.transfer.retry,
            what=what,
            where=self._where(name),
            redact=self._redact,
        )

    def _info(self, name: str | None) -> dict[str, Any] | None:
        path = self.root if name is None else self._path(name)
        self.fs.invalidate_cache(path)  # another rank may have written it since fsspec last listed
        try:
            return self._call("stat", name, self.fs.info, path)
        except FileNotFoundError:
            return None

    def _stored_size(self, name: str) -> int | None:
        info = self._info(name)
        return None if info is None else int(info.get("size", -1))

    def prepare(self) -> tuple[str, ...]:
        if self._object_store:
            bucket = self.root.split("/", 1)[0]
            try:
                self._call("check bucket", None, self.fs.info, bucket)
            except FileNotFoundError:
                raise StorageError(
                    f"{self.url}: bucket {bucket!r} does not exist; create it first (shardsafe never creates buckets)"
                ) from None
        info = self._info(None)
        if info is not None and info.get("type") == "file":
            raise not_a_directory(self.url)
        if not self._object_store:
            with contextlib.suppress(FileExistsError):
                self._call("create directory", None, self.fs.makedirs, self.root, exist_ok=True)
            self._created = info is None
        return (self.root,) if self._created else ()

    def remove_created_dirs(self, levels: Sequence[str] | None = None) -> None:
        """Remove the directory if `prepare()` created it and a listing shows it empty (`rmdir` may recurse)."""
        created = self._created if levels is None else self.root in levels
        if not created:  # only the checkpoint directory itself: fsspec does not say which parents it made
            return
        self.fs.invalidate_cache(self.root)  # a listing cached before the save's files went would be stale
        try:
            if self._call("list", None, self.fs.ls, self.root, detail=False):
                return  # something is in it (another save's file, a user's): it stays
            self.fs.rmdir(self.root)
        except (CheckpointError, OSError):
            logger.debug("kept directory %s", self.url, exc_info=True)

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        if self._s3:
            upload = self._part_upload(name)
            sink, finish, drop = cast(BinaryIO, upload), upload.commit, upload.abort
        else:
            stream = self._checked_stream(name)
            sink, finish, drop = cast(BinaryIO, stream), stream.finish, stream.discard
        try:
            yield sink
        except BaseException:  # the writer failed (or was closed early): nothing of it may become visible
            drop()
            raise
        finish()

    def _part_upload(self, name: str) -> PartUpload:
        """S3: a multipart upload with several parts in flight (`storage.multipart`)."""
        return PartUpload(
            S3Parts(self.fs, self._path(name)),
            part_bytes=self.transfer.upload_part_bytes,
            slots=self._part_slots,
            retry=self.transfer.retry,
            where=self._where(name),
            redact=self._redact,
        )

    def _checked_stream(self, name: str) -> CheckedStream:
        """Other backends: their own write stream, opened with retries, its failures and size checked."""
        f = self._call(
            "open for writing",
            name,
            self.fs.open,
            self._path(name),
            "wb",
            block_size=self.transfer.upload_part_bytes,
        )
        return CheckedStream(
            f,
            where=self._where(name),
            stored_size=lambda: self._stored_size(name),
            remove=lambda: self.remove([name]),
            redact=self._redact,
        )

    def publish(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        if not overwrite:
            # The check catches a file published before this save's commit on every backend; on S3 the
            # conditional PUT also closes the window between the check and the write (SeaweedFS, AWS and
            # most S3 stores honour If-None-Match: *; one that ignores it leaves only that window).
            if self.exists(name):
                raise CheckpointExistsError(f"{self._where(name)} already exists")
            if self._s3:
                self._put_if_absent(name, data)
                return
        self._call("write", name, self.fs.pipe_file, self._path(name), data)

    def _put_if_absent(self, name: str, data: bytes) -> None:
        bucket, key, _ = self.fs.split_path(self._path(name))

        def put() -> Any:  # through `_call_s3` on the file system's loop, as every other request
            return fsspec.asyn.sync(
                self.fs.loop,
                self.fs._call_s3,
                "put_object",
                Bucket=bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
            )

        try:
            self._call("write", name, put)
        except StorageError as e:
            if not (error_code(e) == "PreconditionFailed" or http_status(e) == 412):
                raise
            self.fs.invalidate_cache(self._path(name))
            if not self._holds(name, data, refused=e):
                raise CheckpointExistsError(
                    f"{self._where(name)} already exists (written by another save)"
                ) from e
            logger.info("%s: an earlier attempt of this conditional write landed", self._where(name))
        self.fs.invalidate_cache(self._path(name))

    def _holds(self, name: str, data: bytes, *, refused: BaseException) -> bool:
        """Whether `name` holds exactly `data`: then a refused conditional write met an earlier attempt of itself.

        When a PUT lands but its reply is lost, the retry finds the object and is refused. Every metadata
        file carries its save's random id, so another save's object never has the same bytes. Only a
        read that succeeded settles it: "exists" lets the commit delete this save's files, so a read
        that fails raises `StorageError` (unknown: the caller keeps every file) instead of guessing.
        """
        try:
            return self.read_bytes(name, max_bytes=len(data)) == data
        except InvalidCheckpointError:  # read, and larger than ours: another save's file
            return False
        except FileNotFoundError:  # refused, yet absent when read: whose write that was cannot be told
            pass
        except (CheckpointError, OSError) as e:
            refused = e
        raise StorageError(
            f"{self._where(name)}: a conditional write was refused as existing, and whether the object there "
            f"is this save's own earlier attempt could not be read back ({type(refused).__name__}: "
            f"{self._redact(str(refused))}); the outcome is unknown, so nothing is deleted"
        ) from refused

    def read_bytes(self, name: str, *, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            return self._call("read", name, self.fs.cat_file, self._path(name))
        # The size is checked before the read, and the read asks for one byte past the cap, so an
        # object that is (or grows) too large never sizes a download.
        size = self.size(name)
        if size > max_bytes:
            raise InvalidCheckpointError(too_large_message(self._where(name), size, max_bytes))
        data = self._call("read", name, self.fs.cat_file, self._path(name), start=0, end=max_bytes + 1)
        if len(data) > max_bytes:
            raise InvalidCheckpointError(too_large_message(self._where(name), len(data), max_bytes))
        return data

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        pieces: list[tuple[int, int]] = []  # (start, end) of each request
        owner: list[int] = []  # index into `ranges` of each request
        step = self.transfer.read_part_bytes
        for i, (offset, n) in enumerate(ranges):
            if offset < 0 or n < 0:
                raise InvalidCheckpointError(
                    f"{self._where(name)}: invalid byte range [{offset}, {offset + n})"
                )
            for start in range(offset, offset + n, step):
                pieces.append((start, min(start + step, offset + n)))
                owner.append(i)
        blobs = fetch_ranges(self._remote(name), pieces) if pieces else []
        parts: list[list[bytes]] = [[] for _ in ranges]
        for i, blob in zip(owner, blobs, strict=True):
            parts[i].append(blob)
        out = []
        for (offset, n), got in zip(ranges, parts, strict=True):
            if sum(map(len, got)) != n:
                raise InvalidCheckpointError(
                    f"{self._where(name)}: bytes [{offset}, {offset + n}) lie outside the file "
                    f"(got {sum(map(len, got))} bytes); the file is truncated"
                )
            # Copied into writable memory, which torch.frombuffer takes without a warning (bytes are read-only).
            buffer = bytearray(n)
            start = 0
            for blob in got:
                buffer[start : start + len(blob)] = blob
                start += len(blob)
            out.append(memoryview(buffer))
        return out

    def read_ranges_into(
        self,
        name: str,
        ranges: Sequence[tuple[int, memoryview]],
        *,
        align: int = 1,
        check: PartCheck | None = None,
    ) -> None:
        """Fill each `(offset, out)` of `ranges` with the bytes from `offset`, straight into `out`.

        Parts of `read_part_bytes` (multiples of `align`), up to `max_reads_in_flight` at once, each
        passed to `check` before it is copied (`storage.remote_read`).

        Raises:
            InvalidCheckpointError: a range lies outside the file, or a part came back short.
        """
        read_ranges_into(
            self._remote(name),
            ranges,
            part_bytes=self.transfer.read_part_bytes,
            in_flight=self.transfer.max_reads_in_flight,
            align=align,
            check=check,
        )

    def _remote(self, name: str) -> Remote:
        return Remote(
            fs=self.fs,
            path=self._path(name),
            where=self._where(name),
            policy=self.transfer.retry,
            redact=self._redact,
        )

    def size(self, name: str) -> int:
        info = self._info(name)
        if info is None:
            raise FileNotFoundError(f"{self._where(name)}: no such file")
        return int(info["size"])

    def exists(self, name: str) -> bool:
        return self._info(name) is not None

    def list_names(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            entries = self._call("list", None, self.fs.ls, self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", name, self.fs.rm_file, self._path(name))

    def close(self) -> None:
        """Nothing to release: connections belong to the (cached, shared) file system instance."""
