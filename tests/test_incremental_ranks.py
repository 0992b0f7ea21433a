"""Incremental checkpoints on real ranks and retention under SIGKILL (issue 27's Done-when tests)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal

import pytest
import torch

import checkpoint
from checkpoint.config import CheckpointWriterConfig
from checkpoint.testing.ranks import run_ranks
from planners.metadata import METADATA_FILE
from tests.incremental_workers import load_incremental, save_incremental_chain, save_unchanged_dtensors, sweep


@pytest.mark.multiproc
def test_fsdp2_incremental_saves_on_2_ranks_resume_on_3_exactly(tmp_path):
    root = str(tmp_path / "run")
    expected, written = run_ranks(save_incremental_chain, 2, root, timeout_secs=240)[0]
    with open(os.path.join(root, "step-3", METADATA_FILE)) as f:
        doc = json.load(f)
    assert doc["version"] == 3
    # The frozen layer's DTensor chunks (a grid key) come from step-1's files, one hop.
    assert {f["checkpoint"] for f in doc["references"]["files"].values()} == {"step-1"}
    referenced = doc["references"]["files"]
    up = doc["references"]["chunks"]["model.up.weight"]
    assert len(up) == 2 and all(c["file"] in referenced for c in up)
    assert all(c["file"] not in referenced for c in doc["references"]["chunks"]["model.down.weight"])
    assert written[1] < written[0] and written[2] < written[0]
    assert run_ranks(load_incremental, 3, f"{root}/step-3", expected, timeout_secs=240) == ["ok"] * 3
    assert checkpoint.verify(f"{root}/step-3").ok


def _frozen(i: int) -> torch.Tensor:
    return torch.arange(50_000, dtype=torch.float32) * (i + 1)


def _run_state(step: int) -> dict:
    return {
        "base": {str(i): _frozen(i) for i in range(4)},
        "adapter": torch.full((16,), float(step)),
        "step": step,
    }


def _files(root: str) -> set[str]:
    return {os.path.join(d, n) for d in os.listdir(root) for n in os.listdir(os.path.join(root, d))}


def _make_run(root: str) -> None:
    """Steps 1 (full) to 4, each referencing the previous one: 2, 3 and 4 read the base from step-1's files."""
    ckpt = checkpoint.make_sync_checkpointer(
        checkpoint.CheckpointerConfig(writer_config=CheckpointWriterConfig(max_file_bytes=150_000))
    )
    for step in (1, 2, 3, 4):
        options = {"incremental": True} if step == 1 else {"base": f"{root}/step-{step - 1}"}
        ckpt.save(_run_state(step), f"{root}/step-{step}", **options)
    ckpt.close()


def _killed_sweep(root: str, kill_before: int) -> int | None:
    """The sweep in a forked child SIGKILLed before its `kill_before`-th removal; its exit code."""
    process = multiprocessing.get_context("fork").Process(target=sweep, args=(root, kill_before))
    process.start()
    process.join(60)
    return process.exitcode


def _check_retained(root: str) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    for step in (3, 4):
        loaded = ckpt.load(f"{root}/step-{step}")
        assert all(torch.equal(loaded["base"][str(i)], _frozen(i)) for i in range(4))
        assert torch.equal(loaded["adapter"], torch.full((16,), float(step))) and loaded["step"] == step
        assert checkpoint.verify(f"{root}/step-{step}").ok
    ckpt.close()


@pytest.mark.slow
def test_retention_with_references_under_sigkill_at_every_step_of_the_sweep(tmp_path):
    pristine = str(tmp_path / "pristine")
    _make_run(pristine)
    before = _files(pristine)
    done = str(tmp_path / "done")
    shutil.copytree(pristine, done)
    removals = sweep(done)
    after = _files(done)
    # Uninterrupted: step-2 is gone, step-1 keeps exactly the files steps 3 and 4 reference, no metadata.
    referenced = set()
    for step in (3, 4):
        with open(os.path.join(done, f"step-{step}", METADATA_FILE)) as f:
            referenced |= {f"step-1/{n}" for n in json.load(f)["references"]["files"]}
    assert referenced and {p for p in after if p.startswith("step-1/")} == referenced
    assert not os.path.exists(os.path.join(done, "step-2"))
    assert removals >= 3
    _check_retained(done)
    for k in range(1, removals + 1):
        root = str(tmp_path / f"kill-{k}")
        shutil.copytree(pristine, root)
        assert _killed_sweep(root, k) == -signal.SIGKILL, k
        left = _files(root)
        assert after <= left <= before, k  # nothing needed is lost; nothing appears
        leaked = left - after
        assert all(p.startswith(("step-1/", "step-2/")) for p in leaked), (
            k,
            leaked,
        )  # only the interrupted sweep's
        _check_retained(root)
        sweep(root)  # the next prune finishes the sweep
        assert _files(root) == after, k
        _check_retained(root)


def test_retention_waits_while_a_save_is_in_flight_in_an_incremental_run(tmp_path):
    """The grace period: a save in flight (live in-progress marker) may be about to reference a dropped step."""
    from checkpoint.save.lease import claim, release_quietly
    from storage.spec import StorageSpec

    root = str(tmp_path / "run")
    _make_run(root)
    before = _files(root)
    flight = StorageSpec.resolve(f"{root}/step-5").open()
    flight.prepare()
    claim(flight, "0123456789ab", 600.0)  # a save of step 5 in flight, renewed by this (live) process
    sweep(root)
    assert _files(root) == before | {"step-5/.inprogress-0123456789ab.json"}  # nothing deleted
    release_quietly(flight, "0123456789ab")
    flight.close()
    sweep(root)  # the save ended: the purge goes ahead
    assert not os.path.exists(os.path.join(root, "step-2")) and os.listdir(os.path.join(root, "step-1"))
    _check_retained(root)


@pytest.mark.multiproc
def test_unchanged_dtensors_on_2_ranks_are_all_referenced_and_load_on_1(tmp_path):
    from tests.golden.make_golden import two_rank_global

    root = str(tmp_path / "run")
    written = run_ranks(save_unchanged_dtensors, 2, root)
    assert max(written) < 300  # each rank: one shard file with its rank-local tensor and a header
    ckpt = checkpoint.make_sync_checkpointer()
    loaded = ckpt.load(f"{root}/step-2")
    assert all(torch.equal(loaded["model"][k], v) for k, v in two_rank_global().items())
    assert [t.tolist() for t in loaded["rng"]] == [[0, 10], [1, 11]]
    assert checkpoint.verify(f"{root}/step-2").ok
    ckpt.close()
