"""No save reports success over lost data: short writes, concurrent saves, commit waits and hooks.

Each case runs the real thing: a file size limit (RLIMIT_FSIZE) in a child process for a disk that
fills up, two real saves racing to one directory or bucket prefix (one started inside the other's
pre_commit hook), real gloo ranks with async writer processes for the heartbeat wait, a writer that
cannot open the storage, and a tcp_store barrier whose writer process is SIGKILLed.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs
import torch
import torch.distributed as dist
from fsspec.implementations.memory import MemoryFileSystem

import checkpoint
from checkpoint import (
    CheckpointerConfig,
    CheckpointError,
    CheckpointExistsError,
    CheckpointWriterConfig,
    PostCommitHookError,
    WriterHook,
)
from checkpoint.save.barriers import BarrierConfig
from checkpoint.save.lease import MARKER_RE
from checkpoint.testing.ranks import free_port, run_ranks
from planners.metadata import METADATA_FILE, SHARD_FILE_RE
from storage.remote import TransferConfig

pytestmark = pytest.mark.timeout(240)


def _state(version: int, n: int = 25_000) -> dict[str, Any]:
    return {"w": torch.arange(n, dtype=torch.float32) * version, "step": version}


def _check(loaded: dict[str, Any], version: int, n: int = 25_000) -> None:
    assert torch.equal(loaded["w"], _state(version, n)["w"])
    assert loaded["step"] == version


# ---------------------------------------------------------------- short writes

_SHORT_WRITE_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys, torch, checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then returns short / EFBIG
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        checkpoint.make_sync_checkpointer().save(
            {"w": torch.arange(25_000, dtype=torch.float32) * 2, "step": 2}, sys.argv[1], overwrite=True
        )
        print(json.dumps({"raised": None}))
    except Exception as e:
        print(json.dumps({"raised": type(e).__name__, "checkpoint_error": isinstance(e, checkpoint.CheckpointError),
                          "message": str(e)}))
    """
)


