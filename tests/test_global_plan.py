"""Decentralized save planning, in one process: every rank's own writes, from structures alone."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planners.boxes import tiling_problem
from planners.errors import InvalidStateDictError
from planners.global_plan import WorldStructure, from_run_lengths, run_lengths, structure_of
from planners.placement import Layout, Replicate, Shard, StridedShard
from planners.union import value_senders
from planners.world_check import check_world
from planners.world_layout import writes_of


def _world(structures, table):
    return WorldStructure(structures=tuple(structures), rank_structure=tuple(table))


def _all_writes(world):
    return {r: writes_of(world, r) for r in range(world.world_size)}


def _assert_written_once(world, shapes):
    boxes = defaultdict(list)
    for writes in _all_writes(world).values():
        for w in writes:
            boxes[w.fqn].append(w.box)
    for fqn, shape in shapes.items():
        assert tiling_problem(shape, boxes[fqn]) is None, fqn


@st.composite
def meshed_tensors(draw):
    mesh_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    tensors = []
    for i in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(1, 17), min_size=1, max_size=3)))
        placements = []
        for _ in mesh_shape:
            kind = draw(st.sampled_from(["shard", "replicate"]))
            dim = draw(st.integers(0, len(shape) - 1))
            placements.append(Shard(dim=dim) if kind == "shard" else Replicate())
        tensors.append((f"t{i}", shape, tuple(placements)))
    return mesh_shape, tensors


@settings(max_examples=60, deadline=None)
@given(meshed_tensors(), st.integers(0, 3))
def test_every_chunk_is_written_exactly_once(case, n_plain):
    mesh_shape, tensors = case
    world_size = math.prod(mesh_shape)
    ranks = tuple(reversed(range(world_size)))  # a mesh need not list ranks in order
    entries = [
        (fqn, "float32", shape, Layout(mesh_shape=mesh_shape, placements=p, ranks=ranks))
        for fqn, shape, p in tensors
    ]
    entries += [(f"plain{i}", "bfloat16", (i + 3, 2), None) for i in range(n_plain)]
    world = _world([structure_of(entries, ["step"])], [0] * world_size)
    check_world(world)
    _assert_written_once(world, {e[0]: e[2] for e in entries})


def test_replicated_chunks_spread_over_their_holders():
    # HSDP: replicate over 4 groups, shard over 2; 16 equal tensors -> every rank writes 4 of them.
    layout = Layout(mesh_shape=(4, 2), placements=(Replicate(), Shard(dim=0)), ranks=tuple(range(8)))
    entries = [(f"w{i:02d}", "float32", (8, 8), layout) for i in range(16)]
    world = _world([structure_of(entries, [])], [0] * 8)
    counts = {r: len(w) for r, w in _all_writes(world).items()}
    assert counts == {r: 4 for r in range(8)}
    _assert_written_once(world, {e[0]: e[2] for e in entries})


def test_plain_tensors_are_balanced_by_bytes():
    entries = [(f"p{i}", "float32", (100 * (i + 1),), None) for i in range(8)]
    world = _world([structure_of(entries, [])], [0] * 4)
    per_rank = [sum(w.nbytes for w in writes) for writes in _all_writes(world).values()]
    assert sum(per_rank) == sum(4 * 100 * (i + 1) for i in range(8))
    assert max(per_rank) - min(per_rank) <= 400 * 4  # at most one chunk of imbalance


def test_fsdp_tp_pp_world_plans_each_stage_from_its_representative():
    pp, dp, tp = 2, 2, 2
    structures, table = [], []
    for stage in range(pp):
        ranks = tuple(range(stage * dp * tp, (stage + 1) * dp * tp))
        layout = Layout(
            mesh_shape=(dp, tp), placements=(StridedShard(dim=0, split_factor=tp), Shard(dim=0)), ranks=ranks
        )
        entries = [(f"layers.{stage}.w", "bfloat16", (16, 4), layout), ("norm", "float32", (4,), None)]
        structures.append(structure_of(entries, ["lr"]))
        table += [stage] * dp * tp
    world = _world(structures, table)
    check_world(world)
    _assert_written_once(world, {"layers.0.w": (16, 4), "layers.1.w": (16, 4), "norm": (4,)})
    assert world.structures[0].digest() != world.structures[1].digest()


def test_disagreeing_dtypes_name_the_key_and_ranks():
    a = structure_of([("w", "float32", (4,), None)], [])
    b = structure_of([("w", "float64", (4,), None)], [])
    with pytest.raises(
        InvalidStateDictError, match=r"key 'w': rank 0 has dtype float32 shape \[4\], rank 2 has"
    ):
        check_world(_world([a, b], [0, 0, 1]))


def test_a_mesh_rank_lacking_the_key_is_named():
    layout = Layout(mesh_shape=(2,), placements=(Shard(dim=0),), ranks=(0, 1))
    a = structure_of([("w", "float32", (4,), layout)], [])
    b = structure_of([], [])
    with pytest.raises(
        InvalidStateDictError, match=r"key 'w': rank 1 is in the key's DTensor mesh but lacks it"
    ):
        check_world(_world([a, b], [0, 1]))


def test_values_may_live_on_some_ranks_and_are_sent_by_their_lowest_holder():
    a = structure_of([("w", "float32", (4,), None)], ["step"])
    b = structure_of([("w", "float32", (4,), None)], ["lr", "step"])
    world = _world([a, b], [0, 0, 0, 1, 1])
    check_world(world)  # a pipeline stage's values (torchtitan's flattened param_groups) are its own
    assert value_senders(world) == {3: ("lr",)}


def test_a_rank_outside_its_own_mesh_is_refused():
    layout = Layout(mesh_shape=(2,), placements=(Shard(dim=0),), ranks=(0, 1))
    a = structure_of([("w", "float32", (4,), layout)], [])
    with pytest.raises(InvalidStateDictError, match="rank 2 holds a DTensor on a mesh"):
        check_world(_world([a], [0, 0, 0]))


def test_layout_disagreement_is_named():
    a = structure_of(
        [("w", "float32", (4,), Layout(mesh_shape=(2,), placements=(Shard(dim=0),), ranks=(0, 1)))], []
    )
    b = structure_of(
        [("w", "float32", (4,), Layout(mesh_shape=(2,), placements=(Replicate(),), ranks=(0, 1)))], []
    )
    with pytest.raises(InvalidStateDictError, match=r"key 'w': rank 0 has mesh \[2\]"):
        check_world(_world([a, b], [0, 1]))


def test_run_lengths_round_trip():
    table = [0] * 5 + [1] * 3 + [0] * 2
    assert run_lengths(table) == [(0, 5), (1, 3), (0, 2)]
    assert from_run_lengths(run_lengths(table)) == tuple(table)


def test_empty_tensors_need_one_plain_chunk_and_no_grid_chunk():
    layout = Layout(mesh_shape=(3,), placements=(Shard(dim=0),), ranks=(0, 1, 2))
    entries = [("e", "float32", (0, 5), layout), ("p", "float32", (0,), None)]
    world = _world([structure_of(entries, [])], [0, 0, 0])
    assert {r: [w.fqn for w in ws] for r, ws in _all_writes(world).items()} == {0: ["p"], 1: [], 2: []}


def test_a_key_that_is_a_tensor_on_one_rank_and_a_value_on_another_is_refused():
    a = structure_of([], ["step"])
    b = structure_of([("step", "int64", (), None)], [])
    with pytest.raises(InvalidStateDictError, match=r"key 'step': rank 2 holds a tensor, rank 0 a value"):
        check_world(_world([a, b], [0, 0, 1]))
