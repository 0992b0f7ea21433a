"""`dcp.load` with `ShardsafeStorageReader`: shardsafe checkpoints read by torch.distributed.checkpoint.

Saved by shardsafe on 2 real gloo ranks (FSDP2 DTensors: format version 2 grid keys), loaded by
`dcp.load` on 1 and 3 ranks into FSDP2 DTensors and into plain tensors; the committed golden
checkpoints of every format version load exactly; a flipped bit and a pickled value are refused
with shardsafe's errors inside DCP's `CheckpointException`.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import checkpoint
from checkpoint.config import CheckpointerConfig
from checkpoint.integrations import MissingExtraError, require
from checkpoint.integrations.dcp import ShardsafeStorageReader
from checkpoint.testing.ranks import run_ranks
from planners.errors import CorruptCheckpointError, PickleNotAllowedError
from tests.damage import read_file
from tests.fsdp_workers import assert_same, build, full, snapshot, train

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _save_fsdp(rank: int, world_size: int, path: str) -> dict | None:
    model = build("fsdp", world_size, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optim, 3)
    model_sd, optim_sd = get_state_dict(model, optim)
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"model": model_sd, "optim": optim_sd, "meta": {"step": 3, "name": "run"}}, path)
    ckpt.close()
    expected = {**snapshot(model, optim), "full": full(model_sd)}  # collectives: every rank gathers
    return expected if rank == 0 else None


def _dcp_load_fsdp(rank: int, world_size: int, path: str, expected: dict) -> str:
    model = build("fsdp", world_size, seed=123)  # other initial values: the load must overwrite all
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd, "meta": {"step": 0}}
    dcp.load(state, storage_reader=ShardsafeStorageReader(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert_same(expected["model"], snapshot(model, optim)["model"])
    assert_same(expected["optim"], snapshot(model, optim)["optim"])
    assert state["meta"] == {"step": 3}  # one entry of a saved dict of plain values
    assert state["optim"]["param_groups"][0]["lr"] == 1e-2
    return "ok"


def _dcp_load_plain(rank: int, world_size: int, path: str, expected: dict) -> str:
    target = {"model": {k: torch.zeros_like(v) for k, v in expected["full"].items()}}
    dcp.load(target, storage_reader=ShardsafeStorageReader(path))
    assert_same(expected["full"], target["model"])
    return "ok"


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("dcp_reader") / "step-3")
    expected = run_ranks(_save_fsdp, 2, path)[0]
    return path, expected


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 3])
def test_dcp_load_of_a_2_rank_fsdp2_checkpoint_into_dtensors_on_other_world_sizes(
    fsdp_checkpoint, world_size
):
    path, expected = fsdp_checkpoint
    assert run_ranks(_dcp_load_fsdp, world_size, path, expected) == ["ok"] * world_size


@pytest.mark.multiproc
def test_dcp_load_of_dtensor_grid_keys_into_plain_tensors_on_2_ranks(fsdp_checkpoint):
    path, expected = fsdp_checkpoint
    assert run_ranks(_dcp_load_plain, 2, path, expected) == ["ok"] * 2


@pytest.mark.parametrize("version", [1, 2])
def test_golden_checkpoints_of_every_version_load_exactly_in_one_process(version):
    path = os.path.join(GOLDEN, f"v{version}", "two_rank")
    saved = checkpoint.make_sync_checkpointer().load(path)
    target = {"model": {k: torch.full_like(v, -1) for k, v in saved["model"].items()}, "step": None}
    dcp.load(target, storage_reader=ShardsafeStorageReader(path))
    assert_same(saved["model"], target["model"])
    assert target["step"] == saved["step"]


def _corrupt_last_byte_of_a_shard(path: str) -> str:
    name = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))[0]
    data = bytearray(read_file(path, name))
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len] ^= 0x01  # the first data byte: a tensor's, not the header's
    with open(os.path.join(path, name), "wb") as f:
        f.write(bytes(data))
    return name


def test_a_flipped_bit_fails_dcp_load_with_corrupt_checkpoint_error(tmp_path):
    path = str(tmp_path / "ckpt")
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    ckpt.close()
    name = _corrupt_last_byte_of_a_shard(path)
    target = {"w": torch.zeros(64)}
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=ShardsafeStorageReader(path))
    error = info.value.failures[0][0]
    assert type(error) is CorruptCheckpointError
    assert name in str(error) and "'w'" in str(error)
    assert torch.equal(target["w"], torch.zeros(64))  # nothing of the corrupt file reached the target
    dcp.load(target, storage_reader=ShardsafeStorageReader(path, verify=False))
    assert not torch.equal(target["w"], torch.arange(64, dtype=torch.float32))  # the flip is real


def test_a_pickled_value_is_refused_without_allow_pickle(tmp_path):
    path = str(tmp_path / "ckpt")
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.ones(3), "tags": {"a", "b"}}, path, allow_pickle=True)
    ckpt.close()
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(3), "tags": None}, storage_reader=ShardsafeStorageReader(path))
    error = info.value.failures[0][0]
    assert type(error) is PickleNotAllowedError and "'tags'" in str(error)
    target = {"w": torch.zeros(3), "tags": None}
    dcp.load(target, storage_reader=ShardsafeStorageReader(path, allow_pickle=True))
    assert target["tags"] == {"a", "b"} and torch.equal(target["w"], torch.ones(3))


def test_reset_takes_the_checkpoint_id_dcp_load_is_given(tmp_path):
    path = str(tmp_path / "ckpt")
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.arange(5, dtype=torch.int64)}, path)
    ckpt.close()
    assert ShardsafeStorageReader.validate_checkpoint_id(path)
    assert not ShardsafeStorageReader.validate_checkpoint_id(str(tmp_path / "nothing"))
    target = {"w": torch.zeros(5, dtype=torch.float64)}  # another dtype: converted like DCP's own reader does
    dcp.load(target, checkpoint_id=path, storage_reader=ShardsafeStorageReader(str(tmp_path / "elsewhere")))
    assert torch.equal(target["w"], torch.arange(5, dtype=torch.float64))


def test_a_missing_framework_names_the_extra_that_installs_it():
    with pytest.raises(MissingExtraError) as info:
        require("shardsafe_no_such_framework", extra="lightning")
    assert isinstance(info.value, ImportError)
    assert "pip install 'shardsafe[lightning]'" in str(info.value) and "shardsafe_no_such_framework" in str(
        info.value
    )


@pytest.mark.s3
def test_dcp_load_from_s3_with_storage_options(s3_endpoint, s3_bucket):
    options = s3_endpoint.storage_options
    path = f"{s3_bucket}/run/step-1"
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))
    saved = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "meta": {"epoch": 2}}
    ckpt.save(saved, path)
    ckpt.close()
    target = {"w": torch.zeros(3, 4), "meta": {"epoch": 0}}
    dcp.load(target, storage_reader=ShardsafeStorageReader(path, storage_options=options))
    assert torch.equal(target["w"], saved["w"]) and target["meta"] == {"epoch": 2}


def test_a_path_without_a_checkpoint_fails_dcp_load_naming_it(tmp_path):
    missing = str(tmp_path / "never-saved")
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(2)}, storage_reader=ShardsafeStorageReader(missing))
    assert f"no checkpoint at {missing}" in str(info.value)  # DCP keeps only the message of a metadata error
