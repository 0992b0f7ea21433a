"""The synthetic state dicts every benchmark saves and loads.

Each rank builds only its own row shard of every tensor (`DTensor.from_local`,
no communication), so building 512 MB or 10,000 tensors costs no collective,
and the value of every element is a function of its global position. A rank
of any world size can therefore rebuild exactly what it should have loaded
after resharding, and a benchmark never reports the time of a wrong load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

# Element values cycle through 0..250: integers that float16 and bfloat16
# hold exactly, so equality checks work for every float dtype.
_VALUE_MODULUS = 251
# Columns of every big tensor: rows then carry the size, so row sharding
# over 1, 2 or 3 ranks splits every tensor into real pieces.
_COLUMNS = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class StateSpec:
    """The shape of a synthetic state dict.

    Attributes:
        total_bytes: tensor bytes over all ranks (the size of one checkpoint).
        num_tensors: number of tensors; they share the bytes equally.
        dtype: element type of every tensor.
        device: "cpu" or "cuda": where the training tensors live.
    """

    total_bytes: int
    num_tensors: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_tensors < 1:
            raise ValueError(f"num_tensors must be >= 1, got {self.num_tensors}")
        if self.total_bytes < self.num_tensors * self.element_size:
            raise ValueError(f"total_bytes {self.total_bytes} is less than one element per tensor")

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def global_shape(self) -> tuple[int, int]:
        """Every tensor's global shape: rows x columns, columns fewer for tiny states."""
        elements = max(1, self.total_bytes // (self.num_tensors * self.element_size))
        cols = min(_COLUMNS, elements)
        return max(1, elements // cols), cols


def row_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows `[start, end)` of `rank` under `Shard(0)` (torch.chunk's split: ceil-sized pieces)."""
    per = -(-rows // world_size)
    start = min(rows, rank * per)
    return start, min(rows, start + per)


def expected_rows(
    index: int, shape: tuple[int, int], rows: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The values of rows `rows` of tensor number `index` (on the CPU)."""
    start, end = rows
    flat = torch.arange(start * shape[1], end * shape[1], dtype=torch.int64)
    return ((flat + index * 7919) % _VALUE_MODULUS).to(dtype).reshape(end - start, shape[1])


def tensor_key(index: int) -> str:
    return f"layers.{index}.weight"


def build_state(spec: StateSpec, mesh: DeviceMesh, *, zeros: bool = False) -> dict:
    """This rank's state dict: `spec.num_tensors` row-sharded DTensors and a step counter.

    Args:
        spec: sizes, dtype and device.
        mesh: a 1-D mesh over the ranks of this run.
        zeros: all values zero (a load target); else the expected values.
    """
    rank, world_size = mesh.get_local_rank(), mesh.size()
    shape = spec.global_shape()
    rows = row_range(shape[0], rank, world_size)
    model = {}
    for i in range(spec.num_tensors):
        if zeros:
            local = torch.zeros(rows[1] - rows[0], shape[1], dtype=spec.dtype, device=spec.device)
        else:
            local = expected_rows(i, shape, rows, spec.dtype).to(spec.device)
        model[tensor_key(i)] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=(shape[1], 1)
        )
    return {"model": model, "step": 0 if zeros else 1000}


def check_state(spec: StateSpec, state: dict, mesh: DeviceMesh, *, what: str) -> None:
    """Raise `ValueError` naming the first key whose local shard differs from the expected values."""
    rank, world_size = mesh.get_local_rank(), mesh.size()
    shape = spec.global_shape()
    rows = row_range(shape[0], rank, world_size)
    for i in range(spec.num_tensors):
        got = state["model"][tensor_key(i)].to_local().cpu()
        if not torch.equal(got, expected_rows(i, shape, rows, spec.dtype)):
            raise ValueError(
                f"{what}: key model.{tensor_key(i)} on rank {rank} of {world_size} holds wrong values"
            )
    if state["step"] != 1000:
        raise ValueError(f"{what}: key step is {state['step']!r}, expected 1000")


def local_nbytes(state: dict) -> int:
    """Bytes of this rank's local shards (what a rank saves, or needs on load)."""
    return sum(t.to_local().numel() * t.element_size() for t in state["model"].values())


def small_tensor_state(num_tensors: int, mesh: DeviceMesh, *, elements: int = 64) -> dict:
    """Many tiny row-sharded DTensors: a save of it costs planning and metadata, hardly any bytes."""
    world_size = mesh.size()
    rows = world_size * max(1, elements // world_size)
    local_rows = row_range(rows, mesh.get_local_rank(), world_size)
    local = torch.ones(local_rows[1] - local_rows[0], 1)
    return {
        "model": {
            f"p{i}": DTensor.from_local(
                local.clone(), mesh, [Shard(0)], run_check=False, shape=torch.Size((rows, 1)), stride=(1, 1)
            )
            for i in range(num_tensors)
        }
    }
