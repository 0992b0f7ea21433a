"""Issue 17, "the first hour", on real ranks: the multi-rank mistakes a new user makes, each answered.

torchrun without a process group runs real processes with torchrun's environment (WORLD_SIZE=2) and
no group; everything else runs on gloo ranks through `checkpoint.testing.ranks.run_ranks`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import checkpoint
from checkpoint import CheckpointManager
from checkpoint.save import collectives
from checkpoint.testing.ranks import run_ranks

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parent.parent

# --- case 1: torchrun without a process group ----------------------------------------------------

_NO_GROUP_SCRIPT = """
import json, sys, torch, checkpoint
try:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.full((2,), float(sys.argv[2]))}, sys.argv[1], overwrite=True)
    print(json.dumps(["ok", ""]))
except Exception as e:
    print(json.dumps([type(e).__name__, str(e)]))
"""


def test_ranks_without_a_process_group_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": str(rank)}
        env.update(LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _NO_GROUP_SCRIPT, str(path), str(rank)],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    for rank, (kind, message) in enumerate(outcomes):
        assert kind == "CheckpointStateError"
        assert message == (
            f"WORLD_SIZE=2 (RANK={rank}) says this process is one of 2 ranks, but no torch.distributed "
            "process group is initialised; call torch.distributed.init_process_group() (e.g. "
            "backend='gloo' or 'nccl') on every rank before creating the checkpointer, or unset "
            "WORLD_SIZE for a single-process run"
        )
    assert not path.exists()


# --- case 2: ranks that pass different paths -----------------------------------------------------


def _different_paths(rank: int, world_size: int, root: str) -> dict[str, tuple[str, str]]:
    ckpt = checkpoint.make_sync_checkpointer()
    out = {}
    try:
        ckpt.save({"w": torch.ones(2)}, f"{root}/rank{rank}")
        out["save"] = ("ok", "")
    except Exception as e:
        out["save"] = (type(e).__name__, str(e))
    ckpt.save({"w": torch.full((2,), 7.0)}, f"{root}/run0/step-000000003")  # a real run under run0/
    mgr = CheckpointManager(f"{root}/run{rank}", checkpointer=ckpt)
    state = {"w": torch.zeros(2)}
    try:
        out["load"] = ("ok", str(mgr.load(state)))
    except Exception as e:
        out["load"] = (type(e).__name__, str(e))
    assert torch.equal(state["w"], torch.zeros(2))  # nothing was loaded from rank 0's run
    mgr.close()
    ckpt.close()
    return out


def test_ranks_passing_different_paths_all_fail_naming_both(tmp_path: Path) -> None:
    r0, r1 = run_ranks(_different_paths, 2, str(tmp_path), timeout_secs=90)
    save = (
        "CheckpointPathError",
        f"the ranks passed different paths to save(): rank 0 '{tmp_path}/rank0', rank 1 "
        f"'{tmp_path}/rank1'; every rank must pass the same checkpoint directory (one checkpoint holds "
        "every rank's shards: do not put the rank in the path)",
    )
    assert r0["save"] == r1["save"] == save
    load = (
        "CheckpointPathError",
        f"the ranks passed different paths to CheckpointManager (its root): rank 0 '{tmp_path}/run0', "
        f"rank 1 '{tmp_path}/run1'; every rank must pass the same checkpoint directory (one checkpoint "
        "holds every rank's shards: do not put the rank in the path)",
    )
    assert r0["load"] == r1["load"] == load
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run0"]


# --- case 6: a save on one rank only ---------------------------------------------------------------


class _Warnings(logging.Handler):
    """Keeps the exchange's warnings and tells the waiting peer, through the job's store, that one came."""

    def __init__(self, store: dist.Store) -> None:
        super().__init__(logging.WARNING)
        self.store, self.messages = store, []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.store.set("first-hour/warned", b"1")


def _late_rank(rank: int, world_size: int, root: str) -> list[str] | tuple[str, str]:
    collectives.WAIT_WARNING_SECS = 0.2  # the test's minute
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), is_master=False)
    ckpt = checkpoint.make_sync_checkpointer()
    state = {"w": torch.arange(4.0) + rank}
    if rank == 1:  # late: joins the save only once rank 0 has warned that it waits for rank 1
        store.wait(["first-hour/warned"], timedelta(seconds=60))
        ckpt.save(state, f"{root}/late")
        ckpt.close()
        return []  # leaves without the second save: rank 0 must name it
    handler = _Warnings(store)
    logging.getLogger("checkpoint.save.arrival").addHandler(handler)  # ranks meet in the store first
    ckpt.save(state, f"{root}/late")
    assert torch.equal(ckpt.load(f"{root}/late")["w"], torch.arange(4.0))
    warned = list(handler.messages)
    # The job's store times out after 8 s (as init_process_group(timeout=8 s) would set it): rank 0 gives
    # up on the absent rank at 3/4 of that (checkpoint.save.arrival.DEADLINE_SHARE).
    dist.distributed_c10d._get_default_store().set_timeout(timedelta(seconds=8))
    try:
        ckpt.save(state, f"{root}/alone")
        return ("ok", "")
    except Exception as e:
        return warned + [type(e).__name__, str(e)]


def test_a_rank_that_has_not_reached_the_save_is_named_while_waiting_and_in_the_error(tmp_path: Path):
    r0, _ = run_ranks(_late_rank, 2, str(tmp_path), timeout_secs=60)
    *warned, kind, message = r0
    assert warned, r0
    for text in warned:
        assert text.startswith("rank 0: waiting ") and text.endswith(
            "s at the start of a save for rank(s) 1, which have not called save() (still training, "
            "stuck, or not calling save() at all: every rank must call it)"
        ), text
    assert kind == "DistributedCheckpointError"
    assert message.startswith("rank 0: save() is collective and rank(s) [1] did not call it within 6s"), (
        message
    )
    assert message.endswith("\n  rank 1: never called save()"), message


# --- case 10: a failed save leaves no directory it created ----------------------------------------


def _keys_differ(rank: int, world_size: int, root: str) -> list[str]:
    ckpt = checkpoint.make_sync_checkpointer()
    # Ranks that disagree on a key's dtype (a key held by some ranks only is a pipeline stage's: saved).
    state = {"w": torch.ones(2, dtype=torch.float64 if rank == 1 else torch.float32)}
    errors = []
    for path in (f"{root}/new/deeper/ckpt", f"{root}/existing"):
        try:
            ckpt.save(state, path)
        except Exception as e:
            errors.append(type(e).__name__)
    ckpt.close()
    return errors


def test_a_failed_save_removes_only_the_directories_it_created(tmp_path: Path) -> None:
    (tmp_path / "existing").mkdir()
    results = run_ranks(_keys_differ, 2, str(tmp_path), timeout_secs=60)
    assert results == [["InvalidStateDictError"] * 2] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert list((tmp_path / "existing").iterdir()) == []
