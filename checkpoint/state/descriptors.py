"""Live DTensors turned into plain layout descriptors.

The planner works on `planners.placement.Layout` records (mesh shape,
placements, the global rank at each mesh position); this module is the one
place that reads them off torch objects. Meshes and placements repeat across
thousands of tensors, so conversions are cached per mesh object and per
placement tuple.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor import Replicate as TorchReplicate
from torch.distributed.tensor import Shard as TorchShard
from torch.distributed.tensor.placement_types import _StridedShard

from planners.boxes import Box
from planners.errors import InvalidStateDictError
from planners.placement import Layout, Placement, Replicate, Shard, StridedShard, chunk_box

# DeviceMesh -> (mesh shape, ranks); weak so a dropped mesh is not kept alive.
_MESHES: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], tuple[int, ...]]] = weakref.WeakKeyDictionary()


def plain_placements(placements: Sequence[Any], *, key: str) -> tuple[Placement, ...]:
    """torch placements as plain records (`Partial` is refused: it holds unreduced values)."""
    out: list[Placement] = []
    for p in placements:
        if isinstance(p, _StridedShard):
            out.append(StridedShard(dim=p.dim, split_factor=int(p.split_factor)))
        elif isinstance(p, TorchShard):
            out.append(Shard(dim=p.dim))
        elif isinstance(p, TorchReplicate):
            out.append(Replicate())
        elif isinstance(p, Partial):
            raise InvalidStateDictError(
                f"key {key!r}: DTensor with a Partial placement holds unreduced values; "
                "redistribute it to Shard/Replicate before saving"
            )
        else:
            raise InvalidStateDictError(f"key {key!r}: unsupported DTensor placement {p!r}")
    return tuple(out)


def _mesh_info(mesh: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        return _MESHES[mesh]
    except (KeyError, TypeError):
        pass
    info = (tuple(int(n) for n in mesh.shape), tuple(int(r) for r in mesh.mesh.flatten().tolist()))
    try:
        _MESHES[mesh] = info
    except TypeError:  # a mesh type that cannot be weakly referenced: just not cached
        pass
    return info


def dtensor_layout(tensor: DTensor, *, key: str) -> tuple[Layout, Box]:
    """The layout of a DTensor and the box this rank holds of it.

    Raises:
        InvalidStateDictError: a Partial placement, a rank outside the mesh, or an interleaved chunk.
    """
    mesh = tensor.device_mesh
    placements = plain_placements(tuple(tensor.placements), key=key)
    mesh_shape, ranks = _mesh_info(mesh)
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise InvalidStateDictError(f"key {key!r}: this rank is not part of the DTensor's device mesh")
    layout = Layout(mesh_shape=mesh_shape, placements=placements, ranks=ranks)
    try:
        box = chunk_box(tuple(tensor.shape), mesh_shape, tuple(coordinate), placements)
    except InvalidStateDictError as e:
        raise type(e)(f"key {key!r}: {e}") from e
    return layout, box
