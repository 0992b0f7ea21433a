"""Planning the layouts of 3-D jobs in one process: pipeline stages, sub-mesh replicas, experts.

Each world here is what the ranks of a real job send in the plan exchange; every chunk must be
written exactly once, the metadata's grid records must locate each chunk's writer as the save
chose it, and real inconsistencies must be refused naming the key, the ranks and the region.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planners.boxes import Box, tiling_problem
from planners.errors import InvalidStateDictError
from planners.global_plan import WorldStructure, structure_of
from planners.grid import GridIndex, grid_fields
from planners.placement import Layout, Replicate, Shard, StridedShard
from planners.union import replica_mismatches, union_tree, value_senders
from planners.world_check import check_world
from planners.world_layout import key_layouts, writes_of


def _world(structures, table):
    world = WorldStructure(structures=tuple(structures), rank_structure=tuple(table))
    check_world(world)
    return world


def _written(world):
    """fqn -> {box: writer rank}, asserting no box is written twice."""
    out = defaultdict(dict)
    for r in range(world.world_size):
        for w in writes_of(world, r):
            assert w.box not in out[w.fqn], (w.fqn, w.box)
            out[w.fqn][w.box] = r
    return out


def _assert_tiles_and_index_agrees(world, shapes):
    written = _written(world)
    fields = grid_fields(world)
    plain = {k: ("float32", s) for k, s in shapes.items() if k not in fields["grids"]}
    index = GridIndex(
        meshes=fields["meshes"], grids=fields["grids"], plain=plain, world_size=world.world_size
    )
    for fqn, shape in shapes.items():
        assert tiling_problem(shape, list(written[fqn])) is None, fqn
        if fqn in fields["grids"]:
            full = Box(offsets=(0,) * len(shape), sizes=shape)
            assert {c.box: c.writer for c in index.cells(fqn, full)} == written[fqn], fqn
    return written, fields


def _submesh_world(dp: int, tp: int, shape=(12, 4)):
    """FSDP over the dp dim of a dp x tp mesh (row-major ranks): tp rank t's sub-mesh is ranks t, t+tp, ..."""
    structures, table = [], []
    for t in range(tp):
        layout = Layout(mesh_shape=(dp,), placements=(Shard(dim=0),), ranks=tuple(range(t, dp * tp, tp)))
        structures.append(
            structure_of([("w", "float32", shape, layout), ("b", "float32", (5,), layout)], ["step"])
        )
    for r in range(dp * tp):
        table.append(r % tp)
    return _world(structures, table)


def test_submesh_replicas_are_written_once_and_spread_over_their_groups():
    world = _submesh_world(2, 2)
    written, fields = _assert_tiles_and_index_agrees(world, {"w": (12, 4), "b": (5,)})
    # Rows 0-5 are held by ranks 0 and 1, rows 6-11 by ranks 2 and 3: each pair writes one of its two chunks.
    assert written["w"] == {Box(offsets=(0, 0), sizes=(6, 4)): 0, Box(offsets=(6, 0), sizes=(6, 4)): 2}
    assert written["b"] == {Box(offsets=(0,), sizes=(3,)): 1, Box(offsets=(3,), sizes=(2,)): 3}
    # One mesh over the job: the groups' dim last makes its ranks a run, stored as two numbers.
    (mesh,) = fields["meshes"]
    assert (mesh.shape, mesh.ranks) == ((2, 2), range(0, 4))
    assert fields["grids"]["w"].placements == (Shard(dim=0), Replicate())


def test_metadata_of_submesh_replicas_stays_flat_in_world_size():
    small, large = grid_fields(_submesh_world(2, 2)), grid_fields(_submesh_world(64, 8))
    assert [m.ranks for m in large["meshes"]] == [range(0, 512)]
    assert small["grids"]["w"].placements == large["grids"]["w"].placements


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 13), st.booleans())
def test_submesh_groups_of_any_size_tile_each_key(dp, tp, rows, column_major):
    structures, table = [], [0] * (dp * tp)
    for t in range(tp):
        ranks = tuple(t * dp + i for i in range(dp)) if column_major else tuple(range(t, dp * tp, tp))
        layout = Layout(mesh_shape=(dp,), placements=(Shard(dim=0),), ranks=ranks)
        structures.append(
            structure_of([("w", "float32", (rows, 3), layout), ("p", "float32", (2,), None)], [])
        )
        for r in ranks:
            table[r] = t
    _assert_tiles_and_index_agrees(_world(structures, table), {"w": (rows, 3), "p": (2,)})


def test_pipeline_stages_hold_their_own_keys_and_a_stage_only_plain_tensor():
    structures = []
    for stage in range(2):
        ranks = (2 * stage, 2 * stage + 1)
        mesh = Layout(mesh_shape=(2,), placements=(Shard(dim=0),), ranks=ranks)
        entries = [(f"layers.{stage}.w", "float32", (6, 2), mesh)]
        if stage == 0:
            entries.append(("stage0_table", "float32", (7, 3), None))
        entries.append(("norm", "float32", (4,), None))
        structures.append(structure_of(entries, ["step"]))
    world = _world(structures, [0, 0, 1, 1])
    shapes = {"layers.0.w": (6, 2), "layers.1.w": (6, 2), "stage0_table": (7, 3), "norm": (4,)}
    written, fields = _assert_tiles_and_index_agrees(world, shapes)
    assert set(written["stage0_table"].values()) <= {0, 1}
    layout = key_layouts(world).layouts["stage0_table"]
    assert (layout.mesh_shape, layout.placements, layout.ranks) == ((2,), (Replicate(),), range(0, 2))
    assert key_layouts(world).layouts["norm"] is None  # every rank holds it: a plain key as before
    assert "norm" not in fields["grids"]


