"""Rank functions for the FSDP2 / FSDP2+TP tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import checkpoint
from planners.errors import RankLocalError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 30)  # 30 rows: uneven over 4 and 3 ranks
        self.down = nn.Linear(30, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def build(kind: str, world_size: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP()
    if kind == "fsdp":
        fully_shard(model.up)
        fully_shard(model.down)
        fully_shard(model)
    elif kind == "fsdp_tp":
        mesh = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(model.up, mesh=mesh["dp"])
        fully_shard(model.down, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 6, generator=g)
        optim.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optim.step()


def full(tree: object) -> object:
    """Nested dicts of full CPU tensors (DTensors gathered)."""
    if isinstance(tree, dict):
        return {k: full(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [full(v) for v in tree]
    if isinstance(tree, DTensor):
        return tree.full_tensor().clone()  # on a one-rank mesh full_tensor() may share the parameter's storage
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    return tree


def assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (where, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def snapshot(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": full(model_sd), "optim": full(optim_sd["state"])}


def save_trained(rank: int, world_size: int, kind: str, path: str) -> dict | None:
    model = build(kind, world_size, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optim, 3)
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "step": 3,
        "rng": checkpoint.RankLocal(torch.full((3,), float(rank))),
        "loader": checkpoint.RankLocal({"rank": rank, "position": (rank, 100 + rank)}),
    }
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(state, path)
    assert ckpt.last_save.plan_reused is False
    ckpt.save({**state, "step": 4}, path + "-again")  # same structure: one digest per rank, no plan gather
    assert ckpt.last_save.plan_reused is True
    ckpt.close()
    snap = snapshot(model, optim)
    return snap if rank == 0 else None


def load_and_compare(
    rank: int, world_size: int, kind: str, path: str, expected: dict, saved_world_size: int
) -> str:
    model = build(kind, world_size, seed=123)  # different initial values: the load must overwrite all
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd, "step": 0}
    ckpt = checkpoint.make_sync_checkpointer()
    if world_size == saved_world_size:
        state["rng"] = checkpoint.RankLocal(torch.zeros(3))
        state["loader"] = checkpoint.RankLocal(None)
    else:
        try:
            ckpt.load(path, state_dict={**state, "rng": checkpoint.RankLocal(torch.zeros(3))})
        except RankLocalError as e:
            assert "'rng'" in str(e) and f"saved by {saved_world_size} ranks" in str(e)
        else:
            raise AssertionError("a rank-local value loaded into another world size")
    loaded = ckpt.load(path, state_dict=state, strict=True)
    set_state_dict(model, optim, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert loaded["step"] == 3
    if world_size == saved_world_size:
        assert torch.equal(loaded["rng"].value, torch.full((3,), float(rank)))
        assert loaded["loader"].value == {"rank": rank, "position": (rank, 100 + rank)}
    assert_same(expected, snapshot(model, optim))
    ckpt.close()
    return "ok"
