"""`shardsafe diff` and `inspect` read DTensor (grid) keys as a load resolves them (issue 19, cases 5 and 14).

Format version 2 records a DTensor by its mesh and placements, not by chunks, so a tool that
only reads chunk records sees nothing of it: diff compared uninitialised buffers and inspect
showed 0 chunks. Covered here: the golden v1 and v2 checkpoints against copies of themselves,
checkpoints of 4 real gloo ranks holding DTensors on a 1-D and a 2-D mesh plus a plain tensor,
and the memory bound of diff for rows wider than a block (measured in a child process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import checkpoint
from checkpoint.testing.ranks import run_ranks
from checkpoint.tools.cli import main
from checkpoint.tools.diff import diff_checkpoints
from tests.damage import private_copy
from tests.golden.make_golden import GOLDEN_DIR

REPO = Path(__file__).resolve().parent.parent
SHAPE = (8, 6)


def _full(value: float) -> torch.Tensor:
    return torch.arange(48, dtype=torch.float32).reshape(SHAPE) + value


def _save_meshes(rank: int, world_size: int, root: str) -> None:
    """Three checkpoints: DTensor values 1, 1 again, then 2; the plain tensor is the same in all."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    line = init_device_mesh("cpu", (world_size,))
    square = init_device_mesh("cpu", (2, world_size // 2))
    ckpt = checkpoint.make_sync_checkpointer()
    for name, value in (("a", 1.0), ("a_again", 1.0), ("b", 2.0)):
        state = {
            "line": distribute_tensor(_full(value), line, [Shard(0)]),
            "square": distribute_tensor(_full(value), square, [Shard(0), Shard(1)]),
            "plain": torch.arange(5, dtype=torch.int64),
            "step": 3,
        }
        ckpt.save(state, f"{root}/{name}")
    ckpt.close()


@pytest.fixture(scope="module")
def meshes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("meshes")
    run_ranks(_save_meshes, 4, str(root))
    return root


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


@pytest.mark.multiproc
def test_dtensors_on_1d_and_2d_meshes_are_recorded_as_grids(meshes):
    doc = json.loads((meshes / "a" / "metadata.json").read_bytes())
    assert doc["version"] == 2
    assert doc["tensors"]["line"]["grid"]["placements"] == [["shard", 0]]
    assert doc["tensors"]["square"]["grid"]["placements"] == [["shard", 0], ["shard", 1]]
    assert "grid" not in doc["tensors"]["plain"]


@pytest.mark.multiproc
@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_diff_of_equal_dtensor_checkpoints_is_identical(meshes, block_bytes):
    report = diff_checkpoints(str(meshes / "a"), str(meshes / "a_again"), block_bytes=block_bytes)
    assert [(t.key, t.equal, t.max_abs_diff) for t in report.tensors] == [
        ("line", True, 0.0),
        ("plain", True, 0.0),
        ("square", True, 0.0),
    ]
    assert report.identical


@pytest.mark.multiproc
@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_diff_sees_dtensor_values_1_vs_2(meshes, block_bytes):
    report = diff_checkpoints(str(meshes / "a"), str(meshes / "b"), block_bytes=block_bytes)
    assert [(t.key, t.equal, t.max_abs_diff) for t in report.tensors] == [
        ("line", False, 1.0),
        ("plain", True, 0.0),
        ("square", False, 1.0),
    ]
    assert not report.identical


@pytest.mark.multiproc
def test_diff_command_exit_status_on_dtensors(meshes):
    assert _run("diff", str(meshes / "a"), str(meshes / "a_again"))[0] == 0
    code, out = _run("diff", str(meshes / "a"), str(meshes / "b"), "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["identical"] is False
    assert {t["key"]: t["equal"] for t in doc["tensors"]} == {"line": False, "plain": True, "square": False}


@pytest.mark.multiproc
def test_inspect_shows_the_chunks_and_bytes_of_dtensors(meshes):
    code, out = _run("inspect", str(meshes / "a"), "--json")
    assert code == 0
    tensors = {t["key"]: (t["chunks"], t["nbytes"]) for t in json.loads(out)["tensors"]}
    # 1-D mesh of 4: 4 row blocks; 2-D mesh of 2 x 2: 4 tiles; 8 x 6 float32 is 192 bytes either way.
    assert tensors == {"line": (4, 192), "square": (4, 192), "plain": (1, 40)}


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", ["single", "two_rank"])
def test_golden_checkpoint_diffs_identical_with_its_copy(tmp_path, version, name):
    golden = os.path.join(GOLDEN_DIR, version, name)
    copy = private_copy(golden, str(tmp_path / "copy"))
    for block_bytes in (64, 1 << 20):
        report = diff_checkpoints(golden, copy, block_bytes=block_bytes)
        assert report.tensors and all(t.equal and t.max_abs_diff == 0.0 for t in report.tensors), report
        assert report.identical
    assert _run("diff", golden, copy)[0] == 0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_inspect_of_the_golden_two_rank_checkpoint(version):
    code, out = _run("inspect", os.path.join(GOLDEN_DIR, version, "two_rank"), "--json")
    assert code == 0
    tensors = {t["key"]: (t["chunks"], t["nbytes"]) for t in json.loads(out)["tensors"]}
    # w [6, 4] float32 row-sharded, b [3, 4] bfloat16 column-sharded over 2 ranks; r [5] int32 replicated.
    assert tensors == {"model.w": (2, 96), "model.b": (2, 24), "model.r": (1, 20)}


_WIDE_ROWS = textwrap.dedent(
    """
    import json, sys
    import psutil
    from checkpoint.tools.diff import diff_checkpoints
    from checkpoint.load.loader import read_metadata  # imported before the baseline, as diff imports it

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    a, b = sys.argv[1], sys.argv[2]
    diff_checkpoints(a, a, block_bytes=1 << 16)  # warm up: imports, allocator pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    before = psutil.Process().memory_info().rss
    report = diff_checkpoints(a, b, block_bytes=1 << 20)
    print(json.dumps({
        "growth": peak() - before,
        "tensors": [[t.key, t.equal, t.max_abs_diff] for t in report.tensors],
    }))
    """
)


def test_diff_of_wide_rows_stays_within_a_few_blocks(tmp_path):
    """[1, N] float32 tensors of 16 MiB, 1 MiB blocks: the peak resident size of the comparing process
    grows by less than 24 MiB: a few blocks per side in flight, as float32 and float64, plus the read
    threads' buffers and their allocator arenas (5-8 MiB measured in the development venv, 11-14 MiB
    in a fresh CI venv of the same packages, 16.3 MiB once in a CI run). A row per block would need
    16 MiB per side, 32 MiB more in float64, so at least 32 MiB more than that; the old code grew by
    148 MiB."""
    n = 4 << 20
    full = torch.arange(n, dtype=torch.float32).reshape(1, n)
    other = full.clone()
    other[0, n - 1] += 3.0
    for name, w in (("a", full), ("b", other)):
        ckpt = checkpoint.make_sync_checkpointer()
        ckpt.save({"w": w}, str(tmp_path / name))
        ckpt.close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _WIDE_ROWS, str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    ).stdout
    result = json.loads(out)
    assert result["tensors"] == [["w", False, 3.0]]
    assert result["growth"] < 24 * 1024 * 1024, result["growth"]
