"""The HTTP server of one node's local tier: receives replicas, serves byte ranges, lists steps.

One server runs per node (started by the node's local rank 0 trainer, in a
daemon thread with its own event loop), outside the training process group,
on the address the job uses to reach that node. Every request must carry the
job's random token (`TOKEN_HEADER`, compared in constant time); other jobs'
requests get 401. Routes:

- `GET /v1/steps`: the node's holdings (`tier_files.list_holdings`) as JSON,
  each step with its tag (`checkpoint.run.identity`: which run, which timeline).
- `HEAD|GET /v1/files/<step-dir>/<file>`: the file, or one byte range of it
  (`Range: bytes=a-b`, answered 206), so fsspec's HTTP file system reads a
  peer with the same reader code as S3.
- `PUT /v1/files/<step-dir>/<file>`: a replica, with a Content-Length that
  fits the free space (else 413). The body streams to a
  temporary name while its SHA-256 is computed; it must equal `SHA256_HEADER`,
  then the file's own checksums are checked (`tier_files.verify_received`),
  and only then is it renamed into place (201). A failed check is 422.
- `POST /v1/quarantine/<step-dir>/<file>`: a reader says a copy failed its
  checksum. The holder re-verifies its own copy first (the reader may have bad
  RAM or a bad NIC): only a copy that fails the holder's own check is renamed
  aside (200); a copy that verifies stays and is served (409).

Names are checked against the format's patterns before any path is built
(`..`, absolute paths, unpadded step names, other names: 403); symbolic links
and anything but a regular file (a FIFO, a device) are refused (403). Files
are opened and read off the event loop, so a slow disk never stalls the other
requests. Refusals are logged as warnings at most once per `REFUSAL_LOG_SECS`
(with a count of those not logged), so a flood of bad requests cannot flood
the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from typing import Any

from aiohttp import web

from checkpoint.tiers.local_steps import list_tags
from checkpoint.tiers.tier_files import (
    QUARANTINE_MARK,
    TEMP_MARK,
    checked_names,
    holdings_to_json,
    list_holdings,
    open_regular,
    step_directory,
    verify_received,
)
from planners.errors import InvalidCheckpointError, TierPathError

logger = logging.getLogger(__name__)

TOKEN_HEADER = "X-Shardsafe-Token"
SHA256_HEADER = "X-Shardsafe-Sha256"
# Bytes read from disk per write to the socket while serving a range.
SERVE_PIECE_BYTES = 4 * 1024 * 1024
# The largest replica accepted (the format's own cap on a file is far larger; this one bounds a PUT).
MAX_PUT_BYTES = 1 << 40
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
# Seconds to wait for the server thread to start listening.
START_TIMEOUT_SECS = 30.0
# At most one warning about refused requests per this many seconds (the others are counted).
REFUSAL_LOG_SECS = 60.0
# Mode of a received replica: the same as a file the node's own save wrote (before the umask).
REPLICA_MODE = 0o644


class TierServer:
    """Serves one node's `local_root` over HTTP until `stop()`.

    Example:
        >>> server = TierServer("/dev/shm/run", host="10.0.0.5", token=secrets.token_hex(16), node=0)
        >>> url = server.start()  # "http://10.0.0.5:40123"
        >>> server.stop()
    """

    def __init__(self, local_root: str, *, host: str, token: str, node: int) -> None:
        self.root = os.path.realpath(local_root)
        self.host, self.token, self.node = host, token, node
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start listening on an ephemeral port of `host`; returns the server's base URL."""
        os.makedirs(self.root, exist_ok=True)
        started = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._serve, args=(started, failure), name=f"shardsafe-tier-node{self.node}", daemon=True
        )
        self._thread.start()
        if not started.wait(START_TIMEOUT_SECS):
            raise TimeoutError(f"the local tier server of node {self.node} did not start on {self.host}")
        if failure:
            raise OSError(f"node {self.node}: local tier server cannot listen on {self.host}: {failure[0]}")
        logger.info("node %d: local tier server for %s at %s", self.node, self.root, self.url)
        return self.url

    def _serve(self, started: threading.Event, failure: list[BaseException]) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._runner = web.AppRunner(self._app(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            sock = socket.create_server((self.host, 0))  # an ephemeral port, known before serving
            self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
            self.url = f"http://{self.host}:{sock.getsockname()[1]}"
        except OSError as e:
            failure.append(e)
            started.set()
            return
        started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=START_TIMEOUT_SECS)
        self._loop = self._thread = None

    # --- requests ---------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_PUT_BYTES)
        app.router.add_get("/v1/steps", self._steps)
        app.router.add_route("HEAD", "/v1/files/{step_dir}/{name}", self._get)
        app.router.add_get("/v1/files/{step_dir}/{name}", self._get, allow_head=False)
        app.router.add_put("/v1/files/{step_dir}/{name}", self._put)
        app.router.add_post("/v1/quarantine/{step_dir}/{name}", self._quarantine)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The token first, then every path error becomes a refusal that says why."""
        given = request.headers.get(TOKEN_HEADER, "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self.token.encode()):
            return _refuse(401, f"node {self.node}: wrong or missing {TOKEN_HEADER}: not this job's request")
        if "/../" in request.raw_path or request.raw_path.startswith("//"):
            return _refuse(403, f"node {self.node}: path {request.raw_path!r} leaves the local tier; refused")
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _refuse(403, f"node {self.node}: {request.raw_path!r} is not a local tier path; refused")
        except TierPathError as e:
            return _refuse(403, f"node {self.node}: {e}; refused")
        except FileNotFoundError:
            return _refuse(404, f"node {self.node}: {request.path} is not held here")

    async def _steps(self, request: web.Request) -> web.Response:
        doc = await asyncio.get_running_loop().run_in_executor(None, _listing, self.root)
        return web.json_response(doc)

    def _file_path(self, request: web.Request, *, create: bool = False) -> tuple[int, str, str]:
        step, step_dir, name = checked_names(request.match_info["step_dir"], request.match_info["name"])
        return step, step_directory(self.root, step_dir, create=create), name

    async def _get(self, request: web.Request) -> web.StreamResponse:
        _, directory, name = self._file_path(request)
        loop = asyncio.get_running_loop()
        fd, size = await loop.run_in_executor(None, open_regular, os.path.join(directory, name))
        try:
            start, end = _byte_range(request.headers.get("Range"), size)
            partial = "Range" in request.headers
            response = web.StreamResponse(status=206 if partial else 200)
            response.content_length = end - start
            response.headers["Accept-Ranges"] = "bytes"
            if partial:
                response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            await response.prepare(request)
            if request.method != "HEAD":
                await self._send(response, fd, start, end)
            return response
        finally:
            os.close(fd)

    async def _send(self, response: web.StreamResponse, fd: int, start: int, end: int) -> None:
        loop = asyncio.get_running_loop()
        offset = start
        while offset < end:
            piece = await loop.run_in_executor(
                None, os.pread, fd, min(SERVE_PIECE_BYTES, end - offset), offset
            )
            if not piece:
                raise OSError(f"file ended at byte {offset} while serving up to {end}")
            await response.write(piece)
            offset += len(piece)

    async def _put(self, request: web.Request) -> web.Response:
        checked_names(request.match_info["step_dir"], request.match_info["name"])  # names before anything
        size, free = request.content_length, shutil.disk_usage(self.root).free
        if size is None or size > min(MAX_PUT_BYTES, free):
            return _refuse(
                413,
                f"node {self.node}: a replica needs a Content-Length of at most {min(MAX_PUT_BYTES, free)} "
                f"bytes (the free space of {self.root}), got {size}",
            )
        step, directory, name = self._file_path(request, create=True)
        want = request.headers.get(SHA256_HEADER, "")
        temp = f"{name}{TEMP_MARK}{secrets.token_hex(6)}"
        try:
            got = await self._receive(request, os.path.join(directory, temp))
            if not hmac.compare_digest(got, want):
                return _refuse(
                    422, f"node {self.node}: step {step} file {name}: body SHA-256 differs from the sender's"
                )
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, verify_received, directory, temp, name)
            os.replace(os.path.join(directory, temp), os.path.join(directory, name))
        except InvalidCheckpointError as e:
            return _refuse(422, f"node {self.node}: step {step} file {name}: {e}")
        finally:
            if os.path.exists(os.path.join(directory, temp)):
                os.unlink(os.path.join(directory, temp))
        return web.Response(status=201, text="verified\n")

    async def _receive(self, request: web.Request, path: str) -> str:
        digest = hashlib.sha256()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, REPLICA_MODE)
        try:
            async for piece in request.content.iter_chunked(SERVE_PIECE_BYTES):
                digest.update(piece)
                os.write(fd, piece)
        finally:
            os.close(fd)
        return digest.hexdigest()

    async def _quarantine(self, request: web.Request) -> web.Response:
        step, directory, name = self._file_path(request)
        loop = asyncio.get_running_loop()
        fd, _ = await loop.run_in_executor(None, open_regular, os.path.join(directory, name))
        os.close(fd)
        try:
            await loop.run_in_executor(None, verify_received, directory, name, name)
        except InvalidCheckpointError as e:
            logger.warning(
                "node %d: own copy of %s of step %d fails its checks: %s", self.node, name, step, e
            )
        else:
            return _refuse(
                409,
                f"node {self.node}: step {step} file {name}: this node's copy passes its own checks; it is "
                "kept (the reader's check may have failed on the reader's side)",
            )
        aside = f"{name}{QUARANTINE_MARK}{int(time.time())}"
        os.rename(os.path.join(directory, name), os.path.join(directory, aside))
        logger.warning(
            "node %d: quarantined %s of step %d (it failed its checksum in a load and here) as %s",
            self.node,
            name,
            step,
            os.path.join(directory, aside),
        )
        return web.Response(status=200, text=json.dumps({"quarantined": aside}))


_refusals = {"last": 0.0, "unlogged": 0}


def _refuse(status: int, message: str) -> web.Response:
    """A refusal that says why; logged as a warning at most once per `REFUSAL_LOG_SECS`."""
    now = time.monotonic()
    if now - _refusals["last"] >= REFUSAL_LOG_SECS or _refusals["last"] == 0.0:
        more = (
            f" ({_refusals['unlogged']} more refused since the last warning)" if _refusals["unlogged"] else ""
        )
        logger.warning("local tier request refused (%d): %s%s", status, message, more)
        _refusals["last"], _refusals["unlogged"] = now, 0
    else:
        _refusals["unlogged"] += 1
        logger.debug("local tier request refused (%d): %s", status, message)
    return web.Response(status=status, text=message + "\n")


def _listing(root: str) -> list[dict[str, Any]]:
    """The holdings of `root` as JSON, each step with its tag (None when it has no valid one)."""
    held = list_holdings(root)
    tags = list_tags(root, sorted(held))
    doc = holdings_to_json(held)
    for item in doc:
        tag = tags.get(item["step"])
        item["tag"] = None if tag is None else json.loads(tag.to_bytes())
    return doc


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """(start, end) of a single `bytes=a-b` range (end exclusive), clipped to the file."""
    if header is None:
        return 0, size
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None:
        raise web.HTTPRequestRangeNotSatisfiable(text=f"only one 'bytes=a-b' range is served, got {header!r}")
    start = int(m[1])
    end = min(int(m[2]) + 1, size) if m[2] else size
    if start >= size and size > 0 or start > end:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end
