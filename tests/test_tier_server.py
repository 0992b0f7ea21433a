"""The local tier's HTTP server against real clients: replicas verified on receipt, ranges, refusals.

A real `TierServer` serves a node's local root on loopback. Replicas are sent
with the tier's own client (`checkpoint.tiers.client`); hostile requests with
`http.client` and raw sockets, as a foreign client would send them. A
checkpoint is then loaded from the server through fsspec's HTTP file system
with the ordinary loader, resharded into a slice, and compared exactly.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import socket
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import checkpoint
from checkpoint.load.loader import load_checkpoint
from checkpoint.options import LoadOptions
from checkpoint.testing.ranks import run_ranks
from checkpoint.tiers import client
from checkpoint.tiers.server import SHA256_HEADER, TOKEN_HEADER, TierServer
from planners.errors import StorageError
from planners.metadata import METADATA_FILE, SHARD_FILE_RE
from tests.damage import put_file, read_file

STEP = "step-000000007"


def _state(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,))
    w = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    return {"w": distribute_tensor(w, mesh, [Shard(0)], src_data_rank=None), "b": torch.ones(3), "n": 5}


def _save_two_ranks(rank: int, world_size: int, path: str) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_state(rank, world_size), path)  # DTensor chunks: shard files carry their checksum table
    ckpt.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tier") / "source"
    run_ranks(_save_two_ranks, 2, str(path), timeout_secs=120)
    return path


@pytest.fixture()
def tier(tmp_path: Path, source: Path):
    """A server on an empty local root, a committed checkpoint to replicate, and the token."""
    state = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "b": torch.ones(3), "n": 5}
    token = secrets.token_hex(16)
    server = TierServer(str(tmp_path / "local"), host="127.0.0.1", token=token, node=1)
    url = server.start()
    yield {"url": url, "token": token, "source": source, "root": tmp_path / "local", "state": state}
    server.stop()


def _files(source: Path) -> list[str]:
    return sorted(p.name for p in source.iterdir() if SHARD_FILE_RE.fullmatch(p.name)) + [METADATA_FILE]


def _replicate(tier: dict) -> None:
    for name in _files(tier["source"]):
        client.put_file(tier["url"], tier["token"], STEP, str(tier["source"] / name), node=1)


def test_replicas_are_byte_identical_listed_and_load_through_fsspec_http(tier: dict) -> None:
    _replicate(tier)
    for name in _files(tier["source"]):
        assert read_file(str(tier["root"] / STEP), name) == read_file(str(tier["source"]), name), name
    held = client.list_node(tier["url"], tier["token"], node=1)
    assert list(held) == [7] and held[7].committed
    assert set(held[7].required) == set(_files(tier["source"]))
    assert dict(held[7].present) == dict(held[7].required)

    storage = client.peer_storage(tier["url"], tier["token"], STEP)
    target = {"w": torch.zeros(64, 64), "b": torch.zeros(3), "n": None}
    loaded, missing = load_checkpoint(storage, target, rank=0, world_size=1, options=LoadOptions())
    assert missing == [] and loaded["n"] == 5
    assert torch.equal(loaded["w"], tier["state"]["w"]) and torch.equal(loaded["b"], tier["state"]["b"])


def test_a_corrupt_body_is_refused_and_never_becomes_visible(tier: dict, tmp_path: Path) -> None:
    shard = _files(tier["source"])[0]
    assert SHARD_FILE_RE.fullmatch(shard)["rank"] == "00000"  # holds rank 0's DTensor chunk: a checksum table
    data = bytearray(read_file(str(tier["source"]), shard))
    data[8 + int.from_bytes(data[:8], "little") + 10] ^= (
        0x01  # tensor data: a file damaged on the sender's disk
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    put_file(str(bad), shard, bytes(data))
    with pytest.raises(StorageError, match=rf"node 1 .*refused the replica of {STEP}/{shard} \(422\)"):
        client.put_file(tier["url"], tier["token"], STEP, str(bad / shard), node=1)
    assert sorted(os.listdir(tier["root"] / STEP)) == []  # neither the file nor a temporary name is left

    # The right body with the wrong digest (damaged in transit) is refused too.
    conn = http.client.HTTPConnection("127.0.0.1", int(tier["url"].rsplit(":", 1)[1]))
    body = read_file(str(tier["source"]), shard)
    conn.request(
        "PUT",
        f"/v1/files/{STEP}/{shard}",
        body=body,
        headers={TOKEN_HEADER: tier["token"], SHA256_HEADER: "0" * 64},
    )
    response = conn.getresponse()
    assert response.status == 422 and b"SHA-256 differs" in response.read()
    assert os.listdir(tier["root"] / STEP) == []


def _raw(url: str, request_line: str, token: str) -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            f"{request_line}\r\nHost: x\r\n{TOKEN_HEADER}: {token}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def test_server_refuses_wrong_token_traversal_absolute_paths_and_symlinks(tier: dict, tmp_path: Path) -> None:
    _replicate(tier)
    shard = _files(tier["source"])[0]
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    url, token = tier["url"], tier["token"]

    status, body = _raw(url, f"GET /v1/files/{STEP}/{shard} HTTP/1.1", "another-jobs-token")
    assert status == 401 and "wrong or missing X-Shardsafe-Token" in body
    status, body = _raw(url, "GET /v1/steps HTTP/1.1", "")
    assert status == 401

    for line in (
        f"GET /v1/files/{STEP}/../../../secret.txt HTTP/1.1",
        f"GET /v1/files/{STEP}/..%2F..%2Fsecret.txt HTTP/1.1",
        f"GET /v1/files//{secret} HTTP/1.1",
        f"GET /v1/files/{STEP}/{secret} HTTP/1.1",
        f"GET {secret} HTTP/1.1",
        f"PUT /v1/files/{STEP}/..%2Fevil.safetensors HTTP/1.1",
    ):
        status, body = _raw(url, line, token)
        assert status == 403 and "refused" in body and "not yours" not in body, (line, status, body)

    # A link planted in the local root, to a file outside it and as a whole step directory.
    os.symlink(secret, tier["root"] / STEP / "shard-0123456789abcdef-r00009-000.safetensors")
    os.symlink(tmp_path, tier["root"] / "step-000000008")
    status, body = _raw(
        url, f"GET /v1/files/{STEP}/shard-0123456789abcdef-r00009-000.safetensors HTTP/1.1", token
    )
    assert status == 403 and "symbolic link" in body and "not yours" not in body
    status, body = _raw(url, f"GET /v1/files/step-000000008/{METADATA_FILE} HTTP/1.1", token)
    assert status == 403 and "symbolic link" in body
    assert list(client.list_node(url, token, node=1)) == [7]  # links are not listed either


def test_a_replica_without_a_length_or_larger_than_the_free_space_is_refused(tier: dict) -> None:
    free = shutil.disk_usage(tier["root"]).free
    for length in (None, str(free + 1)):
        headers = {} if length is None else {"Content-Length": length}
        line = f"PUT /v1/files/{STEP}/{METADATA_FILE} HTTP/1.1"
        host, port = tier["url"].removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            s.sendall(
                f"{line}\r\nHost: x\r\n{TOKEN_HEADER}: {tier['token']}\r\n{extra}Connection: close\r\n\r\n".encode()
            )
            reply = s.recv(65536).decode(errors="replace")
        assert reply.split()[1] == "413" and "Content-Length of at most" in reply, (length, reply)
    assert not (tier["root"] / STEP).exists()


def test_quarantine_renames_a_copy_aside(tier: dict) -> None:
    _replicate(tier)
    shard = _files(tier["source"])[0]
    # A reader's word alone is not enough (issue 23 item 10): the holder's own copy verifies, so it stays.
    assert not client.quarantine(tier["url"], tier["token"], STEP, shard, node=1)
    assert shard in os.listdir(tier["root"] / STEP)
    data = bytearray((tier["root"] / STEP / shard).read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 10] ^= 0x04  # the holder's copy now fails its checksums
    (tier["root"] / STEP / shard).write_bytes(bytes(data))
    assert client.quarantine(tier["url"], tier["token"], STEP, shard, node=1)
    names = os.listdir(tier["root"] / STEP)
    assert shard not in names and any(n.startswith(f"{shard}.quarantined-") for n in names)
    held = client.list_node(tier["url"], tier["token"], node=1)
    assert shard not in held[7].present and held[7].committed
    storage = client.peer_storage(tier["url"], tier["token"], STEP)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(storage, {"w": torch.zeros(64, 64)}, rank=0, world_size=1, options=LoadOptions())
