"""A backend's own write stream, checked: failures name the file, and the stored size must match what was sent.

`FsspecStorage.open_write` streams S3 shard files through `storage.multipart.PartUpload`; every other fsspec
backend (GCS, Azure, `memory://`, ...) writes through its own `fs.open(..., "wb")` stream, wrapped here. Such a
stream cannot be retried once bytes were handed over (they are gone), so a failure is raised at once as a
`StorageError` naming the file; opening is retried by the caller, and backends retry their own requests
underneath. After the stream closes (which completes the upload), the stored size is compared with the bytes
sent, so a stream that lost data silently fails the save instead of leaving a short shard file behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

from planners.errors import StorageError
from storage.redact import Redactor
from storage.retry import raise_storage_error

logger = logging.getLogger(__name__)


class CheckedStream:
    """A writable file over a backend's write stream `f` for the file at `where`.

    Args:
        f: the backend's open write stream.
        where: the file as shown in messages (credentials removed).
        stored_size: the file's size as the store reports it now, None when it does not exist.
        remove: deletes the file (used when the upload failed or came out short).
        redact: hides credentials in the text of client errors.
    """

    def __init__(
        self,
        f: Any,
        *,
        where: str,
        stored_size: Callable[[], int | None],
        remove: Callable[[], None],
        redact: Redactor,
    ) -> None:
        self._f = f
        self._where = where
        self._stored_size = stored_size
        self._remove = remove
        self._redact = redact
        self._sent = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._sent

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        try:
            taken = self._f.write(data)
        except Exception as e:
            self._fail(e, "write")
        if taken is not None and taken != n:
            raise StorageError(f"{self._where}: the stream took {taken} of {n} bytes")
        self._sent += n
        return n

    def finish(self) -> None:
        """Close the stream, which completes the upload, then check the stored size against what was sent."""
        try:
            self._f.close()
        except Exception as e:
            self._remove_quietly()
            self._fail(e, "finish upload")
        landed = self._stored_size()
        if landed != self._sent:
            self._remove_quietly()
            what = "no file" if landed is None else f"{landed} bytes"
            raise StorageError(
                f"{self._where}: the stored file holds {what} but {self._sent} bytes were sent"
            )

    def discard(self) -> None:
        """The producer failed: drop what was written (best effort; cleanup removes leftovers later)."""
        try:
            self._f.close()
        except Exception as e:
            self._log_failure("close", e)
        self._remove_quietly()

    def _remove_quietly(self) -> None:
        try:
            self._remove()
        except Exception as e:
            self._log_failure("remove a partly written file", e)

    def _log_failure(self, what: str, error: Exception) -> None:
        # The text only, redacted: a client's traceback may quote what it sent.
        text = self._redact(f"{type(error).__name__}: {error}")
        logger.warning("%s: could not %s: %s", self._where, what, text)

    def _fail(self, error: Exception, what: str) -> NoReturn:
        raise_storage_error(error, what=what, where=self._where, attempts=1, redact=self._redact)
