"""Placement math as plain data, checked against DTensor's own sharding (torch is used by the test only)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate as TorchReplicate
from torch.distributed.tensor import Shard as TorchShard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from planners.placement import (
    IrregularPlacementError,
    Layout,
    Replicate,
    Shard,
    StridedShard,
    chunk_box,
    coordinate_of,
    held_indices,
    position_of,
    replica_positions,
)


def _torch_placement(p):
    if isinstance(p, StridedShard):
        return _StridedShard(p.dim, split_factor=p.split_factor)
    if isinstance(p, Shard):
        return TorchShard(p.dim)
    return TorchReplicate()


def _torch_indices(shape, mesh_shape, coord, placements) -> list[list[int]]:
    """Per dim, the global indices DTensor's own splitting (`_split_tensor`) gives this coordinate."""
    held = [torch.arange(n) for n in shape]
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Replicate):
            continue
        one_d = _torch_placement(_as_dim0(p))
        pieces, _ = one_d._split_tensor(
            held[p.dim], mesh_shape[mesh_dim], with_padding=False, contiguous=False
        )
        held[p.dim] = pieces[coord[mesh_dim]]
    return [h.tolist() for h in held]


def _as_dim0(p):
    return StridedShard(dim=0, split_factor=p.split_factor) if isinstance(p, StridedShard) else Shard(dim=0)


def _expand(intervals) -> list[int]:
    return [i for lo, hi in intervals for i in range(lo, hi)]


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 13), min_size=ndim, max_size=ndim)))
    mesh_ndim = draw(st.integers(1, 3))
    mesh_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=mesh_ndim, max_size=mesh_ndim)))
    placements = []
    for _ in range(mesh_ndim):
        kind = draw(st.sampled_from(["shard", "replicate", "strided"]))
        dim = draw(st.integers(0, ndim - 1))
        if kind == "shard":
            placements.append(Shard(dim=dim))
        elif kind == "replicate":
            placements.append(Replicate())
        else:
            placements.append(StridedShard(dim=dim, split_factor=draw(st.integers(1, 4))))
    return shape, mesh_shape, tuple(placements)


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_held_indices_match_dtensor_splitting(layout):
    shape, mesh_shape, placements = layout
    for pos in range(torch.Size(mesh_shape).numel()):
        coord = coordinate_of(pos, mesh_shape)
        ours = [_expand(iv) for iv in held_indices(shape, mesh_shape, coord, placements)]
        assert ours == _torch_indices(shape, mesh_shape, coord, placements)


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_chunk_box_matches_torch_or_refuses_interleaved_chunks(layout):
    shape, mesh_shape, placements = layout
    torch_placements = [_torch_placement(p) for p in placements]
    for pos in range(torch.Size(mesh_shape).numel()):
        coord = coordinate_of(pos, mesh_shape)
        indices = _torch_indices(shape, mesh_shape, coord, placements)
        contiguous = all(ix == list(range(ix[0], ix[0] + len(ix))) if ix else True for ix in indices)
        if not contiguous:
            with pytest.raises(IrregularPlacementError):
                chunk_box(shape, mesh_shape, coord, placements)
            continue
        box = chunk_box(shape, mesh_shape, coord, placements)
        sizes, offsets = _compute_local_shape_and_global_offset(
            shape, mesh_shape, list(coord), torch_placements
        )
        assert box.sizes == tuple(sizes)
        nonempty = [d for d in range(len(shape)) if box.sizes[d]]
        assert [box.offsets[d] for d in nonempty] == [offsets[d] for d in nonempty]


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_boxes_tile_the_tensor_and_replicas_share_boxes(layout):
    shape, mesh_shape, placements = layout
    n = torch.Size(mesh_shape).numel()
    lay = Layout(mesh_shape=mesh_shape, placements=placements, ranks=tuple(range(n)))
    try:
        boxes = [chunk_box(shape, mesh_shape, coordinate_of(p, mesh_shape), placements) for p in range(n)]
    except IrregularPlacementError:
        return
    covered = torch.zeros(shape, dtype=torch.int64)
    for pos, box in enumerate(boxes):
        reps = replica_positions(lay, pos)
        assert pos in reps and all(boxes[r] == box for r in reps)
        if pos == min(reps):
            covered[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))] += 1
    assert bool((covered == 1).all())


def test_fsdp2_tp_layout_gives_contiguous_rows():
    # FSDP2 over TP: the tensor is TP-sharded first (mesh dim 1), then FSDP-sharded (mesh dim 0).
    placements = (StridedShard(dim=0, split_factor=4), Shard(dim=0))
    boxes = {(i, j): chunk_box((64, 8), (2, 4), (i, j), placements) for i in range(2) for j in range(4)}
    assert boxes[(1, 2)].offsets == (40, 0) and boxes[(1, 2)].sizes == (8, 8)
    assert boxes[(0, 3)].offsets == (48, 0)


def test_coordinates_round_trip():
    for pos in range(60):
        assert position_of(coordinate_of(pos, (3, 4, 5)), (3, 4, 5)) == pos


def test_layout_rejects_a_wrong_rank_list():
    with pytest.raises(ValueError, match="lists 3 ranks"):
        Layout(mesh_shape=(2, 2), placements=(Shard(dim=0), Replicate()), ranks=(0, 1, 2))


def test_planners_import_no_torch():
    code = (
        "import sys, importlib, pkgutil, planners\n"
        "for m in pkgutil.iter_modules(planners.__path__):\n"
        "    importlib.import_module('planners.' + m.name)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
