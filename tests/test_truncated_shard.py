"""A shard file cut short says "truncated", on every path that reads a grid checkpoint (format version 2).

A grid key's chunks are located through its writer's safetensors header, so a
file cut short used to fail while that header was parsed ("data_offsets ...
lie outside the data area"), which names the file but hides the cause. Each
file's size is now compared with the size the metadata records before its
header is parsed: load, `verify`, `diff_checkpoints` and `export_hf` all name
the file, both sizes and the cause. The damaged checkpoint is the version-2
golden one, saved by two ranks holding DTensor shards.
"""

from __future__ import annotations

import os

import pytest

import checkpoint
from checkpoint.tools.diff import diff_checkpoints
from planners.errors import InvalidCheckpointError
from tests.damage import private_copy
from tests.golden.make_golden import GOLDEN_DIR

GOLDEN = os.path.join(GOLDEN_DIR, "v2", "two_rank")
CUT_BYTES = 100


def _largest_shard(path: str) -> tuple[str, int]:
    shards = [n for n in os.listdir(path) if n.startswith("shard-")]
    name = max(shards, key=lambda n: os.path.getsize(os.path.join(path, n)))
    return name, os.path.getsize(os.path.join(path, name))


@pytest.fixture
def truncated(tmp_path) -> tuple[str, str, int]:
    """A copy of the golden checkpoint whose largest shard lost its last CUT_BYTES bytes."""
    path = private_copy(GOLDEN, str(tmp_path / "ckpt"))
    name, size = _largest_shard(path)
    os.truncate(os.path.join(path, name), size - CUT_BYTES)
    return path, name, size


def _truncated_message(path: str, name: str, size: int) -> str:
    return f"{path}: file {name} has {size - CUT_BYTES} bytes, the metadata records {size}; the file is truncated"


def test_load_of_a_truncated_grid_shard_says_truncated_with_both_sizes(truncated):
    path, name, size = truncated
    with pytest.raises(InvalidCheckpointError) as e:
        checkpoint.make_sync_checkpointer().load(path)
    assert str(e.value) == _truncated_message(path, name, size)


def test_verify_of_a_truncated_grid_shard_reports_the_sizes_not_its_header(truncated):
    path, name, size = truncated
    problems = checkpoint.verify(path).problems
    assert problems[:2] == (
        f"grid key 'model.b' cannot be located: {_truncated_message(path, name, size)}",
        f"file {name}: {size - CUT_BYTES} bytes on storage, the metadata records {size}; "
        "it was truncated or replaced",
    )
    assert not any("data_offsets" in p for p in problems), problems


def test_diff_and_export_of_a_truncated_grid_shard_say_truncated(truncated, tmp_path):
    path, name, size = truncated
    with pytest.raises(InvalidCheckpointError) as e:
        diff_checkpoints(GOLDEN, path)
    assert str(e.value) == _truncated_message(path, name, size)
    with pytest.raises(InvalidCheckpointError) as e:
        checkpoint.export_hf(path, str(tmp_path / "hf"))
    assert str(e.value) == _truncated_message(path, name, size)


def test_a_grid_shard_longer_than_recorded_is_refused_naming_both_sizes(tmp_path):
    path = private_copy(GOLDEN, str(tmp_path / "ckpt"))
    name, size = _largest_shard(path)
    with open(os.path.join(path, name), "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(InvalidCheckpointError) as e:
        checkpoint.make_sync_checkpointer().load(path)
    assert str(e.value) == (
        f"{path}: file {name} has {size + 8} bytes, the metadata records {size}; "
        "the file was replaced or appended to"
    )


def test_diff_locates_grid_chunks_and_compares_real_values():
    """Grid keys record no chunks in the metadata: diff reads them from the shard headers."""
    report = diff_checkpoints(GOLDEN, GOLDEN)
    assert [(t.key, t.equal, t.max_abs_diff) for t in report.tensors] == [
        ("model.b", True, 0.0),
        ("model.r", True, 0.0),
        ("model.w", True, 0.0),
    ]
