"""Remote byte-range reads: several requests in flight, each part checked and landed in the caller's memory.

`FsspecStorage.read_ranges` returns fresh buffers (one `cat_ranges` call per file, for regions that
need rearranging after the read). `read_ranges_into` serves the regions a load can land as they
are: each range is cut into parts of `TransferConfig.read_part_bytes` (rounded to the caller's
alignment, the checksum block, so every part can be checked on its own), at most
`max_reads_in_flight` parts of a call are requested at once, and each part is copied straight into
its slice of the caller's memory (a target tensor's bytes) as soon as it arrives, after the
caller's `check` accepted it. So a load copies each byte once after the HTTP client has it, holds
at most `max_reads_in_flight` parts per file beside the targets (never a whole file), and a corrupt
or short part contributes nothing to the target.

Every part is checked before it lands and no part lands after `read_ranges_into` returned or
raised: on the first failure the parts not yet requested are skipped and the call waits for those
in flight, so a caller that catches the error owns its memory again. A part that comes back
shorter or longer than asked (a truncated file, a server that ignored the range) is refused, never
zero-filled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec.asyn
from fsspec.implementations.dirfs import DirFileSystem

from planners.errors import InvalidCheckpointError, StorageError
from storage.redact import Redactor
from storage.retry import (
    RetryPolicy,
    call_with_retry,
    call_with_retry_async,
    error_code,
    gives_up,
    http_status,
    raise_storage_error,
    retry_delay_secs,
)

# Checks one part before it lands: (index of its range, offset of the part within that range, its bytes).
# It raises to refuse the part.
PartCheck = Callable[[int, int, memoryview], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Remote:
    """Where and how a file's ranges are requested.

    Attributes:
        fs: the fsspec file system.
        path: the file's path on `fs`.
        where: the file as shown in messages (credentials removed).
        policy: how transient errors are retried.
        redact: hides credentials in the text of client errors.
    """

    fs: Any
    path: str
    where: str
    policy: RetryPolicy
    redact: Redactor


@dataclass(frozen=True, slots=True, kw_only=True)
class _Part:
    index: int  # which range of the call
    start_bytes: int  # offset of the part within its range
    offset_bytes: int  # offset of the part in the file
    out: memoryview  # where its bytes land


def _parts(ranges: Sequence[tuple[int, memoryview]], part_bytes: int, align: int) -> list[_Part]:
    step = max(align, part_bytes // align * align)
    parts = []
    for i, (offset, out) in enumerate(ranges):
        if offset < 0:
            raise ValueError(f"invalid byte offset {offset}")
        for start in range(0, len(out), step):
            parts.append(
                _Part(index=i, start_bytes=start, offset_bytes=offset + start, out=out[start : start + step])
            )
    return parts


def read_ranges_into(
    remote: Remote,
    ranges: Sequence[tuple[int, memoryview]],
    *,
    part_bytes: int,
    in_flight: int,
    align: int = 1,
    check: PartCheck | None = None,
) -> None:
    """Fill each `out` of `ranges` with the file's bytes from its `offset`, part by part, checked first.

    Args:
        remote: the file.
        ranges: `(offset, out)` pairs: `out` (writable, e.g. a target tensor's bytes) receives
            `len(out)` bytes from `offset`.
        part_bytes: the longest single request (rounded down to a multiple of `align`).
        in_flight: the most requests of this call at once.
        align: parts start a multiple of this many bytes into their range (the checksum block).
        check: called with each part before it is copied; raising refuses the part.

    Raises:
        InvalidCheckpointError: a range lies outside the file, or the store returned fewer (or more)
            bytes than asked: the file is truncated.
        StorageError: a request failed permanently, or on every attempt.
        FileNotFoundError: the file does not exist.
        Whatever `check` raises.
    """
    parts = _parts(ranges, part_bytes, align)
    if not parts:
        return
    if _runs_async(remote.fs):
        fsspec.asyn.sync(remote.fs.loop, _read_async, remote, parts, in_flight, check)
        return
    for part in parts:  # a blocking backend (memory://, ...): one request at a time
        data = call_with_retry(
            lambda part=part: remote.fs.cat_file(
                remote.path, start=part.offset_bytes, end=part.offset_bytes + len(part.out)
            ),
            policy=remote.policy,
            what=_what(part),
            where=remote.where,
            redact=remote.redact,
        )
        _land(remote, part, data, check)


def _runs_async(fs: Any) -> bool:
    """Whether `fs` serves requests on its event loop (a directory wrapper: when the one it wraps does)."""
    if isinstance(fs, DirFileSystem):
        return _runs_async(fs.fs)
    return bool(getattr(fs, "async_impl", False))


async def _read_async(remote: Remote, parts: list[_Part], in_flight: int, check: PartCheck | None) -> None:
    slots = asyncio.Semaphore(in_flight)
    failures: list[BaseException] = []

    async def one(part: _Part) -> None:
        async with slots:
            if failures:  # an earlier part failed: request nothing more
                return
            try:
                data = await call_with_retry_async(
                    lambda: remote.fs._cat_file(
                        remote.path, start=part.offset_bytes, end=part.offset_bytes + len(part.out)
                    ),
                    policy=remote.policy,
                    what=_what(part),
                    where=remote.where,
                    redact=remote.redact,
                )
                if not failures:
                    # Checksums and the copy run off the event loop, which keeps the other parts' sockets read.
                    await asyncio.to_thread(_land, remote, part, data, check)
            except Exception as e:
                failures.append(_outside_file(remote, part, e))

    # Every task runs to its end (none is cancelled mid-copy), so nothing lands after this returns.
    await asyncio.gather(*(one(part) for part in parts))
    if failures:
        raise failures[0]


def _what(part: _Part) -> str:
    return f"read bytes [{part.offset_bytes}, {part.offset_bytes + len(part.out)})"


def _outside_file(remote: Remote, part: _Part, error: Exception) -> Exception:
    """A refused range (HTTP 416, S3 InvalidRange) as the truncated file it means; other errors as they are."""
    if isinstance(error, StorageError) and (error_code(error) == "InvalidRange" or http_status(error) == 416):
        failure = InvalidCheckpointError(f"{remote.where}: {_what(part)}: the range lies outside the file")
        failure.__cause__ = error
        return failure
    return error


def _land(remote: Remote, part: _Part, data: bytes, check: PartCheck | None) -> None:
    view = memoryview(data).cast("B")
    if len(view) != len(part.out):
        raise InvalidCheckpointError(
            f"{remote.where}: {_what(part)}: the store returned {len(view)} bytes; the file is truncated "
            "(or the server ignored the range)"
        )
    if check is not None:
        check(part.index, part.start_bytes, view)
    part.out[:] = view


def fetch_ranges(remote: Remote, pieces: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each `(start, end)` in fresh buffers, all requested at once; only failed requests are retried."""
    results: list[bytes] = [b""] * len(pieces)
    todo = list(range(len(pieces)))
    attempt = 1
    while True:
        failed = _fetch_once(remote, pieces, todo, results, attempt)
        if not failed:
            return results
        time.sleep(
            retry_delay_secs(
                failed[0][1],
                what=f"read of {len(failed)} byte range(s)",
                where=remote.where,
                attempt=attempt,
                policy=remote.policy,
                redact=remote.redact,
            )
        )
        todo = [i for i, _ in failed]
        attempt += 1


def _fetch_once(
    remote: Remote, pieces: list[tuple[int, int]], todo: list[int], results: list[bytes], attempt: int
) -> list[tuple[int, Exception]]:
    """One `cat_ranges` call for the pieces in `todo`: fills `results`, returns the retryable failures.

    Raises:
        InvalidCheckpointError: a range lies outside the file (never retried).
        StorageError: a failure that is not transient, or the retries are spent.
    """
    try:
        got = remote.fs.cat_ranges(
            [remote.path] * len(todo),
            [pieces[i][0] for i in todo],
            [pieces[i][1] for i in todo],
            on_error="return",
        )
    except Exception as e:  # a backend that raises instead of returning per-range errors
        got = [e] * len(todo)
    failed = []
    for i, blob in zip(todo, got, strict=True):
        if not isinstance(blob, Exception):
            results[i] = blob
            continue
        what = f"read bytes [{pieces[i][0]}, {pieces[i][1]})"
        if error_code(blob) == "InvalidRange" or http_status(blob) == 416:
            raise InvalidCheckpointError(f"{remote.where}: {what}: the range lies outside the file") from blob
        if gives_up(blob, attempt, remote.policy):
            raise_storage_error(blob, what=what, where=remote.where, attempts=attempt, redact=remote.redact)
        failed.append((i, blob))
    return failed
