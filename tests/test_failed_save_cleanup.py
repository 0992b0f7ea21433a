"""Issue 17 case 10, after the write: a save that fails once ranks wrote shard files takes them back.

Real gloo ranks (`checkpoint.testing.ranks.run_ranks`), sync and async: a pre_commit hook fails on rank 1
after every rank wrote its files, so the save fails on every rank; each rank then deletes the files it
wrote, and the coordinator its in-progress marker and the directories the save created, only once empty.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import checkpoint
from checkpoint import CommitHook
from checkpoint.testing.ranks import run_ranks
from storage.local import LocalStorage


class FailOnRankOne(CommitHook):
    """Fails pre_commit on rank 1 for paths whose last part starts with "fail" (picklable: async too)."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if kwargs.get("rank") == 1 and Path(path).name.startswith("fail"):
            raise ValueError(f"refusing {Path(path).name}")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def _expected(step: int) -> torch.Tensor:
    return torch.arange(48.0).reshape(8, 6) + step


def _state(rank: int, step: int) -> dict[str, Any]:
    """A tensor sharded over both ranks (each writes a shard file of its own), one replicated, one value."""
    sharded = distribute_tensor(_expected(step), init_device_mesh("cpu", (2,)), [Shard(0)])
    return {"w": sharded, "big": torch.full((64,), float(step)), "step": step}


def _failing_save(ckpt: Any, mode: str, state: dict[str, Any], path: str, **kwargs: Any) -> str:
    """The error of a save expected to fail, as "Type: message"; an async one also absorbs its report."""
    try:
        if mode == "sync":
            ckpt.save(state, path, **kwargs)
            return "ok"
        error = ckpt.save(state, path, **kwargs)[1].exception(timeout=60)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if error is None:
        return "ok"
    try:  # the failure is reported once more, by the next save, which starts nothing (checked below)
        ckpt.save(state, f"{Path(path).parent}/absorbed")
    except Exception:
        pass
    return f"{type(error).__name__}: {error}"


def _save_and_fail(rank: int, world_size: int, root: str, mode: str) -> tuple[list[str], list[list[str]]]:
    plain = checkpoint.make_sync_checkpointer()
    plain.save(_state(rank, 1), f"{root}/run/step-1")  # an earlier checkpoint beside the failed save
    plain.save(_state(rank, 3), f"{root}/fail-over")  # one the failed save tries to replace
    plain.close()
    before = [sorted(os.listdir(f"{root}/{d}")) for d in ("run/step-1", "fail-over")]
    make = checkpoint.make_sync_checkpointer if mode == "sync" else checkpoint.make_async_checkpointer
    ckpt = make(commit_hook=FailOnRankOne())
    errors = [
        _failing_save(ckpt, mode, _state(rank, 2), f"{root}/new/deeper/fail-2"),
        _failing_save(ckpt, mode, _state(rank, 2), f"{root}/run/fail-2"),
        _failing_save(ckpt, mode, _state(rank, 2), f"{root}/empty/fail-2"),
        _failing_save(ckpt, mode, _state(rank, 4), f"{root}/fail-over", overwrite=True),
    ]
    ckpt.close()
    return errors, before


@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_save_failed_after_writing_leaves_no_file_and_no_directory_it_created(
    tmp_path: Path, mode: str
) -> None:
    (tmp_path / "empty" / "fail-2").mkdir(parents=True)
    results = run_ranks(_save_and_fail, 2, str(tmp_path), mode, timeout_secs=180)
    for rank, (errors, _) in enumerate(results):
        assert len(errors) == 4, errors
        for error in errors:
            assert error.startswith("DistributedCheckpointError: "), (rank, error)
            assert "pre_commit hook failed: ValueError: refusing fail-" in error, (rank, error)
    # No directory the failed saves created is left; nothing an absorbed async report started either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "fail-over", "run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step-1"]
    # A directory that existed before the save stays, and empty.
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["fail-2"]
    assert list((tmp_path / "empty" / "fail-2").iterdir()) == []
    reader = checkpoint.make_sync_checkpointer()
    earlier = zip((tmp_path / "run" / "step-1", tmp_path / "fail-over"), (1, 3), results[0][1])
    for path, step, names_before in earlier:
        loaded = reader.load(str(path))
        assert sorted(loaded) == ["big", "step", "w"]
        assert torch.equal(loaded["w"], _expected(step))
        assert torch.equal(loaded["big"], torch.full((64,), float(step))) and loaded["step"] == step
        # Only the earlier checkpoint's files: the failed save took back its shard files and marker.
        assert sorted(p.name for p in path.iterdir()) == names_before
    reader.close()


def test_created_dirs_travel_to_another_instance_which_removes_only_those_at_or_above_its_root(
    tmp_path: Path,
) -> None:
    made = LocalStorage(str(tmp_path / "a" / "b" / "ckpt")).prepare()
    assert made == tuple(str(tmp_path / p) for p in ("a", "a/b", "a/b/ckpt"))
    (tmp_path / "beside").mkdir()
    other = LocalStorage(str(tmp_path / "a" / "b" / "ckpt"))  # e.g. in the writer process
    other.remove_created_dirs((str(tmp_path / "beside"), *made))  # a level beside the root is never touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beside"]
    assert LocalStorage(str(tmp_path / "beside")).prepare() == ()  # it existed: nothing created