def test_pp_fsdp_tp_with_strided_shards_on_each_stage():
    structures, table = [], []
    for stage in range(2):
        ranks = tuple(range(4 * stage, 4 * stage + 4))
        layout = Layout(
            mesh_shape=(2, 2), placements=(StridedShard(dim=0, split_factor=2), Shard(dim=0)), ranks=ranks
        )
        dp_only = [
            Layout(mesh_shape=(2,), placements=(Shard(dim=0),), ranks=(ranks[t], ranks[t + 2]))
            for t in range(2)
        ]
        for t in range(2):
            structures.append(
                structure_of(
                    [
                        (f"s{stage}.w", "float32", (8, 4), layout),
                        (f"s{stage}.n", "float32", (6,), dp_only[t]),
                    ],
                    [],
                )
            )
        table += [2 * stage, 2 * stage + 1] * 2
    world = _world(structures, table)
    _assert_tiles_and_index_agrees(world, {"s0.w": (8, 4), "s1.w": (8, 4), "s0.n": (6,), "s1.n": (6,)})


def _experts(ranks_by_group, shape=(4, 3)):
    structures, table = [], {}
    for g, ranks in enumerate(ranks_by_group):
        layout = Layout(mesh_shape=(len(ranks),), placements=(Shard(dim=0),), ranks=ranks)
        structures.append(structure_of([("experts", "float32", shape, layout)], []))
        for r in ranks:
            table[r] = g
    return structures, [table[r] for r in sorted(table)]


def test_an_expert_rank_that_leaves_its_experts_out_fails_naming_the_key_and_region():
    structures, table = _experts([(0, 1), (2, 3)])
    structures.append(structure_of([], []))
    table[3] = 2
    with pytest.raises(
        InvalidStateDictError,
        match=r"key 'experts': rank 3 is in the key's DTensor mesh but lacks it, so its region of 'experts' "
        r"at offsets \[2, 0\] sizes \[2, 3\] would be missing",
    ):
        _world(structures, table)


def test_overlapping_meshes_of_one_key_are_refused():
    structures, _ = _experts([(0, 1), (1, 2)])
    with pytest.raises(
        InvalidStateDictError, match=r"key 'experts': rank 1 holds a DTensor on a mesh|rank 1 is in two"
    ):
        _world(structures, [0, 0, 1])


def test_replicas_on_meshes_of_different_shapes_are_refused():
    a = structure_of(
        [("w", "float32", (4,), Layout(mesh_shape=(2,), placements=(Shard(dim=0),), ranks=(0, 1)))], []
    )
    b = structure_of(
        [("w", "float32", (4,), Layout(mesh_shape=(1,), placements=(Shard(dim=0),), ranks=(2,)))], []
    )
    with pytest.raises(
        InvalidStateDictError, match=r"key 'w': rank 0 has mesh \[2\] .* rank 2 has mesh \[1\]"
    ):
        _world([a, b], [0, 0, 1])


def test_a_key_plain_on_one_stage_and_a_dtensor_on_another_is_refused():
    a = structure_of([("w", "float32", (4,), None)], [])
    b = structure_of(
        [("w", "float32", (4,), Layout(mesh_shape=(2,), placements=(Shard(dim=0),), ranks=(2, 3)))], []
    )
    with pytest.raises(
        InvalidStateDictError, match=r"key 'w': rank 0 has no mesh \(a plain tensor\), rank 2 has mesh"
    ):
        _world([a, b], [0, 0, 1, 1])


def test_a_value_on_one_stage_only_is_sent_to_the_coordinator_by_that_stage_s_first_rank():
    a = structure_of([("w", "float32", (4,), None)], ["step"])
    b = structure_of([], ["optim.param_groups.4.weight.lr", "step"])
    c = structure_of([], ["optim.param_groups.4.weight.lr", "other", "step"])
    world = _world([a, b, c], [0, 0, 1, 1, 2])
    assert value_senders(world) == {2: ("optim.param_groups.4.weight.lr",), 4: ("other",)}


def test_union_tree_holds_every_stage_s_keys_in_order():
    stage0 = {"dict": [["model", {"dict": [["0.w", {"tensor": "model.0.w"}]]}], ["step", {"value": "step"}]]}
    stage1 = {"dict": [["model", {"dict": [["2.w", {"tensor": "model.2.w"}]]}], ["step", {"value": "step"}]]}
    assert union_tree([stage0, stage1]) == {
        "dict": [
            ["model", {"dict": [["0.w", {"tensor": "model.0.w"}], ["2.w", {"tensor": "model.2.w"}]]}],
            ["step", {"value": "step"}],
        ]
    }


def test_replica_mismatches_name_keys_and_ranks_and_suggest_rank_local():
    (message,) = replica_mismatches([(0, {"a": "1", "b": "2"}), (2, {"a": "1", "b": "3"})])
    assert message.startswith("plain tensors differ between ranks: 'b' (rank 0 and rank 2).")
    assert "RankLocal" in message
    assert replica_mismatches([(0, {"a": "1"}), (1, {"a": "1"})]) == []
