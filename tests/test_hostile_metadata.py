"""Tiny hostile metadata files fail fast with `InvalidCheckpointError` (issue 19, cases 8, 9, 10 and 12).

Each file is the golden version-2 checkpoint with one edit, sealed with a valid digest (anyone
can write one). Every tool that reads a checkpoint is tried on it: load, verify, diff, inspect,
export-hf and the manager's resume. They run in a worker process capped at 1.5 GiB of address
space beyond its imports and killed after 10 s (`tests.limited_child`), so the unfixed code
fails these tests instead of exhausting the machine; each must end in the error within a
second (`FAST_SECONDS`) of the worker's time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import checkpoint
from planners.global_plan import Mesh
from planners.grid import GridIndex
from tests import hostile_metadata as hostile
from tests.limited_child import LimitedWorker

FAST_SECONDS = 1.0
OPS = ("load", "verify", "diff", "inspect", "export")
# case -> (document, words the error must name)
CASES = {
    "8-mesh-of-2^28-ranks": (hostile.huge_unused_mesh, ("meshes[1]", "268435456 ranks", "more than 1048576")),
    "9-split-2^20-on-1024": (hostile.huge_split, ("'model.w'", "placement steps")),
    "10-1024x1024-cells-2-files": (
        hostile.many_cells,
        ("'model.g0'", "1048576 chunks", "own a listed shard file"),
    ),
}


@pytest.fixture(scope="module")
def worker() -> Iterator[LimitedWorker]:
    w = LimitedWorker()
    yield w
    w.close()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_grid_metadata_fails_fast(tmp_path, worker, case, op):
    build, words = CASES[case]
    path = hostile.write_checkpoint(str(tmp_path / "ckpt"), build())
    outcome = worker.run(op, path)
    assert outcome.kind == "error", outcome
    assert outcome.classes[0] == "InvalidCheckpointError", outcome
    assert "metadata.json" in outcome.message and all(w in outcome.message for w in words), outcome.message
    assert outcome.seconds < FAST_SECONDS, outcome


@pytest.mark.parametrize("case", sorted(CASES))
def test_manager_resumes_from_the_step_before_a_hostile_one(tmp_path, worker, case):
    root = tmp_path / "run"
    ckpt = checkpoint.make_sync_checkpointer()
    mgr = checkpoint.CheckpointManager(str(root), checkpointer=ckpt)
    mgr.save(10, {"w": torch.arange(4, dtype=torch.float32)})
    mgr.close()
    ckpt.close()
    hostile.write_checkpoint(str(root / "step-000000020"), CASES[case][0]())
    outcome = worker.run("resume", str(root))
    assert (outcome.kind, outcome.result) == ("ok", 10), outcome
    assert outcome.seconds < 5 * FAST_SECONDS, outcome


def test_export_hf_refuses_a_16_tib_claim_before_allocating(tmp_path, worker):
    """Case 12: the grid key's chunks are located in its writer's header before anything is allocated."""
    path = hostile.write_checkpoint(str(tmp_path / "ckpt"), hostile.huge_claim(44))
    outcome = worker.run("export", path)
    assert outcome.kind == "error" and outcome.classes[0] == "InvalidCheckpointError", outcome
    assert "CheckpointError" in outcome.classes
    assert "'model.r'" in outcome.message and "shard-3d70d8610346-r00000-000.safetensors" in outcome.message
    assert "4398046511104" in outcome.message  # the claimed chunk size, refused as the file holds 5
    assert outcome.seconds < FAST_SECONDS, outcome


def test_golden_v2_passes_every_operation(worker):
    """The same worker and operations on the unedited golden checkpoint: nothing to refuse."""
    for op in OPS:
        outcome = worker.run(op, hostile.GOLDEN_V2)
        assert outcome.kind == "ok", (op, outcome)
    assert worker.run("inspect", hostile.GOLDEN_V2).result == {
        "model.b": [2, 24],
        "model.r": [1, 20],
        "model.w": [2, 96],
    }


def _refuse(problem: str) -> None:
    raise ValueError(problem)


def test_a_mesh_given_by_first_rank_and_step_stays_a_range():
    from planners.mesh_parse import parse_meshes

    (mesh,) = parse_meshes(
        [{"shape": [1024, 1024], "first_rank": 3, "rank_step": 2}], world_size=1 << 22, fail=_refuse
    )
    assert mesh == Mesh(shape=(1024, 1024), ranks=range(3, 3 + 2 * (1 << 20), 2))
    index = GridIndex(meshes=(mesh,), grids={}, plain={}, world_size=1 << 22)
    last = 3 + 2 * ((1 << 20) - 1)
    assert [index.position(0, r) for r in (3, 5, 4, last, last + 2)] == [0, 1, None, (1 << 20) - 1, None]


@pytest.mark.parametrize(
    "raw, problem",
    [
        (
            {"shape": [2, 1 << 20], "first_rank": 0, "rank_step": 1},
            "more than 1048576 (the most a mesh may have)",
        ),
        ({"shape": [2, 4], "first_rank": 0, "rank_step": 1}, "has 8 ranks, more than 4 (the world size)"),
        ({"shape": [4], "first_rank": 1, "rank_step": 1}, "must list 4 distinct ranks in [0, 4)"),
        ({"shape": [2], "first_rank": 0, "rank_step": 0}, "must list 2 distinct ranks"),
        ({"shape": [2], "ranks": [1, 1]}, "must list 2 distinct ranks"),
    ],
)
def test_hostile_meshes_are_refused_by_arithmetic(raw, problem):
    from planners.mesh_parse import parse_meshes

    world = (1 << 22) if raw["shape"][-1] == 1 << 20 else 4
    with pytest.raises(ValueError) as e:
        parse_meshes([raw], world_size=world, fail=_refuse)
    assert str(e.value).startswith("meshes[0]") and problem in str(e.value), str(e.value)


def test_strided_step_bound_admits_fsdp_over_tp():
    """FSDP over 2048 ranks of a TP-8 tensor (its steps are below the bound) cuts as before."""
    from planners.grid import MAX_STRIDED_STEPS, _cuts, _placement_steps
    from planners.placement import Shard, StridedShard

    chain = ((StridedShard(dim=0, split_factor=8), 2048), (Shard(dim=0), 8))
    assert _placement_steps(chain) <= MAX_STRIDED_STEPS
    cuts = _cuts(1 << 20, chain)
    assert len(cuts) == 2048 * 8 and cuts[0][:2] == (0, 64) and cuts[-1][:2] == ((1 << 20) - 64, 1 << 20)


def test_verify_reports_a_grid_key_once_at_its_first_problem(tmp_path):
    """A key whose every writer owns a file, none of which holds it: one problem, not one per cell."""
    doc = hostile.golden_doc()
    doc["tensors"]["model.x"] = {
        "dtype": "float32",
        "shape": [2, 4],
        "grid": {"mesh": 0, "placements": [["shard", 0]]},
    }
    path = hostile.write_checkpoint(str(tmp_path / "ckpt"), doc)
    located = [p for p in checkpoint.verify(path).problems if "model.x" in p]
    assert len(located) == 1, located
    assert located[0].startswith("grid key 'model.x' cannot be located") and "rank 0" in located[0]
