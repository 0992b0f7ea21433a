"""Crash safety: a training rank is SIGKILLed at each point of a sync save on 2 real gloo ranks.

Each case first saves an earlier checkpoint at another path and at the path
about to be saved again, then starts the new save. The victim rank's storage
is wrapped so that, at the chosen point, it reports its pid to the test and
blocks; the test kills it with SIGKILL and then checks what is on disk: the
path holds either the complete new checkpoint or no complete checkpoint
(the earlier one, when overwriting), the checkpoint at the other path loads
exactly, the surviving rank failed with an error naming the dead rank
instead of hanging, and the next save to the path deletes the leftovers.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import checkpoint
import storage.local
from checkpoint.save.lease import MARKER_RE
from checkpoint.testing.ranks import RankFailures, run_ranks
from planners.errors import CheckpointExistsError, DistributedCheckpointError, IncompleteCheckpointError
from planners.metadata import METADATA_FILE, SHARD_FILE_RE
from storage.spec import StorageSpec

pytestmark = pytest.mark.multiproc

# Generous bounds for a loaded 2-core machine; a passing case takes a few seconds.
STOP_TIMEOUT_SECS = 90.0
RUN_TIMEOUT_SECS = 120.0


def _state(world_size: int, version: int) -> dict[str, Any]:
    """Version `version` of the saved state, row-sharded over the ranks (plain tensors in one process)."""
    w = torch.arange(40, dtype=torch.float32).reshape(8, 5) * version
    b = torch.full((6,), version, dtype=torch.int64)
    if world_size > 1:
        mesh = init_device_mesh("cpu", (world_size,))
        w = distribute_tensor(w, mesh, [Shard(0)])
    return {"model": {"w": w, "b": b}, "step": version}


def _check_version(loaded: dict[str, Any], version: int) -> None:
    expected = _state(1, version)
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert torch.equal(loaded["model"]["b"], expected["model"]["b"])
    assert loaded["step"] == version


class _StopAt:
    """The victim's storage: at `point` it reports its pid to the test and blocks until killed."""

    def __init__(self, inner: Any, point: str, rank: int, report: Any) -> None:
        self._inner, self._point, self._rank, self._report = inner, point, rank, report

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def stop(self) -> None:
        self._report.put(("stopped", self._rank, os.getpid()))
        threading.Event().wait()  # never set: only SIGKILL ends this process

    @contextmanager
    def open_write(self, name: str):
        if self._point == "before_write":
            self.stop()
        with self._inner.open_write(name) as f:
            yield _TripAfterHeader(f, self) if self._point == "mid_write" else f

    def publish(self, name: str, data: bytes, **kwargs: Any) -> None:
        if self._point == "before_metadata" and name == METADATA_FILE:  # not the in-progress marker
            self.stop()
        self._inner.publish(name, data, **kwargs)

    def remove(self, names: Any) -> None:
        if self._point == "after_metadata":
            self.stop()
        self._inner.remove(names)


