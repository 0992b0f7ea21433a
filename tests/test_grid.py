"""Format version 2 grid records: chunk lookup and writers match the save plan; metadata round trip; corruption."""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoint
from checkpoint.testing.ranks import run_ranks
from planners.boxes import Box
from planners.digest import seal
from planners.errors import CorruptCheckpointError, InvalidCheckpointError
from planners.global_plan import WorldStructure, structure_of
from planners.grid import CHECKSUM_ENTRY, GridIndex, grid_fields
from planners.metadata import METADATA_FILE
from planners.metadata_parse import parse_metadata
from planners.placement import Layout, Replicate, Shard, StridedShard
from planners.world_layout import writes_of
from tests.dist_states import build_state, check_state


@st.composite
def worlds(draw):
    mesh_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    n = math.prod(mesh_shape)
    ranks = tuple(draw(st.permutations(range(n))))
    entries = []
    for i in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        placements = tuple(
            draw(st.sampled_from([Replicate(), Shard(dim=draw(st.integers(0, len(shape) - 1)))]))
            for _ in mesh_shape
        )
        entries.append(
            (f"t{i}", "float32", shape, Layout(mesh_shape=mesh_shape, placements=placements, ranks=ranks))
        )
    entries += [(f"p{i}", "int64", (i + 2,), None) for i in range(draw(st.integers(0, 2)))]
    return WorldStructure(structures=(structure_of(entries, []),), rank_structure=(0,) * n), entries


def _index(world, entries):
    fields = grid_fields(world)
    plain = {fqn: (dtype, shape) for fqn, dtype, shape, layout in entries if layout is None}
    return GridIndex(meshes=fields["meshes"], grids=fields["grids"], plain=plain, world_size=world.world_size)


@settings(max_examples=80, deadline=None)
@given(worlds(), st.data())
def test_cells_and_writers_match_what_each_rank_wrote(case, data):
    world, entries = case
    index = _index(world, entries)
    written = {}
    for r in range(world.world_size):
        for w in writes_of(world, r):
            if w.grid:
                written.setdefault(w.fqn, {})[w.box] = r
    for fqn, _, shape, layout in entries:
        if layout is None:
            continue
        full = {c.box: c.writer for c in index.cells(fqn, Box(offsets=(0,) * len(shape), sizes=shape))}
        assert full == written[fqn]
        lo = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
        sizes = tuple(data.draw(st.integers(1, n - o)) for o, n in zip(lo, shape))
        query = Box(offsets=lo, sizes=sizes)
        expected = {b: r for b, r in written[fqn].items() if b.intersect(query) is not None}
        assert {c.box: c.writer for c in index.cells(fqn, query)} == expected


def test_strided_fsdp_tp_cells():
    layout = Layout(
        mesh_shape=(2, 4),
        placements=(StridedShard(dim=0, split_factor=4), Shard(dim=0)),
        ranks=tuple(range(8)),
    )
    world = WorldStructure(
        structures=(structure_of([("w", "bfloat16", (64, 8), layout)], []),), rank_structure=(0,) * 8
    )
    index = _index(world, [("w", "bfloat16", (64, 8), layout)])
    cells = index.cells("w", Box(offsets=(36, 0), sizes=(8, 8)))
    assert [(c.box.offsets, c.box.sizes, c.writer) for c in cells] == [
        ((32, 0), (8, 8), 2),
        ((40, 0), (8, 8), 6),
    ]


def _metadata_doc(grid: dict) -> bytes:
    """Version-2 metadata with one grid key, sealed with its digest as a writer would."""
    return seal(
        {
            "format": "shardsafe",
            "version": 2,
            "save_id": "0123456789ab",
            "world_size": 4,
            "checksum_block_bytes": 524288,
            "files": {
                f"shard-0123456789ab-r{r:05d}-000.safetensors": {"nbytes": 64, "rank": r} for r in range(4)
            },
            "meshes": [{"shape": [4], "first_rank": 0, "rank_step": 1}],
            "tensors": {"w": {"dtype": "float32", "shape": [8, 2], "grid": grid}},
            "values": {},
            "rank_local": {},
            "structure": {"dict": [["w", {"tensor": "w"}]]},
        }
    )


def test_grid_metadata_round_trips():
    md = parse_metadata(_metadata_doc({"mesh": 0, "placements": [["shard", 0]]}), where="x")
    assert md.grids["w"].placements == (Shard(dim=0),) and tuple(md.meshes[0].ranks) == (0, 1, 2, 3)
    again = parse_metadata(md.to_json(), where="x")
    assert again.grids == md.grids and again.meshes == md.meshes


@pytest.mark.parametrize(
    "grid, problem",
    [
        ({"mesh": 3, "placements": [["shard", 0]]}, "grid.mesh must index meshes"),
        ({"mesh": 0, "placements": [["shard", 5]]}, "malformed placement"),
        ({"mesh": 0, "placements": [["shard", 0], ["replicate"]]}, "one entry per mesh dim"),
        ({"mesh": 0, "placements": [["strided_shard", 0, 3]]}, "does not cut the tensor into boxes"),
    ],
)
def test_hostile_grid_records_are_refused(grid, problem):
    with pytest.raises(InvalidCheckpointError, match=problem):
        parse_metadata(_metadata_doc(grid), where="x")


def test_version_1_metadata_cannot_hold_grids():
    doc = json.loads(_metadata_doc({"mesh": 0, "placements": [["shard", 0]]}))
    doc["version"] = 1
    del doc["digest"]  # version 1 has no digest
    with pytest.raises(InvalidCheckpointError, match="grid.mesh must index meshes"):
        parse_metadata(json.dumps(doc).encode(), where="x")


def _save_row(rank: int, world_size: int, root: str) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(build_state("row", world_size), f"{root}/ckpt")
    ckpt.close()


def _load_row(rank: int, world_size: int, root: str, check: bool) -> str:
    ckpt = checkpoint.make_sync_checkpointer()
    try:
        loaded = ckpt.load(f"{root}/ckpt", state_dict=build_state("row", world_size, zeros=True))
        if check:  # collective: only when every rank loads
            check_state(loaded)
        return "ok"
    except CorruptCheckpointError as e:
        return f"corrupt: {e}"
    finally:
        ckpt.close()


@pytest.mark.multiproc
def test_v2_checkpoint_loads_and_a_flipped_byte_is_caught(tmp_path):
    run_ranks(_save_row, 2, str(tmp_path))
    doc = json.loads((tmp_path / "ckpt" / METADATA_FILE).read_bytes())
    assert doc["version"] == 2 and doc["tensors"]["model.w"]["grid"] == {
        "mesh": 0,
        "placements": [["shard", 0]],
    }
    assert "chunks" not in doc["tensors"]["model.w"]
    assert run_ranks(_load_row, 2, str(tmp_path), True) == ["ok", "ok"]
    name = sorted(n for n in os.listdir(tmp_path / "ckpt") if n.endswith("r00001-000.safetensors"))[0]
    path = tmp_path / "ckpt" / name
    raw = bytearray(path.read_bytes())
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header[CHECKSUM_ENTRY]["dtype"] == "U32"
    start = 8 + int.from_bytes(raw[:8], "little") + header["model.w"]["data_offsets"][0]
    raw[start] ^= 0xFF
    path.write_bytes(bytes(raw))
    results = run_ranks(_load_row, 2, str(tmp_path), False)
    assert results[1].startswith("corrupt:") and name in results[1]
    report = checkpoint.verify(str(tmp_path / "ckpt"))
    assert any(name in p and "model.w" in p for p in report.problems)
