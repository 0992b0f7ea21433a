"""Async staging that starts before the plan agreement (checkpoint/async_writer/early_stage.py, issue 26 goal 4).

The early copy is a guess on the previous layout: these tests check that a kept guess
stages the values of the moment of save(), and that a wrong guess (another rank's
change moved a shared key to this rank) is dropped and staged again, with the checkpoint
exact either way, and that a save refused by the agreement leaves no copy running.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import checkpoint
from checkpoint import CheckpointStagerConfig, DefaultStager
from checkpoint.async_writer.early_stage import EarlyStager
from checkpoint.async_writer.staging import staging_layout
from checkpoint.save.local_plan import describe_local
from checkpoint.state.flatten import flatten_state_dict
from checkpoint.testing.ranks import run_ranks
from planners.errors import CheckpointExistsError
from tests.file_plans import one_file_plan


def test_a_kept_guess_stages_the_values_of_the_moment_and_a_wrong_one_is_awaited_and_dropped() -> None:
    tensors = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(300, dtype=torch.int64)}
    stager = DefaultStager(CheckpointStagerConfig(use_async_staging=True))
    early = EarlyStager(stager)
    try:
        local = describe_local(flatten_state_dict(tensors), 0, allow_pickle=False)
        early.start(local)  # nothing staged before: no guess
        assert early.take(one_file_plan(tensors)) is None
        layout = staging_layout(one_file_plan(tensors), tensors)
        stager.stage(tensors, layout).future.result(timeout=30)
        early.remember(local, one_file_plan(tensors))

        tensors["a"].add_(5)
        early.start(describe_local(flatten_state_dict(tensors), 0, allow_pickle=False))
        staged = early.take(one_file_plan(tensors))
        assert staged is not None and early.hits == 1
        staged.future.result(timeout=30)
        tensors["a"].add_(1)  # the training moves on after the stage future: the copy must not follow
        assert torch.equal(layout.views(stager.buffer)["a"], torch.arange(1000, dtype=torch.float32) + 5)

        # The agreed files differ (only "a" is this rank's now): the early copy ends before take() returns.
        early.start(describe_local(flatten_state_dict(tensors), 0, allow_pickle=False))
        running = early._early
        assert running is not None
        only_a = {"a": tensors["a"]}
        assert early.take(one_file_plan(only_a)) is None
        assert running.staged.future.done() and early.hits == 1

        # A changed plan (a new shape) is never guessed.
        grown = {**tensors, "a": torch.zeros(1001)}
        early.start(describe_local(flatten_state_dict(grown), 0, allow_pickle=False))
        assert early._early is None
    finally:
        stager.close()


def _state(rank: int, world_size: int, step: int, *, drop_p2: bool) -> dict:
    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256) + step
    state = {
        "w": distribute_tensor(full, mesh, [Shard(0)]),
        "p1": torch.arange(4096, dtype=torch.float32) + step,  # held by both: rank 0 writes it (the larger)
        "p2": torch.arange(16, dtype=torch.int64) + step,  # held by both: rank 1 writes it
    }
    if drop_p2 and rank == 1:
        del state["p2"]  # only rank 0 holds it now: rank 0 must write it, with an unchanged local plan
    return state


def _expected(step: int) -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256) + step,
        "p1": torch.arange(4096, dtype=torch.float32) + step,
        "p2": torch.arange(16, dtype=torch.int64) + step,
    }


def _ranks(rank: int, world_size: int, root: str) -> dict:
    ckpt = checkpoint.make_async_checkpointer()
    early = ckpt._early
    hits = []
    try:
        for step, drop in ((0, False), (1, False), (2, True), (3, True)):
            state = _state(rank, world_size, step, drop_p2=drop)
            stage_future, write_future = ckpt.save(state, f"{root}/step-{step}")
            stage_future.result(timeout=60)
            for t in state.values():  # right after staging: the checkpoint keeps the values of save()
                (t.to_local() if hasattr(t, "to_local") else t).fill_(-7)
            write_future.result(timeout=120)
            hits.append(early.hits)
        # A save the agreement refuses (the path holds a checkpoint) after an early copy started on
        # every rank: save() raises, and no copy is left running.
        state = _state(rank, world_size, 9, drop_p2=True)
        with pytest.raises(CheckpointExistsError):
            ckpt.save(state, f"{root}/step-3")
        left = early._early
    finally:
        ckpt.close()
    return {"hits": hits, "left": left is not None}


def test_two_ranks_guess_kept_then_dropped_when_another_rank_moves_a_key_here(tmp_path: Path) -> None:
    results = run_ranks(_ranks, 2, str(tmp_path), timeout_secs=240)
    # Step 0 plans afresh; step 1 keeps the guess on both; step 2: rank 0's plan is unchanged but it
    # now writes p2, so its guess is dropped, and rank 1's plan changed, so it guessed nothing;
    # step 3 keeps the new plan's guess on both.
    assert results[0]["hits"] == [0, 1, 1, 2]
    assert results[1]["hits"] == [0, 1, 1, 2]
    assert not results[0]["left"] and not results[1]["left"]
    with checkpoint.make_sync_checkpointer() as ckpt:
        for step in range(4):
            loaded = ckpt.load(str(tmp_path / f"step-{step}"))
            expected = _expected(step)
            assert sorted(loaded) == sorted(expected)
            for key, value in expected.items():
                assert torch.equal(loaded[key], value), (step, key)
