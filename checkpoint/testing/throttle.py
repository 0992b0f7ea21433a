"""A loopback TCP proxy that caps each connection's bandwidth, as one stream to a remote store is capped.

One TCP stream to a real object store is limited well below the host's link (window and round trip,
per-connection server limits), which is why shardsafe sends parts and ranges in parallel. On loopback nothing
limits a stream, so a single-stream baseline and a parallel writer both run into the server's own speed and the
comparison says nothing. :func:`throttled_link` puts the per-stream limit back: an asyncio proxy, in a ``spawn``
process of its own (so the caller's event loops and threads never slow it), forwards every connection to the
target port and paces each direction to ``bytes_per_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Iterator
from multiprocessing.connection import Connection

# How long the proxy process may take to start (a spawn child imports little, but the machine may be loaded).
START_TIMEOUT_SECS = 60.0
# Bytes read per step: small enough that pacing is smooth at a few MB/s, large enough to be cheap.
_CHUNK_BYTES = 256 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bytes_per_s: float) -> None:
    """Copies one direction of a connection, never faster than ``bytes_per_s`` (no burst credit when idle)."""
    loop = asyncio.get_running_loop()
    free_at = loop.time()
    try:
        while data := await reader.read(_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
            free_at = max(free_at, loop.time()) + len(data) / bytes_per_s
            await asyncio.sleep(max(0.0, free_at - loop.time()))
    except ConnectionError:
        pass
    finally:
        writer.close()


def _serve_throttled(target_port: int, bytes_per_s: float, ready: Connection) -> None:
    """Serves the proxy on a free loopback port (sent back on ``ready``) until the process is killed."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_pump(client_r, server_w, bytes_per_s), _pump(server_r, client_w, bytes_per_s))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


@contextlib.contextmanager
def throttled_link(endpoint_url: str, bytes_per_s: float) -> Iterator[str]:
    """An endpoint URL that reaches ``endpoint_url`` (``http://127.0.0.1:PORT``) through a per-connection cap.

    Args:
        endpoint_url: the loopback URL to forward to; only its port is used.
        bytes_per_s: the cap of each connection, in each direction.

    Yields:
        ``http://127.0.0.1:<proxy port>``, valid until the context exits (the proxy process is killed then).

    Raises:
        ValueError: ``bytes_per_s`` is not positive.
        TimeoutError: the proxy did not start within ``START_TIMEOUT_SECS``.

    Example:
        >>> with throttled_link(endpoint.endpoint_url, 10e6) as url:  # doctest: +SKIP
        ...     fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, ...)
    """
    if bytes_per_s <= 0:
        raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s}")
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    target_port = int(endpoint_url.rsplit(":", 1)[1].split("/", 1)[0])
    proc = ctx.Process(target=_serve_throttled, args=(target_port, bytes_per_s, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(START_TIMEOUT_SECS):
            raise TimeoutError(f"the throttling proxy did not start within {START_TIMEOUT_SECS} s")
        yield f"http://127.0.0.1:{receive.recv()}"
    finally:
        proc.kill()
        proc.join()
        receive.close()
