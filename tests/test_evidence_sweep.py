"""Issue 22's fault-injection sweep: SIGKILL the process that commits at every step of the commit.

For each step of `tests.kill_points.POINTS` (before the publish, after it, during the leftover removal,
in `post_commit`, in the barrier), sync and async, on local disk and on the real S3 server: version 1
is saved, then version 2 over it with overwrite=True, and rank 0's committing process (the async
writer process, or the sync trainer itself) SIGKILLs itself at that step. Afterwards:

- the newest checkpoint any rank was told is saved loads, bit-exact (version 2 when a rank was told
  version 2 is saved, or was told it "IS committed"; version 1 otherwise);
- a save whose metadata went out is never taken back: from `after_publish` on, version 2 loads;
- no file of the checkpoint that stands is gone (`checkpoint.verify` reads every file it names).

Async runs on two real gloo ranks (rank 1's writer lives on, and must learn the truth); sync runs one
trainer per step in a forkserver child, which the step kills. With `SHARDSAFE_SWEEP_JSON=<file>` the
module writes its summary (steps tried, checkpoints lost) there, for the README's fault table.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import checkpoint
from checkpoint import CheckpointerConfig, CheckpointWriterConfig, PostCommitHookError
from checkpoint.save.barriers import BarrierConfig
from checkpoint.testing.ranks import free_port, run_ranks
from checkpoint.testing.s3server import S3Endpoint
from tests.kill_points import POINTS, KillAt

pytestmark = [pytest.mark.timeout(400), pytest.mark.s3]

NUMEL = 4096
_RESULTS: list[dict[str, Any]] = []


def _state(version: int) -> dict[str, Any]:
    return {"w": torch.arange(NUMEL, dtype=torch.float32) + version, "step": version}


def _config(options: dict | None, rank: int, world_size: int, barrier_port: int | None) -> CheckpointerConfig:
    barrier = BarrierConfig()
    if barrier_port is not None:
        args = {
            "host": "127.0.0.1",
            "port": barrier_port,
            "rank": rank,
            "world_size": world_size,
            "timeout_secs": 5,
        }
        barrier = BarrierConfig(barrier_type="tcp_store", barrier_args=args)
    return CheckpointerConfig(
        storage_options=options,
        barrier_config=barrier,
        writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=60),
    )


def _told(error: BaseException | None) -> str:
    """What a rank was told about version 2: saved, committed (with a failure after it), or failed."""
    if error is None:
        return "saved"
    if isinstance(error, PostCommitHookError) and "IS committed" in str(error):
        return "committed"
    return f"failed: {type(error).__name__}"


def _async_sweep(rank: int, world_size: int, targets: list[tuple[str, dict | None]], port: int) -> dict:
    told: dict[str, str] = {}
    for base, options in targets:
        plain = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))
        for points, barrier in ((POINTS[:-1], None), (POINTS[-1:], port)):  # a barrier only where it is hit
            config = _config(options, rank, world_size, barrier)
            ckpt = checkpoint.make_async_checkpointer(config, commit_hook=KillAt(armed=rank == 0))
            for point in points:
                path = f"{base}/kill-{point}"
                plain.save(_state(1), path)
                error = ckpt.save(_state(2), path, overwrite=True)[1].exception(timeout=300)
                told[path] = _told(error)
                try:  # a failure is reported once more, by the next save, which starts nothing
                    ckpt.save(_state(0), f"{base}/absorbed-{point}")[1].result(timeout=300)
                except Exception:
                    pass
            ckpt.close()
        plain.close()
    return told


def _sync_killed(path: str, options: dict | None, port: int, told_file: str) -> None:
    """One sync trainer: version 1, then version 2 with rank 0 armed; records what it was told."""
    plain = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))
    plain.save(_state(1), path)
    hook = KillAt(armed=True)
    hook.install()
    ckpt = checkpoint.make_sync_checkpointer(_config(options, 0, 1, port), commit_hook=hook)
    try:
        ckpt.save(_state(2), path, overwrite=True)
        told = _told(None)
    except Exception as e:
        told = _told(e)
    Path(told_file).write_text(told)


def _check(path: str, options: dict | None, told: list[str], *, mode: str, backend: str, point: str) -> None:
    """The newest version any rank was told is saved loads bit-exact, with every file it names."""
    reader = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))
    try:
        loaded = reader.load(path)
        version = int(loaded["step"])
        exact = torch.equal(loaded["w"], _state(version)["w"])
    finally:
        reader.close()
    newest_told = 2 if any(t in ("saved", "committed") for t in told) else 1
    must_be = 2 if point != "before_publish" else 1  # once the metadata is out, version 2 is the checkpoint
    ok = exact and version >= newest_told and version == must_be
    ok = ok and checkpoint.verify(path, storage_options=options).ok
    _RESULTS.append(
        {"mode": mode, "backend": backend, "point": point, "told": told, "loads": version, "lost": not ok}
    )
    assert exact and version >= newest_told, (mode, backend, point, told, version)
    assert version == must_be, (mode, backend, point, told, version)
    assert checkpoint.verify(path, storage_options=options).ok, (mode, backend, point)


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    out = os.environ.get("SHARDSAFE_SWEEP_JSON")
    if out and _RESULTS:
        summary = {"tried": len(_RESULTS), "lost": sum(r["lost"] for r in _RESULTS), "cases": _RESULTS}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")


def _targets(tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("disk", str(tmp_path / "disk"), None),
        ("s3", f"{s3_bucket}/{uuid.uuid4().hex}", s3_endpoint.storage_options),
    ]


@pytest.mark.multiproc
def test_sigkill_of_the_async_writer_at_every_commit_step_loses_no_checkpoint(
    tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    targets = _targets(tmp_path, s3_endpoint, s3_bucket)
    told = run_ranks(_async_sweep, 2, [(b, o) for _, b, o in targets], free_port(), timeout_secs=380)
    for backend, base, options in targets:
        for point in POINTS:
            path = f"{base}/kill-{point}"
            _check(path, options, [t[path] for t in told], mode="async", backend=backend, point=point)
    # Every rank learnt the truth: a kill after the publish is a committed save on both ranks.
    for backend, base, _ in targets:
        for point in POINTS[1:]:
            told_here = [t[f"{base}/kill-{point}"] for t in told]
            assert told_here[0] == "committed" and told_here[1] in ("saved", "committed"), (
                backend,
                point,
                told,
            )
        assert [t[f"{base}/kill-before_publish"] for t in told] == ["failed: WriterProcessError"] + [
            "failed: DistributedCheckpointError"
        ], (backend, told)


def test_sigkill_of_the_sync_trainer_at_every_commit_step_loses_no_checkpoint(
    tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    ctx = multiprocessing.get_context("forkserver")
    # Forked from a server that imported these once (only the call that starts the server uses the list).
    ctx.set_forkserver_preload(["torch", "torch.distributed", "checkpoint", "tests.test_evidence_sweep"])
    for backend, base, options in _targets(tmp_path, s3_endpoint, s3_bucket):
        for point in POINTS:
            path, told_file = f"{base}/kill-{point}", tmp_path / f"told-{backend}-{point}"
            proc = ctx.Process(target=_sync_killed, args=(path, options, free_port(), str(told_file)))
            proc.start()
            proc.join(120)
            assert proc.exitcode == -9, (backend, point, proc.exitcode)  # killed at that step
            assert not told_file.exists()  # so it was told nothing about version 2
            _check(path, options, [], mode="sync", backend=backend, point=point)
