"""Bounded retries with exponential backoff for object-store requests, and the errors they end in.

Object stores fail some requests for reasons that pass: a reset connection, a 5xx from an overloaded
front end, a throttling answer (S3 `SlowDown`, HTTP 429), a timeout. Those are retried, a bounded
number of times with jittered exponential backoff, so a checkpoint survives a bad minute of the store
but a dead store still fails the save within seconds. Every other error is permanent (no such bucket
or object, access denied, a malformed request): retrying would only delay what the user must fix, so
it is raised at once.

Every failure ends as an error that names the path and the operation, with credentials redacted: a
missing object stays `FileNotFoundError` (the load path relies on it), anything else becomes
`StorageError`. Client libraries are optional dependencies, so their errors are recognised by what
they carry (class names along the MRO, an HTTP status, an S3 error code, an errno), never imported.
Client libraries often retry on their own as well (s3fs does for transport errors); these retries sit
above theirs, which keeps the total bounded.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from planners.errors import CheckpointError, StorageError
from storage.redact import Redactor

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Service error codes that mean "try again later" (S3, GCS, Azure spellings).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalServerError",
        "ServiceUnavailable",
        "ServerBusy",
        "OperationTimedOut",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
    }
)
# errno values of network trouble; s3fs maps SlowDown/503 to EBUSY and InternalError/500 to EREMOTEIO.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EAGAIN,
        errno.EBUSY,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        getattr(errno, "EREMOTEIO", 121),
    }
)
# Transport errors of botocore, aiohttp, http.client, google-auth and azure-core, by class name.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "HTTPClientError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ResponseParserError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "IncompleteRead",
        "RemoteDisconnected",
        "FSTimeoutError",
        "TransportError",
        "ServiceRequestError",
        "ServiceResponseError",
    }
)
# Never retried, whatever their cause says: the request itself is wrong, or the object is not there.
_PERMANENT_TYPES = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    KeyError,
    NotImplementedError,
    CheckpointError,
)
# Built-in errors that keep their type (callers test for them), with a message that names the path.
_KEPT_TYPES = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_MAX_CHAIN = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried.

    Attributes:
        max_attempts: tries per request, the first one included (1: never retry).
        initial_backoff_secs: wait before the first retry; doubled for each further one.
        max_backoff_secs: longest single wait.
    """

    max_attempts: int = 6
    initial_backoff_secs: float = 0.1
    max_backoff_secs: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts!r}")
        if not 0 <= self.initial_backoff_secs <= self.max_backoff_secs:
            raise ValueError(
                "RetryPolicy needs 0 <= initial_backoff_secs <= max_backoff_secs, got "
                f"{self.initial_backoff_secs!r} and {self.max_backoff_secs!r}"
            )

    def backoff_secs(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based).

        Jittered between half and all of the exponential step, so ranks that failed together
        (one throttled bucket) do not come back together.
        """
        step = min(self.max_backoff_secs, self.initial_backoff_secs * 2 ** (retry - 1))
        return step * random.uniform(0.5, 1.0)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def error_code(error: BaseException) -> str | None:
    """The service's error code (`SlowDown`, `NoSuchKey`, ...) carried by `error` or its causes."""
    for e in _chain(error):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        code = getattr(e, "error_code", None) or getattr(e, "code", None)
        if isinstance(code, str) and code:
            return code
    return None


def http_status(error: BaseException) -> int | None:
    """The HTTP status of the failed response, when `error` or one of its causes carries one."""
    for e in _chain(error):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        for attr in ("status", "status_code", "code"):
            status = getattr(e, attr, None)
            if isinstance(status, int) and not isinstance(status, bool) and 100 <= status < 600:
                return status
    return None


def is_transient(error: BaseException) -> bool:
    """Whether retrying the request that raised `error` may succeed."""
    if isinstance(error, _PERMANENT_TYPES):
        return False
    for e in _chain(error):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    if error_code(error) in _TRANSIENT_CODES:
        return True
    status = http_status(error)
    return status is not None and (status >= 500 or status == 429)


def storage_error(
    error: BaseException, *, what: str, where: str, attempts: int, redact: Redactor
) -> BaseException:
    """The error to raise for a request that failed for good, naming `where` and `what`.

    `error` itself when it is already ours; the same built-in type for a missing object; else a
    `StorageError` with a hint on what to do.
    """
    if isinstance(error, CheckpointError):
        return error
    text = redact(f"{type(error).__name__}: {error}")
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(error, _KEPT_TYPES):
        return type(error)(f"{where}: {what} failed: {text}")
    if isinstance(error, PermissionError):
        hint = "check the credentials and permissions given in storage_options"
    elif attempts > 1:
        hint = "the store kept failing; retry later or allow more attempts (RetryPolicy.max_attempts)"
    else:
        hint = "this error is not retried"
    return StorageError(f"{where}: {what} failed{tries}: {text}; {hint}")


def raise_storage_error(
    error: Exception, *, what: str, where: str, attempts: int, redact: Redactor
) -> NoReturn:
    """Raise `storage_error(...)` for `error`, chained to it unless its text held a credential."""
    final = storage_error(error, what=what, where=where, attempts=attempts, redact=redact)
    if final is error:
        raise error
    # A cause whose text held a credential would print it in the traceback: keep it out of the chain.
    leaks = redact(str(error)) != str(error)
    raise final from (None if leaks else error)


def gives_up(error: Exception, attempt: int, policy: RetryPolicy) -> bool:
    """Whether attempt `attempt` failing with `error` is the last one."""
    return attempt >= policy.max_attempts or not is_transient(error)


def retry_delay_secs(
    error: Exception, *, what: str, where: str, attempt: int, policy: RetryPolicy, redact: Redactor
) -> float:
    """Log that attempt `attempt` failed and will be retried; returns how long to wait first."""
    delay = policy.backoff_secs(attempt)
    logger.warning(
        "%s: %s failed (attempt %d of %d: %s); retrying in %.2fs",
        where,
        what,
        attempt,
        policy.max_attempts,
        redact(f"{type(error).__name__}: {error}"),
        delay,
    )
    return delay


def call_with_retry(
    fn: Callable[[], T], *, policy: RetryPolicy, what: str, where: str, redact: Redactor
) -> T:
    """`fn()`, retried on transient errors.

    Raises:
        FileNotFoundError: the object (or its bucket) does not exist; never retried.
        StorageError: a permanent error, or a transient one on every attempt.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as e:
            if gives_up(e, attempt, policy):
                raise_storage_error(e, what=what, where=where, attempts=attempt, redact=redact)
            time.sleep(
                retry_delay_secs(e, what=what, where=where, attempt=attempt, policy=policy, redact=redact)
            )
            attempt += 1


async def call_with_retry_async(
    make: Callable[[], Awaitable[T]], *, policy: RetryPolicy, what: str, where: str, redact: Redactor
) -> T:
    """`await make()`, retried on transient errors (the coroutine form of `call_with_retry`)."""
    attempt = 1
    while True:
        try:
            return await make()
        except Exception as e:
            if gives_up(e, attempt, policy):
                raise_storage_error(e, what=what, where=where, attempts=attempt, redact=redact)
            await asyncio.sleep(
                retry_delay_secs(e, what=what, where=where, attempt=attempt, policy=policy, redact=redact)
            )
            attempt += 1