class _TripAfterHeader:
    """A shard file stream that stops its writer halfway through the first data write."""

    def __init__(self, f: Any, stopper: _StopAt) -> None:
        self._f, self._stopper, self._writes = f, stopper, 0

    def write(self, data: Any) -> int:
        self._writes += 1
        if self._writes == 2:  # the first write is the safetensors header
            self._f.write(memoryview(data)[: len(data) // 2])
            self._f.flush()
            self._stopper.stop()
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _arm(point: str, rank: int, report: Any) -> None:
    """Install the stop point in this (spawned, single-use) rank process."""
    if point == "mid_metadata":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:  # the temp file is written and fsync'd, not yet renamed
            if str(dst).endswith(METADATA_FILE):
                _StopAt(None, point, rank, report).stop()
            real_replace(src, dst)

        storage.local.os.replace = replace  # storage.local's `os` is the os module: this process only
        return
    real_open = StorageSpec.open  # every storage a save opens (plan, lease, write) comes from its spec
    StorageSpec.open = lambda spec: _StopAt(real_open(spec), point, rank, report)  # type: ignore[method-assign]


def _save_until_killed(
    rank: int, world_size: int, root: str, point: str, victim: int, target: str, stops: Any, outcomes: Any
) -> None:
    outcome: tuple = ("saved", rank)
    try:
        ckpt = checkpoint.make_sync_checkpointer()
        ckpt.save(_state(world_size, 1), f"{root}/other")
        ckpt.save(_state(world_size, 1), f"{root}/same")
        if rank == victim:
            _arm(point, rank, stops)
        ckpt.save(_state(world_size, 2), f"{root}/{target}", overwrite=True)
    except DistributedCheckpointError as e:
        outcome = ("error", rank, type(e).__name__, str(e), e.failures)
    except Exception:
        outcome = ("failed", rank, traceback.format_exc())
    outcomes.put(outcome)
    # run_ranks kills ranks still alive once all have reported: flush the queue's feeder thread first.
    outcomes.close()
    outcomes.join_thread()


def _crash(root: str, point: str, victim: int, target: str) -> tuple:
    """Run the save, SIGKILL the victim where it stops; returns the survivor's outcome.

    The victim reports on a queue of its own: it may die holding that queue's
    write lock, which must not block the survivor's report.
    """
    ctx = mp.get_context("spawn")
    stops, outcomes = ctx.Queue(), ctx.Queue()
    with ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(
            run_ranks,
            _save_until_killed,
            2,
            root,
            point,
            victim,
            target,
            stops,
            outcomes,
            timeout_secs=RUN_TIMEOUT_SECS,
        )
        try:
            kind, rank, pid = stops.get(timeout=STOP_TIMEOUT_SECS)
        except queue.Empty:
            pytest.fail(f"rank {victim} never reached {point}: {outcomes.get(timeout=RUN_TIMEOUT_SECS)}")
        assert (kind, rank) == ("stopped", victim)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RankFailures) as info:
            run.result(timeout=RUN_TIMEOUT_SECS)
    assert sorted(info.value.failures) == [victim], info.value
    assert "died from signal SIGKILL" in info.value.failures[victim]
    return outcomes.get(timeout=STOP_TIMEOUT_SECS)


def _names(path: str) -> list[str]:
    return sorted(os.listdir(path))


# (point, victim rank, path saved): "same" overwrites the earlier checkpoint, "fresh" is a new path.
CASES = [
    ("before_write", 1, "fresh"),
    ("mid_write", 1, "same"),
    ("mid_write", 0, "fresh"),
    ("before_metadata", 0, "same"),
    ("mid_metadata", 0, "same"),
    ("after_metadata", 0, "same"),
]


@pytest.mark.parametrize(("point", "victim", "target"), CASES, ids=[f"{p}-rank{v}-{t}" for p, v, t in CASES])
def test_killed_rank_leaves_old_or_new_checkpoint_never_a_broken_one(tmp_path, point, victim, target):
    root = str(tmp_path)
    outcome = _crash(root, point, victim, target)

    if point == "after_metadata":
        # The metadata went out before rank 0 died: the survivor, whose exchange broke before the
        # verdict, reads it, finds this save's id and is told the truth: saved (issue 22 case 1).
        assert outcome == ("saved", 1 - victim), outcome
    else:
        # The survivor failed at once with an error that names the dead rank.
        assert outcome[0] == "error", outcome
        _, rank, kind, message, failures = outcome
        assert (rank, kind) == (1 - victim, "DistributedCheckpointError")
        assert sorted(failures) == [victim], message
        assert f"rank {victim}:" in message

    ckpt = checkpoint.make_sync_checkpointer()
    _check_version(ckpt.load(f"{root}/other"), 1)
    path = f"{root}/{target}"
    committed = point == "after_metadata"
    if committed:
        _check_version(ckpt.load(path), 2)
    elif target == "same":
        _check_version(ckpt.load(path), 1)  # the earlier checkpoint, untouched
    else:
        with pytest.raises(IncompleteCheckpointError, match="incomplete"):
            ckpt.load(path)

    # What is complete verifies; what the crash left behind is recognised as leftovers
    # (the dead coordinator's in-progress marker aside: the next save removes it, below).
    names = [n for n in _names(path) if not MARKER_RE.fullmatch(n)]
    if target == "same" or committed:
        report = checkpoint.verify(path)
        assert report.ok, report.problems
        assert report.leftovers, names
        assert set(report.leftovers) | {METADATA_FILE} | {n for n in names if report.save_id in n} == set(
            names
        )
    if point == "mid_metadata":
        assert any(n.startswith(f".{METADATA_FILE}.tmp-") for n in names), names

    # The next save to the path deletes every leftover and commits normally.
    ckpt.save(_state(1, 3), path, overwrite=target == "same" or committed)
    _check_version(ckpt.load(path), 3)
    report = checkpoint.verify(path)
    assert (report.ok, report.leftovers) == (True, ())
    shards = [n for n in _names(path) if n != METADATA_FILE]
    assert shards and all(SHARD_FILE_RE.fullmatch(n)["save_id"] == report.save_id for n in shards), shards
    ckpt.close()


def test_leftovers_never_count_as_a_checkpoint(tmp_path):
    """Shard files without metadata (a crashed first save) are not loadable and do not block a save."""
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_state(1, 1), str(tmp_path / "a"))
    os.remove(tmp_path / "a" / METADATA_FILE)
    (tmp_path / "a" / f".{METADATA_FILE}.tmp-0123456789ab").write_bytes(b'{"format": "shards')
    with pytest.raises(
        IncompleteCheckpointError, match=r"incomplete: it has shard files but no metadata\.json"
    ):
        ckpt.load(str(tmp_path / "a"))
    with pytest.raises(IncompleteCheckpointError):
        checkpoint.verify(str(tmp_path / "a"))
    ckpt.save(_state(1, 2), str(tmp_path / "a"))  # no overwrite needed: nothing complete was there
    _check_version(ckpt.load(str(tmp_path / "a")), 2)
    assert len(_names(str(tmp_path / "a"))) == 2
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        ckpt.save(_state(1, 3), str(tmp_path / "a"))
    ckpt.close()
