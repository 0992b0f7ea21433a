"""The save's pure steps, in one process: a local plan from chunk descriptors, metadata from write results.

`planners.save_plan.plan_local` and `planners.metadata_build.build_metadata`
take plain data, so each rank's and the coordinator's part of a save is
checked here without a process group or a file; the last test checks that
`checkpoint.save.local_plan` hands the planner the right descriptors for live
tensors.
"""

from __future__ import annotations

import pickle

import torch

from checkpoint.save.local_plan import describe_local
from checkpoint.state.flatten import RankLocal, flatten_state_dict
from planners.boxes import Box, full_box
from planners.metadata import (
    CHECKSUM_BLOCK_BYTES,
    PLAIN_FORMAT_VERSION,
    ChunkRecord,
    FileRecord,
    RankLocalRecord,
)
from planners.metadata_build import MetadataDraft, RankWriteResult, WrittenChunk, build_metadata
from planners.metadata_parse import parse_metadata
from planners.placement import Layout, Shard
from planners.save_plan import GlobalPlan, LocalChunk, WriteItem, plan_local

SAVE_ID = "0123456789ab"


def _file(rank: int) -> str:
    return f"shard-{SAVE_ID}-r{rank:05d}-000.safetensors"


def test_plan_local_skips_empty_shards_but_keeps_their_keys_and_layouts():
    layout = Layout(mesh_shape=(2,), placements=(Shard(dim=0),), ranks=(0, 1))
    chunks = [
        LocalChunk(fqn="w", dtype="float32", global_shape=(4,), box=Box(offsets=(2,), sizes=(2,)), nbytes=8),
        # A shard this rank holds no element of: nothing to write, but the key is still this rank's.
        LocalChunk(
            fqn="d",
            dtype="bfloat16",
            global_shape=(1,),
            box=Box(offsets=(1,), sizes=(1,)),
            nbytes=0,
            layout=layout,
        ),
        # A tensor with no elements at all is still recorded, so a load gets it back.
        LocalChunk(fqn="e", dtype="int64", global_shape=(0, 3), box=full_box((0, 3)), nbytes=0),
        LocalChunk(
            fqn="rng", dtype="uint8", global_shape=(0,), box=full_box((0,)), nbytes=0, rank_local=True
        ),
    ]
    plan = plan_local(1, chunks, other_keys=["step", "a.b"])

    assert plan.rank == 1
    assert plan.keys == ("a.b", "d", "e", "rng", "step", "w")
    assert plan.items == (
        WriteItem(fqn="w", dtype="float32", global_shape=(4,), box=Box(offsets=(2,), sizes=(2,)), nbytes=8),
        WriteItem(fqn="e", dtype="int64", global_shape=(0, 3), box=full_box((0, 3)), nbytes=0),
        WriteItem(fqn="rng", dtype="uint8", global_shape=(0,), box=full_box((0,)), nbytes=0, rank_local=True),
    )


def test_plan_local_fingerprint_follows_the_descriptors():
    one = [LocalChunk(fqn="w", dtype="float32", global_shape=(4,), box=full_box((4,)), nbytes=16)]
    other = [LocalChunk(fqn="w", dtype="float16", global_shape=(4,), box=full_box((4,)), nbytes=8)]
    assert plan_local(0, one, other_keys=[]).fingerprint() == plan_local(0, one, other_keys=[]).fingerprint()
    assert (
        plan_local(0, one, other_keys=[]).fingerprint() != plan_local(0, other, other_keys=[]).fingerprint()
    )


def _chunk(rank: int, fqn: str, rows: tuple[int, int], *, offset_bytes: int) -> WrittenChunk:
    nbytes = (rows[1] - rows[0]) * 2 * 4
    record = ChunkRecord(
        box=Box(offsets=(rows[0], 0), sizes=(rows[1] - rows[0], 2)),
        file=_file(rank),
        key=fqn,
        offset_bytes=offset_bytes,
        nbytes=nbytes,
        checksums=(rank + 1,),
    )
    return WrittenChunk(fqn=fqn, dtype="float32", rank_local=False, chunk=record)


