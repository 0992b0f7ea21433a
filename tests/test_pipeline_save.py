"""Pipeline stages hold different keys: the first save exchanges one structure per stage, and loads back whole."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import checkpoint
from checkpoint.testing.ranks import run_ranks
from planners.errors import InvalidStateDictError

pytestmark = pytest.mark.multiproc


def _full(stage: int, name: str) -> torch.Tensor:
    return torch.arange(40, dtype=torch.float32).reshape(10, 4) + 100 * stage + (0.5 if name == "b" else 0)


def _stage_state(rank: int, world_size: int, *, bad: bool = False) -> dict:
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("pp", "dp"))
    stage = rank // (world_size // 2)
    sub = mesh["dp"]
    layers = {name: distribute_tensor(_full(stage, name), sub, [Shard(0)]) for name in ("a", "b")}
    step = 7 if not (bad and rank == 3) else torch.ones(1)
    return {"model": {f"stage{stage}": layers}, "step": step}


def _save(rank: int, world_size: int, root: str) -> str:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_stage_state(rank, world_size), f"{root}/good")
    try:
        ckpt.save(_stage_state(rank, world_size, bad=True), f"{root}/bad")
        result = "saved"
    except InvalidStateDictError as e:
        result = str(e)
    ckpt.close()
    return result


def test_pipeline_stages_save_and_load_whole(tmp_path):
    results = run_ranks(_save, 4, str(tmp_path))
    # Rank 3 holds 'step' as a tensor, the others as a value: every rank gets the error naming key and ranks.
    assert (
        results
        == ["key 'step': rank 3 holds a tensor, rank 0 a value; every rank must hold the same kind of leaf"]
        * 4
    )
    # One process loads every stage into plain tensors (a load without a target rebuilds only the
    # coordinator's nesting, which holds stage 0's keys).
    target = {"model": {f"stage{s}": {n: torch.zeros(10, 4) for n in ("a", "b")} for s in (0, 1)}, "step": 0}
    full = checkpoint.make_sync_checkpointer().load(str(tmp_path / "good"), state_dict=target, strict=True)
    for stage in (0, 1):
        for name in ("a", "b"):
            assert torch.equal(full["model"][f"stage{stage}"][name], _full(stage, name))
    assert full["step"] == 7
