"""Checkpoints on object stores, end to end: a real S3 server (SeaweedFS), `memory://`, and failing stores.

* Two gloo ranks save to S3 and three load it back resharded; the bytes each loading rank fetches are counted
  by `WrappedFileSystem`, a real fsspec file system that delegates to S3 and counts (no mocks).
* Transient failures are retried (a wrapper that fails the first N requests, and an s3fs subclass that fails
  chosen S3 operations); permanent ones fail at once with the path in the message, after exactly one request.
* A save that dies before its commit is reported incomplete; a missing client package names the extra to
  install; credentials never reach a log line, an error or the metadata file.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import subprocess
import sys
import textwrap
import threading
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs
import torch
from botocore.exceptions import ClientError, ConnectionClosedError
from fsspec.spec import AbstractFileSystem
from s3fs.errors import translate_boto_error

import checkpoint
from checkpoint import CheckpointerConfig, CheckpointWriterConfig, WriterHook
from checkpoint.testing.ranks import run_ranks
from planners.errors import (
    CheckpointExistsError,
    DistributedCheckpointError,
    IncompleteCheckpointError,
    StorageError,
)
from planners.metadata import METADATA_FILE, SHARD_FILE_RE
from storage import RetryPolicy, TransferConfig, open_storage
from storage.redact import Redactor, display_url, secret_values
from storage.remote import FsspecStorage
from storage.retry import is_transient
from tests.dist_states import build_state, check_state

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_secs=0.001, max_backoff_secs=0.01)
# 30 MB of float32 whose rows split 2 ways on save and 3 ways on load at offsets that are not multiples of the
# checksum block, so a verified load really reads partial blocks at its edges.
BIG_SHAPE = (6000, 1250)


def _injected(kind: str, what: str, secret: str = "") -> Exception:
    """An error as the client library raises it, for failure `kind` of request `what`."""
    if kind == "reset":
        return ConnectionResetError(errno.ECONNRESET, f"Connection reset by peer during {what} (injected)")
    if kind == "closed":  # botocore's own transport error, which s3fs passes through after its retries
        return ConnectionClosedError(endpoint_url=f"http://127.0.0.1/{what}")
    if kind == "slowdown":  # a 503 SlowDown as s3fs hands it on: an OSError(EBUSY) caused by the ClientError
        error = ClientError(
            {
                "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                "ResponseMetadata": {"HTTPStatusCode": 503},
            },
            what,
        )
        return translate_boto_error(error)
    if kind == "denied":
        return PermissionError(f"Access Denied ({what}, injected)")
    if kind == "leaky-reset":  # a client that quotes the credential in its error text
        return ConnectionResetError(errno.ECONNRESET, f"reset while signing with {secret} (injected)")
    if kind == "leaky-denied":
        return PermissionError(f"Access Denied for secret {secret} (injected)")
    raise ValueError(kind)


class WrappedFileSystem(AbstractFileSystem):
    """Delegates to a target fsspec file system, counting requests and bytes fetched per file.

    With `fail_first=N` the first N requests raise `failure` instead of reaching the target, as a flaky
    store would. `tag` only makes fsspec's instance cache hand each test a fresh instance, which the test
    then gets back with `fsspec.filesystem("wrapped", **same_options)`.
    """

    protocol = "wrapped"

    def __init__(
        self,
        *,
        target_protocol: str,
        target_options: dict | None = None,
        fail_first: int = 0,
        failure: str = "reset",
        tag: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.fail_first = fail_first
        self.failure = failure
        self.requests = 0
        self.failures = 0
        self.fetched: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _request(self, what: str) -> None:
        with self._lock:
            self.requests += 1
            fail = self.failures < self.fail_first
            self.failures += fail
        if fail:
            raise _injected(self.failure, what)

    def _count(self, path: str, data: Any) -> None:
        if isinstance(data, bytes):
            with self._lock:
                self.fetched[path.rsplit("/", 1)[-1]] += len(data)

    def info(self, path: str, **kwargs: Any) -> dict:
        self._request("info")
        return self.target.info(path, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        self._request("ls")
        return self.target.ls(path, detail=detail, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._request("makedirs")
        self.target.makedirs(path, exist_ok=exist_ok)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: Any = None,
        autocommit: bool = True,
        cache_options: Any = None,
        **kwargs: Any,
    ) -> Any:
        self._request("open")
        return self.target.open(path, mode, block_size=block_size, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self._request("pipe_file")
        self.target.pipe_file(path, value, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self._request("cat_file")
        data = self.target.cat_file(path, start=start, end=end, **kwargs)
        self._count(path, data)
        return data

    def cat_ranges(
        self,
        paths: list,
        starts: list,
        ends: list,
        max_gap: Any = None,
        on_error: str = "return",
        **kwargs: Any,
    ) -> list:
        self._request("cat_ranges")
        out = self.target.cat_ranges(paths, starts, ends, on_error=on_error, **kwargs)
        for path, data in zip(paths, out, strict=True):
            self._count(path, data)
        return out

    def rm_file(self, path: str) -> None:
        self._request("rm_file")
        self.target.rm_file(path)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)


class InstrumentedS3FileSystem(s3fs.S3FileSystem):
    """A real s3fs client that counts S3 requests by operation and can fail chosen ones.

    `inject` maps an operation (`upload_part`), or an operation on one file (`put_object:metadata.json`),
    to the failure kinds its next requests raise, in order; kind `reply-lost` sends the request to the
    server first, then raises a connection reset, as when a reply is lost on the way back. `part_barrier=N` holds each of the first N
    `upload_part` requests until N are in flight together: a client that sends parts one at a time never
    gets past it.
    """

    protocol = "is3"

    def __init__(
        self,
        *args: Any,
        inject: dict | None = None,
        part_barrier: int = 0,
        secret_text: str = "",
        tag: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.plan = {op: list(kinds) for op, kinds in (inject or {}).items()}
        self.calls: Counter[str] = Counter()
        self.part_barrier = part_barrier
        self.secret_text = secret_text
        self._parts_waiting = 0
        self._parts_released: asyncio.Event | None = None

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls[method] += 1
        key = str(kwargs.get("Key", "")).rsplit("/", 1)[-1]
        # A queue for this operation on this file name, when there is one, else the operation's queue.
        queue = self.plan.get(f"{method}:{key}", self.plan.get(method))
        if queue:
            kind = queue.pop(0)
            if kind == "reply-lost":  # the request reaches the server and is done; its reply never arrives
                await super()._call_s3(method, *args, **kwargs)
                raise _injected("reset", method)
            raise _injected(kind, method, self.secret_text)
        if method == "upload_part" and self.part_barrier:
            await self._wait_for_other_parts()
        return await super()._call_s3(method, *args, **kwargs)

    async def _wait_for_other_parts(self) -> None:
        if self._parts_released is None:
            self._parts_released = asyncio.Event()
        if self._parts_released.is_set():
            return
        self._parts_waiting += 1
        if self._parts_waiting >= self.part_barrier:
            self._parts_released.set()
        try:
            await asyncio.wait_for(self._parts_released.wait(), timeout=20)
        except TimeoutError:  # not a transient error: a sequential uploader must fail, not be retried
            raise RuntimeError(
                f"only {self._parts_waiting} upload_part requests were ever in flight"
            ) from None


fsspec.register_implementation("wrapped", WrappedFileSystem, clobber=True)
fsspec.register_implementation("is3", InstrumentedS3FileSystem, clobber=True)


def _bucket_name(s3_bucket: str) -> str:
    return s3_bucket.removeprefix("s3://")


def _state(nbytes: int = 3 * MiB) -> dict:
    return {"w": torch.arange(nbytes // 4, dtype=torch.float32), "step": 7, "opt": {"lr": 0.5}}


def _check(loaded: dict, nbytes: int = 3 * MiB) -> None:
    assert torch.equal(loaded["w"], torch.arange(nbytes // 4, dtype=torch.float32))
    assert loaded["step"] == 7 and loaded["opt"] == {"lr": 0.5}


def _big(mesh: Any, placement: Any, *, zeros: bool) -> Any:
    """The big tensor (or zeros) as a DTensor; every rank cuts its own shard, so nothing crosses ranks."""
    from torch.distributed.tensor import distribute_tensor

    full = (
        torch.zeros(BIG_SHAPE)
        if zeros
        else torch.arange(BIG_SHAPE[0] * BIG_SHAPE[1], dtype=torch.float32).reshape(BIG_SHAPE)
    )
    return distribute_tensor(full, mesh, [placement], src_data_rank=None)


def _save_on_ranks(rank: int, world_size: int, url: str, options: dict) -> None:
    from torch.distributed.tensor import Shard

    state = build_state("row", world_size)
    state["big"] = _big(state["model"]["w"].device_mesh, Shard(0), zeros=False)
    config = CheckpointerConfig(
        storage_options=options, writer_config=CheckpointWriterConfig(max_file_bytes=8 * MiB)
    )
    ckpt = checkpoint.make_sync_checkpointer(config)
    ckpt.save(state, url)
    ckpt.close()


def _load_resharded(rank: int, world_size: int, url: str, options: dict, counting: dict) -> dict:
    from torch.distributed.tensor import Shard

    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))
    for layout, big_dim in (("row", 0), ("col", 1)):
        target = build_state(layout, world_size, zeros=True)
        mesh = target["model"]["w"].device_mesh
        target["big"] = _big(mesh, Shard(big_dim), zeros=True)
        loaded = ckpt.load(url, target, strict=True)
        check_state(loaded)
        assert torch.equal(loaded["big"].to_local(), _big(mesh, Shard(big_dim), zeros=False).to_local())
    ckpt.close()

    # The same checkpoint through the counting wrapper, loading only the big tensor, row-sharded.
    counted = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=counting))
    wrapped_url = "wrapped://" + url.removeprefix("s3://")
    fs = fsspec.filesystem("wrapped", **counting)
    fetched = {}
    for verify in (False, True):
        target = {"big": _big(mesh, Shard(0), zeros=True)}
        fs.fetched.clear()
        counted.load(wrapped_url, target, verify=verify)
        assert torch.equal(target["big"].to_local(), _big(mesh, Shard(0), zeros=False).to_local())
        metadata_bytes = fs.fetched.pop(METADATA_FILE)
        fetched[verify] = dict(fs.fetched)  # per shard file: data, plus its header and checksum table
    counted.close()
    local = target["big"].to_local()
    return {
        "needed": local.numel() * local.element_size(),
        "fetched": fetched,
        "metadata_bytes": metadata_bytes,
    }


@pytest.mark.s3
@pytest.mark.multiproc
def test_two_ranks_save_three_ranks_load_resharded_fetching_only_what_they_need(
    s3_endpoint, s3_bucket, s3_fs
) -> None:
    url = f"{s3_bucket}/run/step-10"
    options = s3_endpoint.storage_options
    counting = {"target_protocol": "s3", "target_options": options, "tag": uuid.uuid4().hex}

    run_ranks(_save_on_ranks, 2, url, options)
    names = [p.rsplit("/", 1)[-1] for p in s3_fs.ls(url, detail=False)]
    shards = [SHARD_FILE_RE.fullmatch(n) for n in names if n != METADATA_FILE]
    reports = run_ranks(_load_resharded, 3, url, options, counting)

    assert METADATA_FILE in names
    # Each rank's big chunk (15 MB, over max_file_bytes) gets a file of its own, the small tensors another.
    assert all(shards) and Counter(int(m["rank"]) for m in shards) == {0: 2, 1: 2}
    metadata_size = s3_fs.size(f"{url}/{METADATA_FILE}")
    # Format version 2: a rank also reads the header and checksum table of each shard file it reads from.
    index_bytes = {}
    for name in names:
        if name != METADATA_FILE:
            with s3_fs.open(f"{url}/{name}", "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            table = header.get("__shardsafe_crc32c__", {"data_offsets": [0, 0]})["data_offsets"]
            index_bytes[name] = 8 + n + (table[1] - table[0] if "__shardsafe_crc32c__" in header else 0)
    for report in reports:
        assert report["needed"] == 2000 * 1250 * 4
        data = {v: sum(f.values()) - sum(index_bytes[n] for n in f) for v, f in report["fetched"].items()}
        # Without verification exactly the bytes needed; with it, also the partial checksum blocks at the edges.
        assert data[False] == report["needed"]
        assert report["needed"] < data[True] <= 1.1 * report["needed"]
        assert report["metadata_bytes"] == metadata_size


def test_memory_round_trip() -> None:
    url = f"memory://roundtrip-{uuid.uuid4().hex}/step-1"
    ckpt = checkpoint.make_sync_checkpointer()

    ckpt.save(build_state("plain", 1), url)
    loaded = ckpt.load(url, build_state("plain", 1, zeros=True), strict=True)
    whole = ckpt.load(url)
    ckpt.close()

    check_state(loaded)
    check_state(whole)


@pytest.mark.parametrize("failure", ["reset", "closed", "slowdown"])
def test_transient_errors_are_retried_until_the_save_and_load_succeed(failure: str, caplog) -> None:
    options = {"target_protocol": "memory", "fail_first": 3, "failure": failure, "tag": uuid.uuid4().hex}
    url = f"wrapped://retry-{uuid.uuid4().hex}/ckpt"
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))

    with caplog.at_level(logging.WARNING, logger="storage.retry"):
        ckpt.save(_state(), url)
        loaded = ckpt.load(url)
    ckpt.close()

    _check(loaded)
    assert fsspec.filesystem("wrapped", **options).failures == 3
    retries = [r for r in caplog.records if r.name == "storage.retry"]
    assert len(retries) == 3 and all(url.removeprefix("wrapped://") in r.getMessage() for r in retries)


def test_transient_errors_on_every_attempt_give_up_after_max_attempts() -> None:
    fs = WrappedFileSystem(
        target_protocol="memory", fail_first=1000, failure="slowdown", skip_instance_cache=True
    )
    storage = FsspecStorage(
        fs, "bounded/ckpt", url="wrapped://bounded/ckpt", transfer=TransferConfig(retry=FAST_RETRY)
    )

    with pytest.raises(
        StorageError, match=r"wrapped://bounded/ckpt/metadata.json: read failed after 4 attempts"
    ) as e:
        storage.read_bytes(METADATA_FILE)

    assert type(e.value) is StorageError
    assert fs.requests == 4


@pytest.mark.parametrize("kind", ["denied", "missing"])
def test_permanent_errors_fail_at_once_naming_the_path(kind: str) -> None:
    fs = WrappedFileSystem(
        target_protocol="memory",
        fail_first=1000 if kind == "denied" else 0,
        failure="denied",
        skip_instance_cache=True,
    )
    storage = FsspecStorage(
        fs,
        f"permanent-{uuid.uuid4().hex}/ckpt",
        url="wrapped://bucket/ckpt",
        transfer=TransferConfig(retry=FAST_RETRY),
    )
    expected = StorageError if kind == "denied" else FileNotFoundError

    with pytest.raises(expected, match=r"wrapped://bucket/ckpt/metadata.json: read failed") as e:
        storage.read_bytes(METADATA_FILE)

    assert type(e.value) is expected
    assert fs.requests == 1
    if kind == "denied":
        assert "check the credentials and permissions given in storage_options" in str(e.value)


@pytest.mark.s3
def test_s3_part_uploads_and_reads_retry_each_request(s3_endpoint, s3_bucket, s3_fs) -> None:
    options = {
        **s3_endpoint.storage_options,
        "tag": uuid.uuid4().hex,
        "inject": {
            "upload_part": ["reset", "slowdown"],
            "complete_multipart_upload": ["closed"],
            "get_object:metadata.json": ["slowdown"],
            "get_object": ["reset", "reset"],
        },
    }
    path = f"{_bucket_name(s3_bucket)}/ckpt"
    # 16 MiB parts (the default is 8 MiB): the request counts below are written for three parts.
    transfer = TransferConfig(upload_part_bytes=16 * MiB)
    ckpt = checkpoint.make_sync_checkpointer(
        CheckpointerConfig(storage_options=options, transfer_config=transfer)
    )

    ckpt.save(_state(40 * MiB), f"is3://{path}")  # one 40 MiB shard file: parts of 16, 16 and 8 MiB
    loaded = ckpt.load(f"is3://{path}")  # the shard's bytes: three ranged GETs of at most 16 MiB
    ckpt.close()

    _check(loaded, 40 * MiB)
    calls = fsspec.filesystem("is3", **options).calls
    assert calls["create_multipart_upload"] == 1
    assert calls["upload_part"] == 3 + 2
    assert calls["complete_multipart_upload"] == 1 + 1
    assert calls["abort_multipart_upload"] == 0
    assert calls["get_object"] == (1 + 1) + (3 + 2)  # metadata once retried; two of three ranges retried
    (shard,) = [p for p in s3_fs.ls(path, detail=False) if SHARD_FILE_RE.fullmatch(p.rsplit("/", 1)[-1])]
    assert s3_fs.info(shard)["ETag"].strip('"').endswith("-3")  # one object from a three-part upload


@pytest.mark.s3
def test_a_lost_reply_to_the_conditional_metadata_put_is_not_taken_for_another_save(
    s3_endpoint, s3_bucket, s3_fs
) -> None:
    """The metadata PUT lands but its reply is lost: the retry meets our own object (412), which is a commit."""
    options = {
        **s3_endpoint.storage_options,
        "tag": uuid.uuid4().hex,
        "inject": {"put_object:metadata.json": ["reply-lost"]},
    }
    path = f"{_bucket_name(s3_bucket)}/ckpt"
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))

    ckpt.save(_state(), f"is3://{path}")  # overwrite=False: the commit is the conditional PUT
    _check(ckpt.load(f"is3://{path}"))
    # The checkpoint counts as there: a second save to the path is refused.
    with pytest.raises(CheckpointExistsError, match="already exists"):
        ckpt.save(_state(), f"is3://{path}")
    ckpt.close()

    assert fsspec.filesystem("is3", **options).calls["put_object"] >= 2  # the lost attempt and its retry
    assert checkpoint.verify(f"s3://{path}", storage_options=s3_endpoint.storage_options).ok


@pytest.mark.s3
def test_s3_upload_keeps_several_parts_in_flight(s3_endpoint, s3_bucket) -> None:
    options = {**s3_endpoint.storage_options, "part_barrier": 3, "tag": uuid.uuid4().hex}
    storage = open_storage(
        f"is3://{_bucket_name(s3_bucket)}/ckpt",
        storage_options=options,
        transfer=TransferConfig(upload_part_bytes=5 * MiB, max_parts_in_flight=3),
    )
    data = bytes(range(256)) * (16 * MiB // 256)

    with storage.open_write("shard") as f:  # parts 1-3 wait until all three are in flight together
        f.write(data)

    assert storage.read_bytes("shard") == data
    assert fsspec.filesystem("is3", **options).calls["upload_part"] == 4


@pytest.mark.s3
def test_s3_upload_by_default_sends_sixteen_parts_of_5_mib_at_once(s3_endpoint, s3_bucket, s3_fs) -> None:
    """Issue 26 item 6: a file spreads over 16 parallel part requests, with connections for all of them.

    The barrier holds the first 16 parts until all 16 are in flight together (8 MiB parts, 8 in flight
    never get there); the 17th follows once one is done. s3fs's client is built with a pool of 20
    connections (16 parts, 4 spare), where botocore's default of 10 would queue six of the parts.
    """
    options = {**s3_endpoint.storage_options, "part_barrier": 16, "tag": uuid.uuid4().hex}
    storage = open_storage(f"is3://{_bucket_name(s3_bucket)}/ckpt", storage_options=options)
    data = bytes(range(256)) * (80 * MiB // 256) + b"!"

    with storage.open_write("shard") as f:
        f.write(data)

    assert storage.read_bytes("shard") == data
    fs = fsspec.filesystem("is3", **options)
    assert fs.calls["upload_part"] == 17
    assert s3_fs.info(f"{_bucket_name(s3_bucket)}/ckpt/shard")["ETag"].strip('"').endswith("-17")
    assert fs.config_kwargs["max_pool_connections"] == 20
    assert fs.s3._endpoint.http_session._max_pool_connections == 20  # the client as built


@pytest.mark.s3
def test_a_connection_pool_chosen_in_the_storage_options_is_kept(s3_endpoint, s3_bucket) -> None:
    options = {
        **s3_endpoint.storage_options,
        "config_kwargs": {"max_pool_connections": 12},
        "tag": uuid.uuid4().hex,
    }
    storage = open_storage(f"is3://{_bucket_name(s3_bucket)}/ckpt", storage_options=options)

    assert storage.exists("shard") is False  # the first request builds the client

    fs = fsspec.filesystem("is3", **options)
    assert fs.config_kwargs == {"max_pool_connections": 12}
    assert fs.s3._endpoint.http_session._max_pool_connections == 12


@pytest.mark.s3
def test_a_part_that_fails_for_good_aborts_the_upload_and_leaves_no_object(
    s3_endpoint, s3_bucket, s3_fs
) -> None:
    """Part 1 is refused while other parts are in flight: the upload is aborted, nothing is stored."""
    options = {**s3_endpoint.storage_options, "inject": {"upload_part": ["denied"]}, "tag": uuid.uuid4().hex}
    url = f"is3://{_bucket_name(s3_bucket)}/ckpt"
    storage = open_storage(url, storage_options=options)
    data = bytes(range(256)) * (40 * MiB // 256)

    with pytest.raises(StorageError, match=rf"{url}/shard: upload part 1 failed: PermissionError") as e:
        with storage.open_write("shard") as f:
            f.write(data)

    assert type(e.value) is StorageError
    assert storage.exists("shard") is False
    calls = fsspec.filesystem("is3", **options).calls
    assert calls["create_multipart_upload"] == 1
    assert calls["abort_multipart_upload"] == 1
    assert calls["complete_multipart_upload"] == 0
    listed = s3_fs.call_s3("list_multipart_uploads", Bucket=_bucket_name(s3_bucket))
    assert [u["Key"] for u in listed.get("Uploads", [])] == []


@pytest.mark.s3
def test_wrong_credentials_fail_at_once_naming_the_path(s3_endpoint, s3_bucket) -> None:
    secret = f"wrong-secret-{uuid.uuid4().hex}"
    options = {**s3_endpoint.storage_options, "secret": secret, "tag": uuid.uuid4().hex}
    url = f"is3://{_bucket_name(s3_bucket)}/ckpt"
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))

    with pytest.raises(StorageError, match=rf"{url}: check bucket failed: PermissionError") as e:
        ckpt.save(_state(), url)
    ckpt.close()

    assert type(e.value) is StorageError
    assert "check the credentials and permissions given in storage_options" in str(e.value)
    assert secret not in str(e.value)
    assert sum(fsspec.filesystem("is3", **options).calls.values()) == 1


@pytest.mark.s3
def test_missing_bucket_fails_at_once_and_is_not_created(s3_endpoint, s3_fs) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=s3_endpoint.storage_options))

    with pytest.raises(StorageError, match=rf"s3://{bucket}/ckpt: bucket '{bucket}' does not exist") as e:
        ckpt.save(_state(), f"s3://{bucket}/ckpt")
    ckpt.close()

    assert type(e.value) is StorageError
    assert s3_fs.exists(bucket) is False


class _FailingHook(WriterHook):
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        raise RuntimeError("pre-commit check failed (injected)")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        raise AssertionError("post_commit must not run after a failed commit")


@pytest.mark.s3
@pytest.mark.parametrize("failure", ["metadata PUT denied", "writer failed before commit"])
def test_save_that_fails_before_its_commit_is_reported_incomplete(
    failure: str, s3_endpoint, s3_bucket, s3_fs
) -> None:
    path = f"{_bucket_name(s3_bucket)}/ckpt"
    inject = {"put_object:metadata.json": ["denied"]} if failure == "metadata PUT denied" else {}
    options = {**s3_endpoint.storage_options, "inject": inject, "tag": uuid.uuid4().hex}
    hook = _FailingHook() if failure == "writer failed before commit" else None
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options), commit_hook=hook)

    with pytest.raises(DistributedCheckpointError, match=f"save to is3://{path} failed") as saved:
        ckpt.save(_state(), f"is3://{path}")
    assert type(saved.value) is DistributedCheckpointError
    if hook is not None:  # refused before any metadata PUT: the rank took back its shard file
        with pytest.raises(FileNotFoundError, match=f"no checkpoint at is3://{path}") as loaded:
            ckpt.load(f"is3://{path}")
        ckpt.close()
        assert type(loaded.value) is FileNotFoundError
        names = [p.rsplit("/", 1)[-1] for p in s3_fs.ls(path, detail=False, refresh=True)]
        assert [n for n in names if n] == []  # no object; SeaweedFS lists the emptied prefix as "ckpt/"
        return
    with pytest.raises(
        IncompleteCheckpointError, match=f"checkpoint at is3://{path} is incomplete"
    ) as loaded:
        ckpt.load(f"is3://{path}")
    ckpt.close()

    assert type(loaded.value) is IncompleteCheckpointError
    names = [p.rsplit("/", 1)[-1] for p in s3_fs.ls(path, detail=False, refresh=True)]
    # A metadata PUT that failed may still have landed, so the shard file stays; the metadata is not there.
    assert len(names) == 1 and SHARD_FILE_RE.fullmatch(names[0])


def test_missing_client_package_names_the_extra(tmp_path: Path) -> None:
    # Run where s3fs, gcsfs and adlfs cannot be imported (a None entry in sys.modules blocks the import).
    script = textwrap.dedent(
        """
        import sys
        for name in ("s3fs", "gcsfs", "adlfs"):
            sys.modules[name] = None
        from planners.errors import CheckpointError
        from storage import open_storage
        for url in ("s3://bucket/ckpt", "gs://bucket/ckpt", "az://container/ckpt"):
            try:
                open_storage(url)
            except CheckpointError as e:
                print(type(e).__name__, "|", e)
        """
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60, check=True
    )

    lines = out.stdout.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["CheckpointError"] * 3
    assert "cannot open s3://bucket/ckpt: the s3:// backend is not installed" in lines[0]
    assert [line.rsplit("; ", 1)[-1] for line in lines] == [
        "pip install 'shardsafe[s3]'",
        "pip install 'shardsafe[gcs]'",
        "pip install 'shardsafe[azure]'",
    ]


@pytest.mark.s3
def test_credentials_never_reach_logs_errors_or_metadata(s3_endpoint, s3_bucket, s3_fs, caplog) -> None:
    key, secret = s3_endpoint.key, s3_endpoint.secret
    path = f"{_bucket_name(s3_bucket)}/ckpt"
    # A client whose errors quote the secret: on a read that is retried, then on one that is refused.
    options = {
        **s3_endpoint.storage_options,
        "tag": uuid.uuid4().hex,
        "secret_text": secret,
        "inject": {"get_object": ["leaky-reset"]},
    }
    refusing = {**options, "tag": uuid.uuid4().hex, "inject": {"get_object": ["leaky-denied"]}}
    wrong_key = {**options, "tag": uuid.uuid4().hex, "inject": {}, "key": "AKIA-wrong-key"}
    config = CheckpointerConfig(storage_options=options)
    ckpt = checkpoint.make_sync_checkpointer(config)
    errors: list[BaseException] = []

    with (
        caplog.at_level(logging.DEBUG, logger="checkpoint"),
        caplog.at_level(logging.DEBUG, logger="storage"),
    ):
        ckpt.save(_state(), f"is3://{path}")
        _check(ckpt.load(f"is3://{path}"))
        attempts = [
            (refusing, lambda c: c.load(f"is3://{path}")),
            (options, lambda c: c.load(f"is3://{_bucket_name(s3_bucket)}/nothing-here")),
            (wrong_key, lambda c: c.save(_state(), f"is3://{path}-2")),
        ]
        for storage_options, attempt in attempts:
            with checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=storage_options)) as c:
                with pytest.raises((StorageError, FileNotFoundError)) as e:
                    attempt(c)
            errors.append(e.value)
    ckpt.close()

    assert [type(e) for e in errors] == [StorageError, FileNotFoundError, StorageError]
    # The quoted secret was redacted, and the original error (which holds it) left out of the chain.
    assert "***" in str(errors[0]) and errors[0].__cause__ is None
    texts = [r.getMessage() for r in caplog.records] + [
        "".join(traceback.format_exception(e)) for e in errors
    ]
    texts += [
        s3_fs.cat(f"{path}/{METADATA_FILE}").decode(),
        repr(config),
        repr(open_storage(f"is3://{path}", storage_options=options)),
    ]
    # The retried read's warning was logged, redacted.
    assert any("retrying" in t and "***" in t for t in texts)
    for text in texts:
        assert secret not in text and "AKIA-wrong-key" not in text and key not in text


def test_transient_and_permanent_errors_are_told_apart() -> None:
    throttled = ClientError(
        {"Error": {"Code": "Throttling"}, "ResponseMetadata": {"HTTPStatusCode": 400}}, "PutObject"
    )
    server = ClientError(
        {"Error": {"Code": "Oops"}, "ResponseMetadata": {"HTTPStatusCode": 502}}, "GetObject"
    )
    no_bucket = translate_boto_error(
        ClientError(
            {"Error": {"Code": "NoSuchBucket"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject"
        )
    )
    denied = translate_boto_error(
        ClientError(
            {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject"
        )
    )
    cases = {
        "reset": (_injected("reset", "x"), True),
        "closed": (_injected("closed", "x"), True),
        "slowdown": (_injected("slowdown", "x"), True),
        "throttling": (throttled, True),
        "502": (server, True),
        "timeout": (TimeoutError("read timed out"), True),
        "no such bucket": (no_bucket, False),
        "access denied": (denied, False),
        "value": (ValueError("bad range"), False),
    }

    assert {name: is_transient(error) for name, (error, _) in cases.items()} == {
        n: t for n, (_, t) in cases.items()
    }
    assert type(no_bucket) is FileNotFoundError and type(denied) is PermissionError


def test_redaction_of_urls_and_options() -> None:
    options = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t-value",
        "client_kwargs": {"endpoint_url": "http://h:9000"},
        "token": "tok-123",
        "anon": False,
        "region_name": "us-east-1",
    }

    assert secret_values(options) == ("s3cr3t-value", "AKIAEXAMPLE", "tok-123")
    assert Redactor(secret_values(options))("key AKIAEXAMPLE secret s3cr3t-value at http://h:9000") == (
        "key *** secret *** at http://h:9000"
    )
    assert display_url("ftp://alice:pw@host/ckpt") == "ftp://***@host/ckpt"
    assert display_url("simplecache::s3://bucket/ckpt") == "simplecache::s3://bucket/ckpt"


@pytest.mark.s3
def test_transfer_config_from_the_checkpointer_config_sets_the_part_size(
    s3_endpoint, s3_bucket, s3_fs
) -> None:
    from storage import TransferConfig

    config = CheckpointerConfig(
        storage_options=s3_endpoint.storage_options, transfer_config=TransferConfig(upload_part_bytes=5 * MiB)
    )
    path = f"{s3_bucket}/parts"
    ckpt = checkpoint.make_sync_checkpointer(config)
    ckpt.save(_state(12 * MiB), path)
    loaded = ckpt.load(path)
    ckpt.close()
    _check(loaded, 12 * MiB)
    bucket_path = path.removeprefix("s3://")
    (shard,) = [
        p for p in s3_fs.ls(bucket_path, detail=False) if SHARD_FILE_RE.fullmatch(p.rsplit("/", 1)[-1])
    ]
    assert s3_fs.info(shard)["ETag"].strip('"').endswith("-3")  # 12 MiB + header in parts of 5, 5 and 2 MiB