def _two_rank_results() -> tuple[MetadataDraft, list[RankWriteResult]]:
    plan = GlobalPlan(
        world_size=2, rank_plans=(), tensors={"w": ("float32", (4, 2)), "empty": ("float32", (0,))}
    )
    # The nesting as checkpoint.state.flatten records it (metadata_parse checks it against the keys).
    structure = {
        "dict": [
            ["w", {"tensor": "w"}],
            ["empty", {"tensor": "empty"}],
            ["step", {"value": "step"}],
            ["rng", {"rank_local": "rng"}],
        ]
    }
    draft = MetadataDraft(global_plan=plan, values={"step": 7}, structure=structure)
    rng = WrittenChunk(
        fqn="rng",
        dtype="uint8",
        rank_local=True,
        chunk=ChunkRecord(
            box=full_box((3,)), file=_file(0), key="rng", offset_bytes=96, nbytes=3, checksums=(9,)
        ),
    )
    empty = ChunkRecord(
        box=full_box((0,)), file=_file(1), key="empty", offset_bytes=96, nbytes=0, checksums=()
    )
    results = [
        RankWriteResult(rank=0, files={_file(0): 99}, chunks=(_chunk(0, "w", (0, 2), offset_bytes=80), rng)),
        RankWriteResult(
            rank=1,
            files={_file(1): 96},
            chunks=(
                _chunk(1, "w", (2, 4), offset_bytes=80),
                WrittenChunk(fqn="empty", dtype="float32", rank_local=False, chunk=empty),
            ),
            rank_local_values={"rng": [1, 2]},
        ),
    ]
    return draft, results


def test_build_metadata_records_every_written_chunk_file_and_rank_local_entry():
    draft, results = _two_rank_results()
    # The coordinator may gather results in any order of chunks; the metadata sorts them by box.
    metadata = build_metadata(draft, results[::-1], save_id=SAVE_ID, world_size=2)

    assert (metadata.version, metadata.save_id, metadata.world_size) == (PLAIN_FORMAT_VERSION, SAVE_ID, 2)
    assert metadata.checksum_block_bytes == CHECKSUM_BLOCK_BYTES
    assert metadata.files == {
        _file(0): FileRecord(nbytes=99, rank=0),
        _file(1): FileRecord(nbytes=96, rank=1),
    }
    w = metadata.tensors["w"]
    assert (w.dtype, w.shape) == ("float32", (4, 2))
    assert w.chunks == (results[0].chunks[0].chunk, results[1].chunks[0].chunk)
    assert metadata.tensors["empty"].chunks == (results[1].chunks[1].chunk,)
    assert metadata.rank_local == {
        "rng": RankLocalRecord(tensors=(("uint8", results[0].chunks[1].chunk), None), values=(None, [1, 2]))
    }
    assert (metadata.values, metadata.structure) == (draft.values, draft.structure)
    assert (metadata.meshes, metadata.grids) == ((), {})


def test_built_metadata_is_valid_on_disk_and_reads_back_equal():
    draft, results = _two_rank_results()
    metadata = build_metadata(draft, results, save_id=SAVE_ID, world_size=2)
    assert parse_metadata(metadata.to_json(), where="test") == metadata


def test_write_results_survive_the_trip_to_the_coordinator():
    # Async writer processes send their results through the commit store, pickled.
    _, results = _two_rank_results()
    assert pickle.loads(pickle.dumps(results)) == results


def test_describe_local_hands_the_planner_the_live_tensors_descriptors():
    state = {
        "model": {"w": torch.ones(3, 2, dtype=torch.bfloat16), "n": torch.zeros(0, dtype=torch.int32)},
        "step": 5,
        "rng": RankLocal(torch.arange(4, dtype=torch.uint8)),
        "seed": RankLocal(11),
    }
    local = describe_local(flatten_state_dict(state), 3, allow_pickle=False)

    assert local.plan.keys == ("model.n", "model.w", "rng", "seed", "step")
    assert local.plan.items == (
        WriteItem(fqn="model.w", dtype="bfloat16", global_shape=(3, 2), box=full_box((3, 2)), nbytes=12),
        WriteItem(fqn="model.n", dtype="int32", global_shape=(0,), box=full_box((0,)), nbytes=0),
        WriteItem(fqn="rng", dtype="uint8", global_shape=(4,), box=full_box((4,)), nbytes=4, rank_local=True),
    )
    assert local.layouts == {"model.w": None, "model.n": None}
    assert set(local.tensors) == {"model.w", "model.n", "rng"}
    assert local.tensors["rng"] is state["rng"].value
    assert set(local.rank_local_values) == {"seed"} and set(local.values) == {"step"}
