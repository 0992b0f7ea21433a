"""Issue 19, case 4: a shard file of another save never loads as this save's.

In format version 2 a grid key's block checksums travel in its shard file, so a same-size file of
another save passes them. A load checks each header it reads against the metadata (save id, rank,
key set), as `verify` does, and refuses a foreign file naming it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

import checkpoint
from checkpoint.testing.ranks import run_ranks
from planners.errors import CorruptCheckpointError
from planners.metadata import METADATA_FILE
from tests.damage import read_file

SHAPE = (8, 6)


def _full(fill: float) -> torch.Tensor:
    return torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE) + fill


def _save_two(rank: int, world_size: int, root: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    with checkpoint.make_sync_checkpointer() as ckpt:
        for name, fill in (("a", 1.0), ("b", 2.0)):
            state = {"w": distribute_tensor(_full(fill), mesh, [Shard(0)]), "step": int(fill)}
            ckpt.save(state, f"{root}/{name}")


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cross")
    run_ranks(_save_two, 2, str(root), timeout_secs=120)
    return root


def _shard(directory: Path, rank: int) -> Path:
    (path,) = directory.glob(f"shard-*-r{rank:05d}-000.safetensors")
    return path


def _copy(saves: Path, tmp_path: Path) -> Path:
    work = tmp_path / "a"
    shutil.copytree(saves / "a", work)
    return work


def test_both_saves_are_grid_checkpoints_that_load(saves: Path) -> None:
    assert '"grid"' in read_file(str(saves / "a"), METADATA_FILE).decode()
    for name, fill in (("a", 1.0), ("b", 2.0)):
        loaded = checkpoint.make_sync_checkpointer().load(str(saves / name))
        assert torch.equal(loaded["w"], _full(fill)) and loaded["step"] == int(fill)


@pytest.mark.parametrize("verify", [True, False])
def test_same_size_shard_of_another_save_is_refused_naming_the_file(
    saves: Path, tmp_path: Path, verify: bool
) -> None:
    work = _copy(saves, tmp_path)
    victim = _shard(work, 1)
    foreign = _shard(saves / "b", 1)
    assert foreign.stat().st_size == victim.stat().st_size
    shutil.copyfile(foreign, victim)
    with pytest.raises(CorruptCheckpointError) as info:
        checkpoint.make_sync_checkpointer().load(str(work), verify=verify)
    message = str(info.value)
    assert f"file {victim.name}: its header says save " in message, message
    assert "rank '1', the metadata says save" in message and "the file belongs to another save" in message
    report = checkpoint.verify(str(work))  # verify agrees, blaming the same file
    assert not report.ok and any(victim.name in p and "another save" in p for p in report.problems)


def test_another_rank_s_file_of_the_same_save_is_refused(saves: Path, tmp_path: Path) -> None:
    work = _copy(saves, tmp_path)
    victim = _shard(work, 1)
    shutil.copyfile(_shard(work, 0), victim)
    with pytest.raises(
        CorruptCheckpointError, match=rf"file {victim.name}: its header says save '[0-9a-f]+' rank '0'"
    ):
        checkpoint.make_sync_checkpointer().load(str(work))


def test_a_header_key_the_metadata_does_not_know_is_refused(saves: Path, tmp_path: Path) -> None:
    work = _copy(saves, tmp_path)
    victim = _shard(work, 1)
    raw = victim.read_bytes()
    assert raw.count(b'"w"') == 1
    victim.write_bytes(raw.replace(b'"w"', b'"x"'))  # same size: the header still parses
    with pytest.raises(
        CorruptCheckpointError, match=rf"file {victim.name}: holds tensor 'x' that the metadata does not know"
    ):
        checkpoint.make_sync_checkpointer().load(str(work))
