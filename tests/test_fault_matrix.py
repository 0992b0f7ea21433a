"""The fault matrix: each fault, on local disk and on the real S3 server, during an overwriting save.

Every case saves version 1, then saves version 2 over it with `overwrite=True` while the fault hits,
then checks: the save failed with a `CheckpointError` within a bounded time (or, where the fault is a
process dying, the process is gone), no torn checkpoint was committed, version 1 still loads bit-exact
(version 2 where the save legitimately won), and the next save (version 3) succeeds and loads.

Faults are real where they can be: a file size limit (RLIMIT_FSIZE) in a child process for a full
disk, SIGKILL of a child trainer, of the async writer process and of a SeaweedFS server of its own,
two real saves racing. EIO comes from a wrapper file system whose Nth write fails; a full bucket,
connection resets and 503 SlowDown come from a real s3fs client that turns chosen requests into the
errors the client library raises (the same client as tests/test_s3_checkpoint.py).

With `SHARDSAFE_FAULT_MATRIX_JSON=<file>` the module writes its summary (faults tried, survived, data
lost) there; `python -m benchmarks.fault_table` turns it into the README table.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs
import torch
from botocore.exceptions import ClientError
from fsspec.spec import AbstractFileSystem
from s3fs.errors import translate_boto_error

import checkpoint
import tests.test_s3_checkpoint  # noqa: F401  (registers is3://, the fault-injecting s3fs client)
from checkpoint import CheckpointerConfig, CheckpointError, CheckpointExistsError, WriterHook
from checkpoint.testing.s3server import S3Endpoint, S3ServerError, SeaweedS3Server
from storage.remote import TransferConfig
from storage.retry import RetryPolicy

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
# A fault must end the save within this (the retries below give up in well under a second).
FAIL_WITHIN_SECS = 60.0
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_secs=0.01, max_backoff_secs=0.05)
_RESULTS: list[dict[str, Any]] = []


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where a case saves: `url` as the checkpointer sees it, `plain` for the plain loader."""

    backend: str
    url: str
    options: dict[str, Any] | None
    plain: str
    plain_options: dict[str, Any] | None


