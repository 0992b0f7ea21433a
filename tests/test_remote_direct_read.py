"""Remote loads land byte ranges straight in their targets: exact values, bounded requests, checked parts.

Real servers only: the SeaweedFS S3 gateway (tests/conftest.py), the local tier's HTTP server
(`checkpoint.tiers.server`) read through fsspec's HTTP file system, and a small aiohttp static file
server that counts the range requests it serves at once. Part sizes are set to one or two checksum
blocks, so every region is read as several parts in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from aiohttp import web

import checkpoint
from checkpoint.load.chunk_reader import ChunkReader
from checkpoint.load.loader import load_checkpoint, read_metadata
from checkpoint.options import LoadOptions
from checkpoint.tiers import client
from checkpoint.tiers.server import TierServer
from planners.boxes import Box
from planners.errors import CorruptCheckpointError, InvalidCheckpointError
from planners.load_plan import LoadTarget
from planners.metadata import CHECKSUM_BLOCK_BYTES, METADATA_FILE, SHARD_FILE_RE
from storage import TransferConfig
from storage.backend import open_storage

STEP = "step-000000003"
BLOCK_FLOATS = CHECKSUM_BLOCK_BYTES // 4
A_NUMEL = 4 * BLOCK_FLOATS  # four checksum blocks


def _state() -> dict:
    return {
        "a": torch.arange(A_NUMEL, dtype=torch.float32),  # contiguous, same dtype: lands directly
        "m": torch.arange(300 * 70, dtype=torch.float32).reshape(300, 70) * 0.5,
        "h": torch.arange(5000, dtype=torch.bfloat16),
        "step": 3,
    }


def _zeros() -> dict:
    # "m" goes to a transposed view: not one contiguous run of memory, so it is read through a buffer.
    return {
        "a": torch.zeros(A_NUMEL),
        "m": torch.zeros(70, 300).t(),
        "h": torch.zeros(5000, dtype=torch.bfloat16),
        "step": 0,
    }


def _check(loaded: dict) -> None:
    for key, value in _state().items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value


def _small_parts(**kwargs: object) -> TransferConfig:
    return TransferConfig(read_part_bytes=CHECKSUM_BLOCK_BYTES, **kwargs)  # type: ignore[arg-type]


def _chunk(storage_path: str, options: dict | None, key: str):
    storage = open_storage(storage_path, storage_options=options)
    try:
        (chunk,) = read_metadata(storage).tensors[key].chunks
    finally:
        storage.close()
    return chunk


@pytest.mark.s3
def test_s3_load_lands_every_region_exactly(s3_endpoint, s3_bucket) -> None:
    config = checkpoint.CheckpointerConfig(
        storage_options=s3_endpoint.storage_options, transfer_config=_small_parts(max_reads_in_flight=3)
    )
    ckpt = checkpoint.make_sync_checkpointer(config)
    path = f"{s3_bucket}/run/step-3"
    ckpt.save(_state(), path)
    target = _zeros()
    a_memory = target["a"].data_ptr()
    loaded = ckpt.load(path, target)
    ckpt.close()
    _check(loaded)
    assert loaded["a"].data_ptr() == a_memory  # filled in place


@pytest.mark.s3
def test_s3_flipped_byte_refuses_its_part_and_only_verified_bytes_land(s3_endpoint, s3_bucket, s3_fs) -> None:
    options = s3_endpoint.storage_options
    ckpt = checkpoint.make_sync_checkpointer(
        checkpoint.CheckpointerConfig(storage_options=options, transfer_config=_small_parts())
    )
    path = f"{s3_bucket}/run/step-3"
    ckpt.save(_state(), path)
    a = _chunk(path, options, "a")
    key = f"{path.removeprefix('s3://')}/{a.file}"
    data = bytearray(s3_fs.cat_file(key))
    data[a.offset_bytes + 2 * CHECKSUM_BLOCK_BYTES + 9] ^= 0x40  # block 2 of "a"
    s3_fs.pipe_file(key, bytes(data))
    target = _zeros()
    with pytest.raises(CorruptCheckpointError) as info:
        ckpt.load(path, target)
    ckpt.close()
    lo = a.offset_bytes + 2 * CHECKSUM_BLOCK_BYTES
    assert str(info.value) == (
        f"{path}: file {a.file}, key 'a': checksum mismatch in block 2 "
        f"(bytes [{lo}, {lo + CHECKSUM_BLOCK_BYTES})); the file is corrupt"
    )
    got, expected = target["a"], _state()["a"]
    assert torch.equal(got[2 * BLOCK_FLOATS : 3 * BLOCK_FLOATS], torch.zeros(BLOCK_FLOATS))  # refused part
    # Other parts of "a" may have landed before the refusal; each holds zeros or its verified values.
    for part in got.split(BLOCK_FLOATS):
        index = part.data_ptr() - got.data_ptr()
        want = expected[index // 4 : index // 4 + BLOCK_FLOATS]
        assert torch.equal(part, torch.zeros(BLOCK_FLOATS)) or torch.equal(part, want)
    # The buffered region of the same file is copied only after the file's direct parts all passed.
    assert torch.equal(target["m"], torch.zeros(300, 70)) and target["step"] == 0


@pytest.fixture()
def tier(tmp_path: Path) -> Iterator[dict]:
    """The checkpoint saved on local disk, replicated to a local tier server on loopback."""
    source = tmp_path / "source"
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_state(), str(source))
    ckpt.close()
    token = secrets.token_hex(16)
    server = TierServer(str(tmp_path / "local"), host="127.0.0.1", token=token, node=1)
    url = server.start()
    try:
        names = sorted(p.name for p in source.iterdir() if SHARD_FILE_RE.fullmatch(p.name))
        for name in [*names, METADATA_FILE]:
            client.put_file(url, token, STEP, str(source / name), node=1)
        yield {"url": url, "token": token, "step_dir": tmp_path / "local" / STEP, "shards": names}
    finally:
        server.stop()


def test_http_peer_load_lands_every_region_exactly(tier: dict) -> None:
    storage = client.peer_storage(tier["url"], tier["token"], STEP)
    target = _zeros()
    loaded, missing = load_checkpoint(storage, target, rank=0, world_size=1, options=LoadOptions())
    assert missing == []
    _check(loaded)


def test_http_short_read_is_refused_not_zero_filled(tier: dict) -> None:
    storage = client.peer_storage(tier["url"], tier["token"], STEP)
    metadata = read_metadata(storage)
    (chunk,) = metadata.tensors["a"].chunks
    reader = ChunkReader(storage, metadata, verify=True, io_threads=1)
    target = {"a": torch.full((A_NUMEL,), -1.0)}
    jobs = [(item, target["a"]) for item in reader.plan(_target("a", A_NUMEL), metadata.tensors["a"])]
    # The file shrinks after its size was read: the server clips the last range to what is left.
    cut = chunk.offset_bytes + A_NUMEL * 4 - 100
    os.truncate(tier["step_dir"] / chunk.file, cut)
    with pytest.raises(
        InvalidCheckpointError, match=rf"{chunk.file}: read bytes \[\d+, \d+\): the store returned"
    ):
        reader.run(jobs)
    # The short part never landed (nothing zero-filled): its elements still hold what the target held.
    assert torch.equal(target["a"][-BLOCK_FLOATS:], torch.full((BLOCK_FLOATS,), -1.0))


def _target(fqn: str, numel: int) -> LoadTarget:
    return LoadTarget(
        fqn=fqn, dtype=torch.float32, global_shape=(numel,), box=Box(offsets=(0,), sizes=(numel,))
    )


@contextlib.contextmanager
def _counting_server(root: Path) -> Iterator[tuple[str, dict]]:
    """An aiohttp static file server (ranges, HEAD) that records the most GETs it served at once."""
    seen = {"now": 0, "most": 0, "gets": 0}

    @web.middleware
    async def count(request: web.Request, handler):
        if request.method != "GET":
            return await handler(request)
        seen["now"] += 1
        seen["gets"] += 1
        seen["most"] = max(seen["most"], seen["now"])
        try:
            await asyncio.sleep(0.05)  # holds each answer open, so requests sent together overlap here
            return await handler(request)
        finally:
            seen["now"] -= 1

    loop = asyncio.new_event_loop()
    app = web.Application(middlewares=[count])
    app.router.add_static("/", root)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_range_requests_in_flight_are_bounded_by_the_transfer_config(tmp_path: Path, in_flight: int) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"a": _state()["a"]}, str(tmp_path / "ckpt"))
    ckpt.close()
    with _counting_server(tmp_path) as (url, seen):
        config = checkpoint.CheckpointerConfig(transfer_config=_small_parts(max_reads_in_flight=in_flight))
        ckpt = checkpoint.make_sync_checkpointer(config)
        target = {"a": torch.zeros(A_NUMEL)}
        ckpt.load(f"{url}/ckpt", target)
        ckpt.close()
    assert torch.equal(target["a"], _state()["a"])
    assert seen["gets"] == 1 + 4  # the metadata, then one request per checksum block of "a"
    assert seen["most"] == in_flight
