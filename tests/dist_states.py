"""Deterministic global tensors and their DTensor layouts, shared by multi-rank tests.

A layout names a device mesh shape and the placements of each tensor; every
rank builds the same global tensors, so a rank can check what it loaded
against the exact expected values.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "w": ((10, 6), torch.float32),  # 10 rows: uneven over 3 and 4 ranks
    "b": ((7, 5, 3), torch.bfloat16),
    "i": ((12,), torch.int64),
    "nested.x.y": ((5, 4), torch.float16),
}

# mesh shape (None: plain tensors) and per-tensor placements ("S<d>" or "R" per mesh dim)
LAYOUTS: dict[str, tuple[tuple[int, ...] | None, dict[str, tuple[str, ...]]]] = {
    "plain": (None, {}),
    "row": ((-1,), {"w": ("S0",), "b": ("S1",), "i": ("R",), "nested.x.y": ("S1",)}),
    "col": ((-1,), {"w": ("S1",), "b": ("S0",), "i": ("S0",), "nested.x.y": ("R",)}),
    "grid": ((2, 2), {"w": ("S0", "S1"), "b": ("R", "S2"), "i": ("S0", "S0"), "nested.x.y": ("S1", "R")}),
}


def global_tensor(name: str) -> torch.Tensor:
    shape, dtype = SHAPES[name]
    n = 1
    for s in shape:
        n *= s
    values = torch.arange(n, dtype=torch.float64).reshape(shape) * 1.25 - 7
    return values.to(dtype)


def _placement(code: str) -> Shard | Replicate:
    return Replicate() if code == "R" else Shard(int(code[1:]))


def build_state(layout: str, world_size: int, *, zeros: bool = False) -> dict:
    """The test state dict in `layout` (zeros: same layout, all values zero, as a load target)."""
    mesh_shape, placements = LAYOUTS[layout]
    tensors = {}
    mesh = None
    if mesh_shape is not None:
        shape = tuple(world_size if s == -1 else s for s in mesh_shape)
        mesh = init_device_mesh("cpu", shape)
    for name in SHAPES:
        full = global_tensor(name)
        if zeros:
            full = torch.zeros_like(full)
        if mesh is not None:
            full = distribute_tensor(full, mesh, [_placement(c) for c in placements[name]])
        tensors[name] = full
    return {
        "model": {"w": tensors["w"], "b": tensors["b"]},
        "ints": [tensors["i"]],
        "nested": {"x.y": tensors["nested.x.y"]},
        "scalar": torch.tensor(0.0 if zeros else 2.5, dtype=torch.float64),
        "step": 0 if zeros else 42,
        "cfg": None if zeros else {"lr": 0.1, "betas": (0.9, 0.95)},
    }


def check_state(state: dict) -> None:
    """Every tensor of `state` equals its global tensor exactly (DTensors gathered first)."""
    got = {
        "w": state["model"]["w"],
        "b": state["model"]["b"],
        "i": state["ints"][0],
        "nested.x.y": state["nested"]["x.y"],
    }
    for name, t in got.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        expected = global_tensor(name)
        assert full.dtype == expected.dtype, (name, full.dtype)
        assert torch.equal(full, expected), f"{name}: {full} != {expected}"
    assert torch.equal(state["scalar"], torch.tensor(2.5, dtype=torch.float64))
    assert state["step"] == 42 and type(state["step"]) is int
    assert state["cfg"] == {"lr": 0.1, "betas": (0.9, 0.95)} and type(state["cfg"]["betas"]) is tuple
