"""Requests to a node's local tier server (`checkpoint.tiers.server`), from any process of the job.

Writer processes send replicas (`put_file`); trainer ranks list a node's steps
(`list_node`), read byte ranges through fsspec's HTTP file system
(`peer_storage`, the same `FsspecStorage` reader code as S3) and quarantine a
copy that failed its checksum (`quarantine`). The token travels in a header,
never in a URL, so it never reaches a log line or an error message.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.parse
from typing import Any

from checkpoint.run.identity import LocalTag, parse_tag
from checkpoint.tiers.server import SHA256_HEADER, TOKEN_HEADER
from checkpoint.tiers.tier_files import holdings_from_json
from planners.errors import InvalidCheckpointError, StorageError
from planners.tier_placement import StepHolding

# Seconds a request may take before the peer counts as unreachable (a replica PUT: per socket operation).
REQUEST_TIMEOUT_SECS = 120.0
# Largest listing body read from a peer.
MAX_LISTING_BYTES = 64 * 1024 * 1024
HASH_PIECE_BYTES = 4 * 1024 * 1024
# Total seconds one read from a peer may take (a frozen peer: recovery moves on to the next holder),
# and how often it is tried; `PEER_TIMEOUT_ENV` overrides the seconds.
PEER_READ_TIMEOUT_SECS = 60.0
PEER_READ_ATTEMPTS = 2
PEER_TIMEOUT_ENV = "SHARDSAFE_PEER_TIMEOUT_SECS"


def _connection(base_url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"a local tier server URL is http://host:port, got {base_url!r}")
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), parts.path


def request(
    base_url: str,
    token: str,
    method: str,
    path: str,
    *,
    body: Any = None,
    headers: dict | None = None,
    max_bytes: int = MAX_LISTING_BYTES,
    timeout: float = REQUEST_TIMEOUT_SECS,
) -> tuple[int, bytes]:
    """One request; (status, body). Transport failures raise `OSError` (`timeout`: per socket operation)."""
    conn, _ = _connection(base_url, timeout)
    try:
        conn.request(method, path, body=body, headers={TOKEN_HEADER: token, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read(max_bytes + 1)[:max_bytes]
    finally:
        conn.close()


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(HASH_PIECE_BYTES):
            digest.update(piece)
    return digest.hexdigest()


def put_file(base_url: str, token: str, step_dir: str, path: str, *, node: int) -> None:
    """Send one file as a replica; returns once the peer verified and published it.

    Raises:
        StorageError: the peer refused it (its reason in the message) or could not be reached.
    """
    name = os.path.basename(path)
    headers = {SHA256_HEADER: sha256_of(path), "Content-Length": str(os.path.getsize(path))}
    try:
        with open(path, "rb") as f:
            status, text = request(
                base_url, token, "PUT", f"/v1/files/{step_dir}/{name}", body=f, headers=headers
            )
    except OSError as e:
        raise StorageError(f"replica of {step_dir}/{name} to node {node} ({base_url}) failed: {e}") from e
    if status != 201:
        raise StorageError(
            f"node {node} ({base_url}) refused the replica of {step_dir}/{name} ({status}): "
            f"{text.decode(errors='replace').strip()}"
        )


def list_node(base_url: str, token: str, *, node: int) -> dict[int, StepHolding]:
    """What node `node` holds; `StorageError` when it cannot be reached or refuses."""
    try:
        status, body = request(base_url, token, "GET", "/v1/steps", timeout=peer_timeout_secs())
    except OSError as e:
        raise StorageError(f"node {node}'s local tier ({base_url}) cannot be reached: {e}") from e
    if status != 200:
        raise StorageError(f"node {node}'s local tier ({base_url}) refused a listing ({status})")
    return holdings_from_json(json.loads(body), where=f"node {node} ({base_url})")


def list_node_tags(
    base_url: str, token: str, *, node: int
) -> tuple[dict[int, StepHolding], dict[int, LocalTag | None]]:
    """What node `node` holds and each step's tag (None: none, or not a valid one)."""
    try:
        status, body = request(base_url, token, "GET", "/v1/steps", timeout=peer_timeout_secs())
    except OSError as e:
        raise StorageError(f"node {node}'s local tier ({base_url}) cannot be reached: {e}") from e
    if status != 200:
        raise StorageError(f"node {node}'s local tier ({base_url}) refused a listing ({status})")
    where = f"node {node} ({base_url})"
    doc = json.loads(body)
    held = holdings_from_json(doc, where=where)
    tags: dict[int, LocalTag | None] = {}
    for item in doc:
        raw = item.get("tag") if isinstance(item, dict) else None
        try:
            tags[int(item["step"])] = (
                None if raw is None else parse_tag(json.dumps(raw).encode(), where=where)
            )
        except (InvalidCheckpointError, TypeError, ValueError):
            tags[int(item["step"])] = None
    return held, tags


def peer_timeout_secs() -> float:
    """The total seconds one peer read may take (`PEER_TIMEOUT_ENV`, else `PEER_READ_TIMEOUT_SECS`)."""
    raw = os.environ.get(PEER_TIMEOUT_ENV)
    try:
        value = float(raw) if raw else PEER_READ_TIMEOUT_SECS
    except ValueError:
        raise ValueError(f"{PEER_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{PEER_TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return value


def quarantine(base_url: str, token: str, step_dir: str, name: str, *, node: int) -> bool:
    """Ask node `node` to rename its copy aside; False when it could not (already gone, unreachable)."""
    try:
        status, _ = request(
            base_url, token, "POST", f"/v1/quarantine/{step_dir}/{name}", timeout=peer_timeout_secs()
        )
    except OSError:
        return False
    return status == 200


def peer_storage(base_url: str, token: str, step_dir: str) -> Any:
    """A read-only `FsspecStorage` on a peer's step directory, over fsspec's HTTP file system.

    Each request's total time is bounded (`peer_timeout_secs`) and tried `PEER_READ_ATTEMPTS` times,
    so a frozen peer costs seconds, not aiohttp's default 300 s times the storage's six attempts.
    """
    import aiohttp

    from storage.remote import TransferConfig
    from storage.retry import RetryPolicy
    from storage.spec import StorageSpec

    timeout = aiohttp.ClientTimeout(total=peer_timeout_secs())
    options = {"headers": {TOKEN_HEADER: token}, "simple_links": False, "client_kwargs": {"timeout": timeout}}
    transfer = TransferConfig(retry=RetryPolicy(max_attempts=PEER_READ_ATTEMPTS))
    spec = StorageSpec.resolve(f"{base_url}/v1/files/{step_dir}", storage_options=options, transfer=transfer)
    return spec.open()
