"""Issue 22, cases 2 and 3: retention deletes only on evidence, and the resumed step's protection ends.

Case 2 reads the run through a real fsspec file system (local files under a `flakyfs://` URL) whose
reads of chosen files fail with EIO, as NFS (ESTALE) or an object store after its retries do: the
step is *unknown*, listed with a warning, neither loaded as complete nor deleted. Only a commit
marker that is definitely absent makes a step incomplete. Case 3 resumes a run and saves on.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
import torch
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

import checkpoint
from checkpoint import CheckpointManager
from checkpoint.run.retention import RetentionPolicy, resume_protected, steps_to_delete
from checkpoint.run.steps import StepRecord

pytestmark = [pytest.mark.timeout(300)]


class FlakyReadsFS(DirFileSystem):
    """Local files under `flakyfs:///abs/path`; reading a path that ends with one of `failing` raises EIO."""

    protocol = "flakyfs"
    failing: ClassVar[set[str]] = set()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(path="/", fs=LocalFileSystem(), **kwargs)

    def _join(self, path: Any) -> Any:  # URLs carry absolute local paths: nothing to join
        if isinstance(path, str):
            return self._strip_protocol(path)
        return [self._join(p) for p in path]

    def _relpath(self, path: Any) -> Any:
        return path

    def _check(self, path: str) -> None:
        if any(str(path).endswith(f) for f in FlakyReadsFS.failing):
            raise OSError(errno.EIO, f"Input/output error (injected): {path}")

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self._check(path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            self._check(path)
        return super().open(path, mode, **kwargs)

    def info(self, path: str, **kwargs: Any) -> dict:
        self._check(path)
        return super().info(path, **kwargs)


@pytest.fixture
def flaky():
    fsspec.register_implementation("flakyfs", FlakyReadsFS, clobber=True)
    FlakyReadsFS.failing = set()
    yield FlakyReadsFS.failing
    FlakyReadsFS.failing = set()


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


def _state(value: float) -> dict:
    return {"w": torch.full((3, 2), float(value)), "step": int(value)}


def _complete(mgr: CheckpointManager) -> list[int]:
    return [r.step for r in mgr.steps() if r.complete]


# --- case 2 ---------------------------------------------------------------------------------------


def test_a_metadata_read_error_makes_a_step_unknown_never_deleted(
    tmp_path: Path, ckpt, flaky, caplog
) -> None:
    root = f"flakyfs://{tmp_path}/run"
    mgr = CheckpointManager(root, checkpointer=ckpt, keep_last=1, keep_every=10)
    for step in (10, 11, 12):
        mgr.save(step, _state(step))
    assert _complete(mgr) == [10, 12]  # 10: the keep_every milestone
    flaky |= {"step-000000010/metadata.json", "step-000000012/metadata.json"}
    with caplog.at_level(logging.WARNING):
        mgr.save(13, _state(13))
        records = {r.step: r for r in mgr.steps()}
    # On main both counted as incomplete and, older than 13, were deleted: the milestone 10 included.
    assert (records[10].known, records[10].complete) == (False, False)
    assert (records[12].known, records[12].complete) == (False, False)
    assert records[13].complete and records[13].to_json()["known"] is True
    assert "step-000000010" in caplog.text and "is unknown: reading metadata.json failed" in caplog.text
    for step in (10, 12):
        assert (tmp_path / "run" / f"step-{step:09d}" / "metadata.json").is_file()
    flaky.clear()  # the error was transient: everything is there and loads
    assert _complete(mgr) == [10, 12, 13]
    mgr.save(14, _state(14))
    assert _complete(mgr) == [10, 14]  # with evidence, retention goes on as before
    mgr.close()


def test_a_definitely_absent_marker_still_makes_a_step_incomplete(tmp_path: Path, ckpt, flaky) -> None:
    root = f"flakyfs://{tmp_path}/run"
    mgr = CheckpointManager(root, checkpointer=ckpt, keep_last=1)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    (tmp_path / "run" / "step-000000002" / "metadata.json").unlink()  # a save interrupted before its commit
    mgr.save(3, _state(3))
    assert [(r.step, r.complete, r.known) for r in mgr.steps()] == [(3, True, True)]
    mgr.close()


def test_the_newest_step_unknown_at_resume_is_tried_not_skipped(tmp_path: Path, ckpt, flaky) -> None:
    root = f"flakyfs://{tmp_path}/run"
    with CheckpointManager(root, checkpointer=ckpt) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    flaky.add("step-000000002/metadata.json")
    with pytest.raises(OSError, match="Input/output error"):  # no silent resume from the older step 1
        CheckpointManager(root, checkpointer=ckpt).load(_state(-1))
    flaky.clear()
    target = _state(-1)
    assert CheckpointManager(root, checkpointer=ckpt).load(target) == 2 and target["step"] == 2


def test_steps_to_delete_never_picks_an_unknown_step() -> None:
    def record(step: int, *, complete: bool = True, known: bool = True) -> StepRecord:
        return StepRecord(
            step=step,
            path=f"/r/step-{step}",
            complete=complete,
            nbytes=1,
            world_size=1,
            saved_at=None,
            known=known,
        )

    records = [
        record(5, complete=False, known=False),
        record(10),
        record(15, complete=False, known=False),
        record(20),
    ]
    chosen = steps_to_delete(records, RetentionPolicy(keep_last=1))
    assert [(d.record.step, d.reason) for d in chosen] == [(10, "old")]


# --- case 3 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keep_last", "more"), [(2, 3), (1, 2)])
def test_the_resumed_steps_protection_ends_after_keep_last_newer_commits(
    tmp_path: Path, keep_last: int, more: int
) -> None:
    for make in (checkpoint.make_sync_checkpointer, checkpoint.make_async_checkpointer):
        root = str(tmp_path / make.__name__)
        ckpt = make()
        with CheckpointManager(root, checkpointer=ckpt, keep_last=keep_last) as first:
            for step in (1, 2, 3):
                first.save(step, _state(step))
        mgr = CheckpointManager(root, checkpointer=ckpt, keep_last=keep_last)
        target = _state(-1)
        assert mgr.load(target) == 3
        for step in range(4, 4 + more):
            mgr.save(step, _state(step))
        mgr.wait_until_finished()
        expected = list(range(4 + more - keep_last, 4 + more))
        assert _complete(mgr) == expected, make.__name__  # on main: [3, *expected] (3 kept forever)
        mgr.close()
        ckpt.close()


def test_resume_protected_is_pure() -> None:
    policy = RetentionPolicy(keep_last=2)
    assert resume_protected(None, {4, 5}, policy) == set()
    assert resume_protected(3, {4}, policy) == {3}
    assert resume_protected(3, {2, 4}, policy) == {3}  # an older commit is no replacement
    assert resume_protected(3, {4, 5}, policy) == set()
    assert resume_protected(3, {4, 5, 6}, RetentionPolicy(keep_last=None)) == {3}  # keep everything
