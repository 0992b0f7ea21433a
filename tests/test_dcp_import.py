"""`checkpoint.import_dcp`: a DCP checkpoint of an FSDP2 model on 2 ranks, converted, loaded on 3 ranks."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import checkpoint
from checkpoint.testing.ranks import run_ranks
from checkpoint.tools.dcp_import import import_dcp
from planners.errors import CheckpointExistsError, PickleNotAllowedError
from tests.fsdp_workers import assert_same, build, snapshot, train


def _save_with_dcp(rank: int, world_size: int, path: str) -> dict | None:
    model = build("fsdp", world_size, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optim, 3)
    model_sd, optim_sd = get_state_dict(model, optim)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    snap = snapshot(model, optim)
    return snap if rank == 0 else None


def _load_with_shardsafe(rank: int, world_size: int, path: str, expected: dict) -> str:
    model = build("fsdp", world_size, seed=123)  # other initial values: the load must overwrite all
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model_sd, optim_sd = get_state_dict(model, optim)
    ckpt = checkpoint.make_sync_checkpointer()
    loaded = ckpt.load(path, state_dict={"model": model_sd, "optim": optim_sd}, strict=True)
    ckpt.close()
    set_state_dict(model, optim, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert_same(expected, snapshot(model, optim))
    assert loaded["optim"]["param_groups"][0]["lr"] == 1e-2  # a DCP bytes entry, now a typed-JSON value
    return "ok"


@pytest.mark.multiproc
@pytest.mark.slow
def test_dcp_fsdp2_checkpoint_from_2_ranks_converts_and_loads_on_3(tmp_path):
    dcp_dir, out = str(tmp_path / "dcp"), str(tmp_path / "converted")
    expected = run_ranks(_save_with_dcp, 2, dcp_dir)[0]
    assert any(n.endswith(".distcp") for n in os.listdir(dcp_dir))
    result = import_dcp(dcp_dir, out, trust_pickle=True, max_file_bytes=1000)
    assert result.tensors == 4 + 4 * 3  # parameters, then exp_avg, exp_avg_sq and step of each
    assert len(result.files) > 1  # several shard files: the size limit was applied
    assert checkpoint.verify(out).ok
    assert run_ranks(_load_with_shardsafe, 3, out, expected) == ["ok"] * 3
    whole = checkpoint.make_sync_checkpointer().load(out)  # no target: the nesting DCP saved
    assert torch.equal(whole["model"]["up.weight"], expected["model"]["up.weight"])
    assert whole["optim"]["param_groups"][0]["lr"] == 1e-2


def test_refuses_without_trust_and_names_the_reason(tmp_path):
    dcp.save({"w": torch.arange(6.0)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    with pytest.raises(PickleNotAllowedError, match="pickle.*arbitrary code.*trust_pickle=True"):
        import_dcp(str(tmp_path / "dcp"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint"):
        import_dcp(str(tmp_path / "nothing"), str(tmp_path / "out"), trust_pickle=True)


def test_plain_and_pickled_values_and_an_existing_output(tmp_path):
    state = {
        "w": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "step": 7,
        "extra": {"note": ("a", 1.5), "grid": [[1, 2], [3]]},  # DCP keeps one entry per leaf
        "groups": [{"lr": 0.1, "params": ["w"]}, {"lr": 0.2, "params": []}],
        "uuid": uuid.UUID(int=5),  # not plain JSON: kept pickled
    }
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out = str(tmp_path / "out")
    result = import_dcp(str(tmp_path / "dcp"), out, trust_pickle=True)
    assert (result.tensors, result.values) == (
        1,
        4,
    )  # w; step, extra, groups and uuid as shardsafe groups them
    ckpt = checkpoint.make_sync_checkpointer()
    target = {"w": torch.zeros(2, 3, dtype=torch.int32), "step": 0, "extra": {}, "groups": []}
    loaded = ckpt.load(out, state_dict=target, strict=True)
    assert torch.equal(loaded["w"], state["w"])
    assert (loaded["step"], loaded["extra"], loaded["groups"]) == (7, state["extra"], state["groups"])
    with pytest.raises(PickleNotAllowedError, match="'uuid'"):
        ckpt.load(out)
    whole = ckpt.load(out, allow_pickle=True)  # no target: the nesting DCP saved
    assert whole["uuid"] == state["uuid"] and whole["extra"] == state["extra"]
    with pytest.raises(CheckpointExistsError, match="already holds"):
        import_dcp(str(tmp_path / "dcp"), out, trust_pickle=True)


def test_cli_import_dcp_needs_trust_pickle(tmp_path):
    from click.testing import CliRunner

    from checkpoint.tools.cli import main

    dcp.save({"w": torch.arange(4.0), "n": 5}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    args = ["import-dcp", str(tmp_path / "dcp"), str(tmp_path / "out")]
    refused = CliRunner().invoke(main, args)
    assert (
        refused.exit_code == 2 and "--trust-pickle" in refused.output and "arbitrary code" in refused.output
    )
    assert not os.path.exists(tmp_path / "out")
    done = CliRunner().invoke(main, [*args, "--trust-pickle", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["tensors"] == 1
    loaded = checkpoint.make_sync_checkpointer().load(str(tmp_path / "out"))
    assert torch.equal(loaded["w"], torch.arange(4.0)) and loaded["n"] == 5


@pytest.mark.s3
def test_dcp_directory_on_s3_converts_to_s3(tmp_path, s3_endpoint, s3_bucket, s3_fs):
    state = {"w": torch.randn(64, 8), "groups": [{"lr": 0.5}]}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    s3_fs.put(str(tmp_path / "dcp") + "/", f"{s3_bucket}/dcp/", recursive=True)
    options = s3_endpoint.storage_options
    result = import_dcp(f"{s3_bucket}/dcp", f"{s3_bucket}/out", trust_pickle=True, storage_options=options)
    assert (result.tensors, result.values) == (1, 1)
    ckpt = checkpoint.make_sync_checkpointer(checkpoint.CheckpointerConfig(storage_options=options))
    loaded = ckpt.load(f"{s3_bucket}/out")
    assert torch.equal(loaded["w"], state["w"]) and loaded["groups"] == state["groups"]