def test_short_write_from_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "ckpt")
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_state(1), path)
    old_files = sorted(os.listdir(path))
    limit = 60_000  # the shard needs 100,000 data bytes plus its header: its last write is cut short
    out = subprocess.run(
        [sys.executable, "-c", _SHORT_WRITE_CHILD, path, str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["raised"] == "DistributedCheckpointError", out.stderr[-2000:]
    assert report["checkpoint_error"]
    message = report["message"]
    assert "StorageError" in message and "shard-" in message
    assert f"after {limit} of 100" in message  # both sizes: what landed and what the file needed
    for name in old_files:  # nothing of the committed checkpoint was touched
        assert os.path.exists(os.path.join(path, name))
    _check(ckpt.load(path), 1)
    ckpt.save(_state(3), path, overwrite=True)  # the next save succeeds and cleans up
    _check(ckpt.load(path), 3)
    assert not [n for n in os.listdir(path) if MARKER_RE.fullmatch(n)]
    ckpt.close()


class _TruncateNewShards(WriterHook):
    """In pre_commit, cuts 100 bytes off this save's shard files (a disk or process corrupting them)."""

    def __init__(self, keep: set[str]) -> None:
        self.keep = keep

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        for name in os.listdir(path):
            if SHARD_FILE_RE.fullmatch(name) and name not in self.keep:
                os.truncate(os.path.join(path, name), os.path.getsize(os.path.join(path, name)) - 100)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def test_commit_refuses_a_file_whose_size_changed_after_its_rank_reported_it(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_state(1), path)
    faulty = checkpoint.make_sync_checkpointer(commit_hook=_TruncateNewShards(set(os.listdir(path))))
    with pytest.raises(CheckpointError, match=r"shard-.*reported 100\d+ bytes written but 100\d+ are stored"):
        faulty.save(_state(2), path, overwrite=True)
    _check(ckpt.load(path), 1)
    ckpt.close()
    faulty.close()


class TruncatingS3FileSystem(s3fs.S3FileSystem):
    """A real s3fs client behind a faulty proxy: a shard's last 100 bytes never arrive (single PUT or last part)."""

    protocol = "truncs3"

    def __init__(self, *args: Any, tag: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method in ("upload_part", "put_object") and SHARD_FILE_RE.fullmatch(
            kwargs["Key"].rsplit("/", 1)[-1]
        ):
            kwargs["Body"] = bytes(kwargs["Body"])[:-100]
        return await super()._call_s3(method, *args, **kwargs)


fsspec.register_implementation("truncs3", TruncatingS3FileSystem, clobber=True)


@pytest.mark.s3
def test_s3_upload_whose_stored_size_differs_fails_the_save(s3_endpoint, s3_bucket: str) -> None:
    numel = (
        25_000  # one PutObject (a truncated multipart part is refused by SeaweedFS itself: EntityTooSmall)
    )
    url = f"{s3_bucket}/ckpt"
    ckpt = _sync(s3_endpoint.storage_options)
    ckpt.save(_state(1, numel), url)
    config = CheckpointerConfig(
        storage_options={**s3_endpoint.storage_options, "tag": uuid.uuid4().hex},
        transfer_config=TransferConfig(upload_part_bytes=5 << 20),
    )
    faulty = checkpoint.make_sync_checkpointer(config)
    with pytest.raises(CheckpointError, match=r"shard-.*stored object holds \d+ bytes but \d+ were sent"):
        faulty.save(_state(2, numel), f"truncs3://{url.removeprefix('s3://')}", overwrite=True)
    _check(ckpt.load(url), 1, numel)  # the previous checkpoint is untouched
    ckpt.close()
    faulty.close()


# ---------------------------------------------------------------- concurrent saves


class _RunInPreCommit(WriterHook):
    """Runs `action` in the first pre_commit only."""

    def __init__(self, action: Any) -> None:
        self.action = action
        self.fired = False

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if not self.fired:
            self.fired = True
            self.action()

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


class _WaitInPreCommit(WriterHook):
    """Signals `reached`, then waits for `go` in pre_commit."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        self.reached.set()
        assert self.go.wait(60)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def _names(url: str, options: dict | None) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.invalidate_cache()
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict | None]:
    """A checkpoint path on local disk or on the real S3 server, with its storage options."""
    if request.param == "local":
        return str(tmp_path / "ckpt"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/ckpt", endpoint.storage_options


def _sync(options: dict | None, hook: WriterHook | None = None) -> checkpoint.SyncCheckpointer:
    return checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options), commit_hook=hook)


@pytest.mark.parametrize("outer_overwrite", [False, True])
def test_save_started_inside_another_commits_first(target, outer_overwrite: bool) -> None:
    """Save B runs whole inside save A's pre_commit: B commits, and B's cleanup keeps A's files."""
    path, options = target
    inner = _sync(options)
    seen: dict[str, list[str]] = {}

    def run_b() -> None:
        inner.save(_state(2), path)
        seen["after_b"] = _names(path, options)

    outer = _sync(options, _RunInPreCommit(run_b))
    if outer_overwrite:
        outer.save(_state(1), path, overwrite=True)  # replaces B's commit: A's files must all be there
        _check(outer.load(path), 1)
    else:
        with pytest.raises(CheckpointExistsError, match="another save committed"):
            outer.save(_state(1), path)
        _check(outer.load(path), 2)  # B's checkpoint stays, whole
    ids = {SHARD_FILE_RE.fullmatch(n)["save_id"] for n in seen["after_b"] if SHARD_FILE_RE.fullmatch(n)}
    assert len(ids) == 2  # B's cleanup deleted nothing of A, which was still running
    outer.save(_state(3), path, overwrite=True)  # the next save succeeds and removes the leftovers
    _check(outer.load(path), 3)
    names = _names(path, options)
    assert len({SHARD_FILE_RE.fullmatch(n)["save_id"] for n in names if SHARD_FILE_RE.fullmatch(n)}) == 1
    assert not [n for n in names if MARKER_RE.fullmatch(n)]
    inner.close()
    outer.close()


def test_save_started_inside_another_then_outer_commits_first(target) -> None:
    """B starts in A's pre_commit and waits in its own; A commits; B's commit then refuses to replace it."""
    path, options = target
    b_hook = _WaitInPreCommit()
    inner = _sync(options, b_hook)
    b_error: list[BaseException] = []

    def run_b() -> None:
        try:
            inner.save(_state(2), path)
        except BaseException as e:
            b_error.append(e)

    thread = threading.Thread(target=run_b)

    def start_b() -> None:
        thread.start()
        assert b_hook.reached.wait(60)  # B's files are written; its commit waits

    outer = _sync(options, _RunInPreCommit(start_b))
    outer.save(_state(1), path)
    b_hook.go.set()
    thread.join(60)
    assert len(b_error) == 1 and type(b_error[0]) is CheckpointExistsError, b_error
    assert "overwrite=False" in str(b_error[0])
    _check(outer.load(path), 1)  # A's checkpoint is whole: A's cleanup kept B's files and B wrote no metadata
    inner.close()
    outer.close()


# ---------------------------------------------------------------- post_commit hook


class _FailingPostCommit(WriterHook):
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        pass

    def post_commit(self, path: str, **kwargs: Any) -> None:
        raise KeyError("index server is down")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_failing_post_commit_hook_says_the_checkpoint_is_committed(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "ckpt")
    if kind == "sync":
        ckpt = checkpoint.make_sync_checkpointer(commit_hook=_FailingPostCommit())
        with pytest.raises(PostCommitHookError, match="IS committed") as info:
            ckpt.save(_state(1), path)
    else:
        ckpt = checkpoint.make_async_checkpointer(commit_hook=_FailingPostCommit())
        _, write_future = ckpt.save(_state(1), path)
        with pytest.raises(PostCommitHookError, match="IS committed") as info:
            write_future.result(timeout=120)
    assert "index server is down" in str(info.value)
    _check(ckpt.load(path), 1)
    ckpt.close()


# ---------------------------------------------------------------- commit wait: progress, not a fixed window


class _SlowRank(WriterHook):
    """Rank `rank` takes `seconds` longer than the others before its commit."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank, self.seconds = rank, seconds

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if kwargs["rank"] == self.rank:
            time.sleep(self.seconds)  # stands for a slow write: the writer is alive and working

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def _slow_rank_save(rank: int, world_size: int, root: str) -> float:
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=3.0))
    ckpt = checkpoint.make_async_checkpointer(config, commit_hook=_SlowRank(1, 10.0))
    _, write_future = ckpt.save({"w": torch.full((4,), float(rank))}, f"{root}/slow")
    start = time.monotonic()
    write_future.result(timeout=120)
    ckpt.close()
    return time.monotonic() - start


@pytest.mark.multiproc
def test_commit_waits_for_a_slow_rank_that_sends_heartbeats(tmp_path: Path) -> None:
    waited = run_ranks(_slow_rank_save, 2, str(tmp_path), timeout_secs=180)
    assert min(waited) >= 9.0  # the whole save outlasted the 3 s no-progress timeout three times over
    loaded = checkpoint.make_sync_checkpointer().load(str(tmp_path / "slow"))
    assert torch.equal(loaded["w"], torch.zeros(4))  # replicated: rank 0's copy


# ---------------------------------------------------------------- a writer that cannot open the storage


class TrainerOnlyFS(MemoryFileSystem):
    """A file system registered only in processes that import this module (a plugin the trainer loads)."""

    protocol = ("ssfault",)


fsspec.register_implementation("ssfault", TrainerOnlyFS, clobber=True)


class _Noop(WriterHook):
    """Unpickling it in rank 0's writer imports this module, which registers ssfault:// there."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        pass

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def _writer_cannot_open(rank: int, world_size: int) -> dict:
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=120.0))
    ckpt = checkpoint.make_async_checkpointer(config, commit_hook=_Noop() if rank == 0 else None)
    start = time.monotonic()
    _, write_future = ckpt.save({"w": torch.ones(4)}, "ssfault://bucket/ckpt")
    error = write_future.exception(timeout=150)
    out = {"seconds": time.monotonic() - start, "type": type(error).__name__, "message": str(error)}
    ckpt.close()
    return out


@pytest.mark.multiproc
def test_writer_that_cannot_open_the_storage_fails_every_rank_at_once() -> None:
    results = run_ranks(_writer_cannot_open, 2, timeout_secs=200)
    for out in results:
        assert out["type"] == "DistributedCheckpointError", out
        assert "rank 1" in out["message"] and "cannot open the storage" in out["message"]
        assert out["seconds"] < 60.0, out  # far below the 120 s wait for the other ranks


# ---------------------------------------------------------------- tcp_store barrier after a writer restart


def _barrier_after_restart(rank: int, world_size: int, root: str, port: int, victim: int) -> list[int]:
    """Save 2 times, SIGKILL `victim`'s idle writer process, then save 3 more times."""
    args = {"host": "127.0.0.1", "port": port, "rank": rank, "world_size": world_size, "timeout_secs": 30}
    barrier = BarrierConfig(barrier_type="tcp_store", barrier_args=args)
    ckpt = checkpoint.make_async_checkpointer(CheckpointerConfig(barrier_config=barrier))
    steps = []
    for step in range(5):
        if step == 2:
            dist.barrier()  # both writers idle after save 1
            if rank == victim:
                proc = ckpt.checkpoint_process._proc
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(30)
            dist.barrier()
        _, write_future = ckpt.save({"w": torch.full((8,), float(step)), "step": step}, f"{root}/s{step}")
        write_future.result(timeout=90)
        steps.append(step)
    ckpt.close()
    return steps


@pytest.mark.multiproc
@pytest.mark.parametrize("victim", [1, 0])
def test_tcp_store_barrier_survives_a_killed_writer(tmp_path: Path, victim: int) -> None:
    results = run_ranks(_barrier_after_restart, 2, str(tmp_path), free_port(), victim, timeout_secs=200)
    assert results == [[0, 1, 2, 3, 4]] * 2
    reader = checkpoint.make_sync_checkpointer()
    for step in range(5):
        loaded = reader.load(str(tmp_path / f"s{step}"))
        assert torch.equal(loaded["w"], torch.full((8,), float(step)))


# ---------------------------------------------------------------- smaller items


def test_makedirs_fsyncs_every_created_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.local

    synced: list[str] = []
    real = storage.local._fsync_dir
    monkeypatch.setattr(storage.local, "_fsync_dir", lambda p: (synced.append(p), real(p)))
    path = tmp_path / "a" / "b" / "c"
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_state(1, 8), str(path))
    for parent in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
        assert str(parent) in synced  # each new level's entry made durable in its parent
    _check(ckpt.load(str(path)), 1, 8)


def test_failed_mmap_after_memfd_closes_the_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    from checkpoint.async_writer import staging

    def refuse(*args: Any, **kwargs: Any) -> mmap.mmap:
        raise OSError(12, "Cannot allocate memory (injected)")

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(staging.mmap, "mmap", refuse)
    with pytest.raises(CheckpointError, match="cannot map"):
        staging._Buffer(1, 4096, shared=True, pinned=False)
    assert set(os.listdir("/proc/self/fd")) <= before  # the memfd was closed


def test_publish_without_overwrite_never_replaces(tmp_path: Path) -> None:
    from storage.local import LocalStorage

    store = LocalStorage(str(tmp_path))
    store.publish(METADATA_FILE, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        store.publish(METADATA_FILE, b"second", overwrite=False)
    assert (tmp_path / METADATA_FILE).read_bytes() == b"first"
    assert os.listdir(tmp_path) == [METADATA_FILE]  # no temporary file left behind
