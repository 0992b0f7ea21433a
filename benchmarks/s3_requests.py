"""The S3 requests of a save, with their times: where a save's seconds go (issue 26, item 6).

`RequestLog` wraps s3fs's one request method (`S3FileSystem._call_s3`, which every s3fs operation and
shardsafe's part uploads go through), so a benchmark can list each request of a save: the plan's checks,
the in-progress marker, the parts, the commit's checks and `metadata.json`. `timeline` says how long the
save spent before its first part, sending parts, and after its last part.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class RequestLog:
    """The S3 requests s3fs makes while `recording()`: operation, key, part, bytes, start and end.

    Installed around s3fs's one request method, so every request of a save is seen (its checks, marker,
    parts, commit), with times in seconds from the start of the recording.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._t0: float | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[RequestLog]:
        import s3fs

        original = s3fs.S3FileSystem._call_s3
        log = self

        async def call(fs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await original(fs, method, *args, **kwargs)
            finally:
                if log._t0 is not None:
                    body = kwargs.get("Body")
                    log.requests.append(
                        {
                            "op": method,
                            "key": str(kwargs.get("Key", kwargs.get("Prefix", "")))
                            .rstrip("/")
                            .rsplit("/", 1)[-1],
                            "part": kwargs.get("PartNumber"),
                            "bytes": 0 if body is None else len(body),
                            "start": round(start - log._t0, 3),
                            "end": round(time.perf_counter() - log._t0, 3),
                        }
                    )

        s3fs.S3FileSystem._call_s3 = call
        try:
            yield self
        finally:
            s3fs.S3FileSystem._call_s3 = original

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict[str, Any]]]:
        self.requests, self._t0 = [], time.perf_counter()
        try:
            yield self.requests
        finally:
            self._t0 = None


def timeline(requests: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """One save's requests in start order, and where its time went around the parts."""
    parts = [r for r in requests if r["op"] == "upload_part"]
    out: dict[str, Any] = {"seconds": round(seconds, 3), "requests": len(requests)}
    if parts:
        first, last = min(r["start"] for r in parts), max(r["end"] for r in parts)
        out.update(
            before_first_part=first, parts=round(last - first, 3), after_last_part=round(seconds - last, 3)
        )
    out["timeline"] = sorted(requests, key=lambda r: r["start"])
    return out