def _state(version: int, numel: int = 6 * MiB // 4) -> dict[str, Any]:
    return {"w": torch.arange(numel, dtype=torch.float32) + version, "step": version}


def _sync(url_options: dict | None, hook: WriterHook | None = None) -> checkpoint.SyncCheckpointer:
    config = CheckpointerConfig(
        storage_options=url_options,
        transfer_config=TransferConfig(upload_part_bytes=5 * MiB, retry=FAST_RETRY),
    )
    return checkpoint.make_sync_checkpointer(config, commit_hook=hook)


def _loads_as(target: Target, version: int) -> bool:
    ckpt = _sync(target.plain_options)
    try:
        loaded = ckpt.load(target.plain)
        return torch.equal(loaded["w"], _state(version)["w"]) and loaded["step"] == version
    except CheckpointError:
        return False
    finally:
        ckpt.close()


def _run_case(
    target: Target, fault: str, inject: Callable[[], tuple[BaseException | None, int | None]]
) -> None:
    """Version 1, the faulty version-2 save, the checks, version 3; records the outcome."""
    ckpt = _sync(target.plain_options)
    ckpt.save(_state(1), target.plain, overwrite=True)
    start = time.monotonic()
    error, winner = inject()
    seconds = time.monotonic() - start
    previous = winner or 1
    kept = _loads_as(target, previous)
    ckpt.save(_state(3), target.plain, overwrite=True)
    next_ok = _loads_as(target, 3)
    ckpt.close()
    _RESULTS.append(
        {
            "backend": target.backend,
            "fault": fault,
            "error": error if isinstance(error, str) or error is None else type(error).__name__,
            "seconds": round(seconds, 2),
            "previous_loads": kept,
            "next_save_ok": next_ok,
            "data_lost": not kept,
        }
    )
    assert kept, f"{fault} on {target.backend}: version {previous} no longer loads bit-exact"
    assert next_ok, f"{fault} on {target.backend}: the next save failed"
    assert seconds < FAIL_WITHIN_SECS, f"{fault} on {target.backend}: took {seconds:.1f}s"


def _failing_save(options: dict, url: str) -> Callable[[], tuple[BaseException | None, int | None]]:
    """The fault injection of a case whose storage fails: version 2 saved through `options`, expected to fail."""
    return lambda: (_expect_failure(lambda: _sync(options).save(_state(2), url, overwrite=True)), None)


def _expect_failure(save: Callable[[], Any]) -> BaseException:
    try:
        save()
    except CheckpointError as e:
        return e
    raise AssertionError("the save reported success through the fault")


# ---------------------------------------------------------------- fault injectors


class FailingWritesFS(AbstractFileSystem):
    """Delegates to a target file system; the `fail_at`-th write() on any file it opened raises EIO."""

    protocol = "eiofs"

    def __init__(
        self, *, target_protocol: str, target_options: dict | None = None, fail_at: int = 2, tag: str = ""
    ):
        super().__init__()
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.fail_at, self.writes = fail_at, 0

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = self.target.open(path, mode, **kwargs)
        return _FailingFile(f, self) if "w" in mode else f

    def info(self, path: str, **kwargs: Any) -> dict:
        return self.target.info(path, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        return self.target.ls(path, detail=detail, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.target.makedirs(path, exist_ok=exist_ok)

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        self.target.pipe_file(path, value, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return self.target.cat_file(path, start=start, end=end, **kwargs)

    def cat_ranges(self, paths: list, starts: list, ends: list, **kwargs: Any) -> list:
        return self.target.cat_ranges(paths, starts, ends, **kwargs)

    def rm_file(self, path: str) -> None:
        self.target.rm_file(path)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(path)


class _FailingFile:
    def __init__(self, f: Any, fs: FailingWritesFS) -> None:
        self._f, self._fs = f, fs

    def write(self, data: Any) -> int:
        self._fs.writes += 1
        if self._fs.writes == self._fs.fail_at:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()

    def tell(self) -> int:
        return self._f.tell()


fsspec.register_implementation("eiofs", FailingWritesFS, clobber=True)


class QuotaS3FileSystem(s3fs.S3FileSystem):
    """A real s3fs client for a bucket with a byte quota: uploads past it fail as a full store answers."""

    protocol = "quotas3"

    def __init__(self, *args: Any, quota_bytes: int = 0, tag: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quota_bytes, self.stored = quota_bytes, 0

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method in ("upload_part", "put_object") and not str(kwargs.get("Key", "")).endswith(".json"):
            self.stored += len(kwargs.get("Body", b""))
            if self.stored > self.quota_bytes:
                error = ClientError(
                    {
                        "Error": {"Code": "QuotaExceeded", "Message": "bucket quota exceeded"},
                        "ResponseMetadata": {"HTTPStatusCode": 403},
                    },
                    method,
                )
                raise translate_boto_error(error)
        return await super()._call_s3(method, *args, **kwargs)


fsspec.register_implementation("quotas3", QuotaS3FileSystem, clobber=True)

_KILLED_TRAINER = textwrap.dedent(
    """
    import sys, threading, torch, checkpoint
    from checkpoint import CheckpointerConfig, WriterHook
    class Stop(WriterHook):
        def pre_commit(self, path, **kw):
            print("READY", flush=True)
            threading.Event().wait()  # only SIGKILL ends this process
        def post_commit(self, path, **kw):
            pass
    options = eval(sys.argv[2])
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options), commit_hook=Stop())
    n = 6 * (1 << 20) // 4
    ckpt.save({"w": torch.arange(n, dtype=torch.float32) + 2, "step": 2}, sys.argv[1], overwrite=True)
    """
)


def _kill_trainer(target: Target) -> tuple[BaseException | None, int | None]:
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_TRAINER, target.plain, repr(target.plain_options)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        child.send_signal(signal.SIGKILL)  # shard files written, commit not begun
    finally:
        child.kill()
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    return None, None


class _BlockWriter(WriterHook):
    """In the async writer process: signals `reached`, then blocks in pre_commit."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.reached, self.never = ctx.Event(), ctx.Event()

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        self.reached.set()
        self.never.wait()

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def _kill_writer(target: Target) -> tuple[BaseException | None, int | None]:
    hook = _BlockWriter()
    config = CheckpointerConfig(storage_options=target.plain_options)
    ckpt = checkpoint.make_async_checkpointer(config, commit_hook=hook)
    try:
        _, write_future = ckpt.save(_state(2), target.plain, overwrite=True)
        assert hook.reached.wait(60)
        os.kill(ckpt.checkpoint_process.pid, signal.SIGKILL)
        error = write_future.exception(timeout=FAIL_WITHIN_SECS)
        assert isinstance(error, CheckpointError), error
        return error, None
    finally:
        ckpt.close()


def _concurrent(target: Target) -> tuple[BaseException | None, int | None]:
    """Save B (overwrite=False) runs inside save A's pre_commit: B must be refused, A commits whole."""
    inner = _sync(target.plain_options)
    refused: list[BaseException] = []

    class RunB(WriterHook):
        def pre_commit(self, path: str, **kwargs: Any) -> None:
            try:
                inner.save(_state(4), target.plain)
            except CheckpointExistsError as e:
                refused.append(e)

        def post_commit(self, path: str, **kwargs: Any) -> None:
            pass

    outer = _sync(target.plain_options, RunB())
    outer.save(_state(2), target.plain, overwrite=True)
    outer.close()
    inner.close()
    assert len(refused) == 1  # a checkpoint existed, so B (overwrite=False) was refused
    return refused[0], 2


# ---------------------------------------------------------------- targets and cases


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    out = os.environ.get("SHARDSAFE_FAULT_MATRIX_JSON")
    if out:
        summary = {
            "tried": len(_RESULTS),
            "survived": sum(r["previous_loads"] and r["next_save_ok"] for r in _RESULTS),
            "data_lost": sum(r["data_lost"] for r in _RESULTS),
            "cases": _RESULTS,
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")


@pytest.fixture
def local(tmp_path: Path) -> Target:
    path = str(tmp_path / "ckpt")
    return Target(backend="local", url=path, options=None, plain=path, plain_options=None)


@pytest.fixture
def s3(s3_endpoint: S3Endpoint, s3_bucket: str) -> Target:
    url = f"{s3_bucket}/ckpt"
    return Target(backend="s3", url=url, options=None, plain=url, plain_options=s3_endpoint.storage_options)


_DISK_FULL_CHILD = textwrap.dedent(
    """
    import resource, signal, sys, torch, checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))
    n = 6 * (1 << 20) // 4
    try:
        checkpoint.make_sync_checkpointer().save({"w": torch.arange(n, dtype=torch.float32) + 2, "step": 2},
                                                 sys.argv[1], overwrite=True)
        print("SAVED")
    except checkpoint.CheckpointError as e:
        print("ERROR", type(e).__name__, str(e).replace(chr(10), " "))
    """
)


def test_local_disk_full(local: Target) -> None:
    def inject() -> tuple[str, None]:
        out = subprocess.run(
            [sys.executable, "-c", _DISK_FULL_CHILD, local.plain],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        line = out.stdout.strip().splitlines()[-1]
        assert line.startswith("ERROR DistributedCheckpointError") and "StorageError" in line, out.stderr[
            -1500:
        ]
        return line.split()[1], None

    _run_case(local, "disk full mid-file", inject)


def test_s3_bucket_full(s3: Target) -> None:
    options = {**s3.plain_options, "quota_bytes": 3 * MiB, "tag": uuid.uuid4().hex}
    url = f"quotas3://{s3.plain.removeprefix('s3://')}"
    _run_case(
        s3,
        "disk full mid-file",
        _failing_save(options, url),
    )


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_eio_from_storage(backend: str, request: pytest.FixtureRequest) -> None:
    target: Target = request.getfixturevalue(backend)
    protocol = "file" if backend == "local" else "s3"
    options = {
        "target_protocol": protocol,
        "target_options": target.plain_options,
        "fail_at": 2,
        "tag": uuid.uuid4().hex,
    }
    url = f"eiofs://{target.plain.removeprefix('s3://')}"
    _run_case(
        target,
        "EIO from storage",
        _failing_save(options, url),
    )


@pytest.mark.parametrize("kind", ["reset", "slowdown"])
def test_s3_multipart_interrupted(s3: Target, kind: str) -> None:
    options = {**s3.plain_options, "inject": {"upload_part": [kind] * 20}, "tag": uuid.uuid4().hex}
    url = f"is3://{s3.plain.removeprefix('s3://')}"
    name = "connection reset mid-multipart" if kind == "reset" else "503 SlowDown mid-multipart"
    _run_case(s3, name, _failing_save(options, url))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_trainer(backend: str, request: pytest.FixtureRequest) -> None:
    target: Target = request.getfixturevalue(backend)
    _run_case(target, "SIGKILL trainer rank", lambda: _kill_trainer(target))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_writer_process(backend: str, request: pytest.FixtureRequest) -> None:
    target: Target = request.getfixturevalue(backend)
    _run_case(target, "SIGKILL writer process", lambda: _kill_writer(target))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_concurrent_saves(backend: str, request: pytest.FixtureRequest) -> None:
    target: Target = request.getfixturevalue(backend)
    _run_case(target, "two concurrent saves", lambda: _concurrent(target))


def test_sigkill_s3_server_mid_save(tmp_path: Path) -> None:
    """A SeaweedFS of its own is SIGKILLed after the shard files went up; restarted on its data, it still has v1."""
    server = SeaweedS3Server(tmp_path / "weed")
    try:
        endpoint = server.start()
    except S3ServerError as e:
        pytest.fail(f"SeaweedFS did not start: {e}")
    box = {"server": server, "endpoint": endpoint}
    try:
        fs = s3fs.S3FileSystem(**endpoint.storage_options, skip_instance_cache=True)
        fs.mkdir("killed-server")

        class KillServer(WriterHook):
            def pre_commit(self, path: str, **kwargs: Any) -> None:
                os.killpg(box["server"]._proc.pid, signal.SIGKILL)
                box["server"]._proc.wait()
                box["killed"] = True

            def post_commit(self, path: str, **kwargs: Any) -> None:
                pass

        first = Target(
            backend="s3",
            url="",
            options=None,
            plain="s3://killed-server/ckpt",
            plain_options=endpoint.storage_options,
        )
        ckpt = _sync(first.plain_options)
        ckpt.save(_state(1), first.plain)
        ckpt.close()
        start = time.monotonic()
        # A client that gives up on a refused connection quickly (s3fs and botocore retry it on their own).
        impatient = {
            **endpoint.storage_options,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        }
        error = _expect_failure(
            lambda: _sync(impatient, KillServer()).save(_state(2), first.plain, overwrite=True)
        )
        seconds = time.monotonic() - start
        box["server"].stop()
        restarted = SeaweedS3Server(tmp_path / "weed")
        box["server"] = restarted
        again = restarted.start()
        target = Target(
            backend="s3", url="", options=None, plain=first.plain, plain_options=again.storage_options
        )
        kept = _loads_as(target, 1)
        ckpt = _sync(target.plain_options)
        ckpt.save(_state(3), target.plain, overwrite=True)
        ckpt.close()
        next_ok = _loads_as(target, 3)
        _RESULTS.append(
            {
                "backend": "s3",
                "fault": "SIGKILL S3 server mid-save",
                "error": type(error).__name__,
                "seconds": round(seconds, 2),
                "previous_loads": kept,
                "next_save_ok": next_ok,
                "data_lost": not kept,
            }
        )
        assert box.get("killed"), error  # the save failed because the server died mid-save, not before
        assert kept and next_ok and seconds < FAIL_WITHIN_SECS
    finally:
        box["server"].stop()
