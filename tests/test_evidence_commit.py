"""Issue 22 case 1: a writer killed after the commit never turns a committed checkpoint into garbage.

Real gloo ranks, async, local disk: rank 0's `post_commit` hook overruns
`CheckpointProcessConfig.write_timeout_secs`, so its supervisor kills the writer process after the
metadata went out. The trainer's stand-in commit must read the metadata, find this save's id, report
the save as committed (`PostCommitHookError`, "IS committed") and delete nothing; rank 1 was told
the save succeeded, and the checkpoint (written with overwrite=True over an earlier one) loads exactly.
The stand-in must also end promptly, not after `write_barrier_timeout_secs` waiting for reports that
can never come.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import checkpoint
from checkpoint import CheckpointerConfig, CommitHook
from checkpoint.config import CheckpointProcessConfig, CheckpointWriterConfig
from checkpoint.testing.ranks import run_ranks
from planners.metadata import METADATA_FILE

# The stand-in must end well within this; the barrier timeout below is far longer.
STAND_IN_SECS = 30.0
BARRIER_TIMEOUT_SECS = 120.0


class HangInPostCommit(CommitHook):
    """Rank 0's post_commit never returns while `<flag>` exists: its supervisor kills the writer."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        pass

    def post_commit(self, path: str, **kwargs: Any) -> None:
        if kwargs.get("rank") == 0 and os.path.exists(self.flag):
            threading.Event().wait()


def _expected(step: int) -> torch.Tensor:
    return torch.arange(48.0).reshape(8, 6) + step


def _state(step: int) -> dict[str, Any]:
    """A tensor sharded over both ranks (each writes a shard file of its own) and a value."""
    return {"w": distribute_tensor(_expected(step), init_device_mesh("cpu", (2,)), [Shard(0)]), "step": step}


def _killed_after_commit(rank: int, world_size: int, root: str) -> dict[str, Any]:
    path = f"{root}/last"
    plain = checkpoint.make_sync_checkpointer()
    plain.save(_state(1), path)  # the old checkpoint the overwriting save replaces
    plain.close()
    config = CheckpointerConfig(
        writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=BARRIER_TIMEOUT_SECS),
        process_config=CheckpointProcessConfig(write_timeout_secs=8.0),
    )
    ckpt = checkpoint.make_async_checkpointer(config, commit_hook=HangInPostCommit(f"{root}/hang"))
    try:
        start = time.monotonic()
        error = ckpt.save(_state(2), path, overwrite=True)[1].exception(timeout=BARRIER_TIMEOUT_SECS * 2)
        secs = time.monotonic() - start
        if rank == 0:
            os.remove(f"{root}/hang")  # the slow registry recovers
        # The next save goes on: the previous one is committed, only its hook failed.
        ckpt.save(_state(3), f"{root}/next")[1].result(timeout=BARRIER_TIMEOUT_SECS)
    finally:
        ckpt.close()
    return {
        "error": None if error is None else type(error).__name__,
        "message": str(error),
        "secs": secs,
    }


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_writer_killed_in_post_commit_keeps_the_committed_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "hang").touch()
    results = run_ranks(_killed_after_commit, 2, str(tmp_path), timeout_secs=280)
    rank0, rank1 = results
    assert rank1["error"] is None, rank1  # rank 1 was told the save succeeded
    assert rank0["error"] == "PostCommitHookError", rank0
    assert "IS committed and loadable" in rank0["message"] and "last" in rank0["message"], rank0
    assert "CheckpointTimeoutError" in rank0["message"], rank0  # the cause: the killed writer
    assert rank0["secs"] < 8.0 + STAND_IN_SECS, rank0  # no wait for reports that cannot come
    # Every file the committed metadata names is there, and it loads exactly (the old one is gone).
    path = tmp_path / "last"
    names = set(os.listdir(path))
    assert METADATA_FILE in names
    reader = checkpoint.make_sync_checkpointer()
    loaded = reader.load(str(path))
    reader.close()
    assert torch.equal(loaded["w"], _expected(2)) and loaded["step"] == 2
    assert sum(1 for n in names if n.endswith(".safetensors")) == 2, names
    reader = checkpoint.make_sync_checkpointer()
    following = reader.load(str(tmp_path / "next"))
    reader.close()
    assert torch.equal(following["w"], _expected(3)) and following["step"] == 3
