"""Every layout real 3-D jobs produce, saved on 4 ranks and resharded, with DCP as the oracle.

Sources (tests/layout_workers.py): FSDP2 over the dp dim of a 2x2 dp x tp mesh (each tp rank's
sub-mesh a replica), pipeline stages x FSDP with a plain tensor on stage 0 only, the same with TP
on one stage, HSDP, and MoE experts on an expert-parallel sub-mesh beside dense layers on the dp
mesh. Each is saved by shardsafe and by DCP, then loaded by each into plain FSDP2 on 3 ranks, into
two of the source layouts on 4 ranks, and in one process without a target; every result must
equal the reference exactly, and DCP's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import checkpoint
from checkpoint.integrations.dcp import ShardsafeStorageReader
from checkpoint.testing.ranks import run_ranks
from checkpoint.tools.hf_export import export_hf
from tests import layout_workers as lw


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def _expected(layout: str) -> dict[str, torch.Tensor]:
    """The reference keys a layout holds (the pipeline layouts keep the experts on stage 1)."""
    return _flat(lw.reference_state())


def _assert_equal(got: dict, want: dict[str, torch.Tensor], where: str) -> None:
    flat = _flat(got)
    assert sorted(flat) == sorted(want), (where, sorted(flat), sorted(want))
    for k, v in want.items():
        assert flat[k].dtype == v.dtype and torch.equal(flat[k], v), (where, k)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    seen = run_ranks(lw.save_sources, 4, root, timeout_secs=600)[0]
    return root, seen


def test_every_source_layout_holds_the_reference(saved):
    _, seen = saved
    for layout in lw.SOURCES:
        _assert_equal(seen[layout], _expected(layout), layout)


@pytest.mark.parametrize("world_size", [3, 1])
def test_each_layout_reshards_into_fsdp_on_three_ranks_and_one_as_dcp_does(saved, world_size):
    root, _ = saved
    got = run_ranks(lw.load_into, world_size, root, "fsdp", lw.SOURCES, timeout_secs=600)[0]
    for layout in lw.SOURCES:
        _assert_equal(got[(layout, "dcp")], _expected(layout), f"dcp {layout} on {world_size}")
        _assert_equal(got[(layout, "shardsafe")], _expected(layout), f"shardsafe {layout} on {world_size}")


def test_each_layout_reshards_into_the_pipeline_and_submesh_layouts(saved):
    root, _ = saved
    for target in ("pp_fsdp", "submesh"):
        got = run_ranks(lw.load_into, 4, root, target, lw.SOURCES, timeout_secs=600)[0]
        for layout in lw.SOURCES:
            _assert_equal(got[(layout, "dcp")], _expected(layout), f"dcp {layout} -> {target}")
            _assert_equal(got[(layout, "shardsafe")], _expected(layout), f"shardsafe {layout} -> {target}")


def test_one_process_without_a_target_sees_every_rank_s_keys(saved, tmp_path):
    root, _ = saved
    ckpt = checkpoint.make_sync_checkpointer()
    for layout in lw.SOURCES:
        ours = ckpt.load(os.path.join(root, "shardsafe", layout))
        dcp_file = str(tmp_path / f"{layout}.pt")
        dcp_to_torch_save(os.path.join(root, "dcp", layout), dcp_file)
        theirs = torch.load(dcp_file, weights_only=True)
        _assert_equal(theirs, _expected(layout), f"dcp {layout}")
        _assert_equal(ours, _expected(layout), f"shardsafe {layout}")
        # And into a plain target (no process group): every key of every stage, strict.
        target = {k: torch.zeros_like(v) for k, v in _expected(layout).items()}
        nested = {"model": {k[len("model.") :]: v for k, v in target.items() if k.startswith("model.")}}
        nested.update({k: v for k, v in target.items() if not k.startswith("model.")})
        _assert_equal(
            ckpt.load(os.path.join(root, "shardsafe", layout), nested, strict=True), _expected(layout), layout
        )
    _assert_equal(ckpt.load(os.path.join(root, "async", "pp_fsdp")), _expected("pp_fsdp"), "async pp_fsdp")
    # A value held by stage 1 only reaches the metadata, also on a save that reuses the plan.
    assert ckpt.load(os.path.join(root, "shardsafe", "pp_fsdp"))["stage1_lr"] == 0.5
    assert ckpt.load(os.path.join(root, "shardsafe", "pp_fsdp-again"))["stage1_lr"] == 0.25
    ckpt.close()


def test_a_save_missing_one_expert_rank_s_experts_fails_naming_the_region(tmp_path):
    path = str(tmp_path / "ckpt")
    errors = run_ranks(lw.save_refused, 4, path, "expert_left_out")
    for text in errors:
        assert text.startswith(
            "InvalidStateDictError: key 'experts': rank 3 is in the key's DTensor mesh but lacks it, so its "
            "region of 'experts' at offsets [2, 0, 0] sizes [2, 6, 5] would be missing from the checkpoint"
        ), text
    assert not os.path.exists(os.path.join(path, "metadata.json"))


def test_a_plain_tensor_that_differs_between_ranks_is_warned_about_once(tmp_path):
    path = str(tmp_path / "ckpt")
    warned = run_ranks(lw.save_diverging, 2, path)
    assert warned[1] == []  # the coordinator warns, once for the job
    (message,) = warned[0]
    assert message.startswith("plain tensors differ between ranks: 'samples_seen' (rank 0 and rank 1).")
    assert "checkpoint.RankLocal(...)" in message and "lr_scale" not in message


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "checkpoint.tools.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_inspect_diff_export_and_the_dcp_reader_see_every_stage_s_keys(saved, tmp_path):
    root, _ = saved
    pipeline = os.path.join(root, "shardsafe", "pp_fsdp")
    want = _expected("pp_fsdp")
    doc = json.loads(_cli("inspect", "--json", pipeline).stdout)
    assert sorted(t["key"] for t in doc["tensors"]) == sorted(want)
    # The same state saved whole by one process: diff finds no difference, stage 1's layers included.
    whole = str(tmp_path / "whole")
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({**lw.reference_state(), "stage1_lr": 0.5}, whole)  # stage 1's value too
    ckpt.close()
    diff = _cli("diff", "--json", pipeline, whole)
    report = json.loads(diff.stdout)
    assert (diff.returncode, report["identical"], report["only_in_a"], report["only_in_b"]) == (
        0,
        True,
        [],
        [],
    )
    assert sorted(t["key"] for t in report["tensors"]) == sorted(want)
    out = str(tmp_path / "hf")
    export_hf(pipeline, out, prefix="model")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert sorted(exported) == sorted(k.removeprefix("model.") for k in want if k.startswith("model."))
    for k, v in exported.items():
        assert torch.equal(v, want[f"model.{k}"]), k
    # DCP's own load, in one process, through shardsafe's reader: stage 1's keys are there too.
    target = {k: torch.zeros_like(v) for k, v in lw.reference_state()["model"].items()}
    state = {
        "model": target,
        "experts": torch.zeros(lw.EXPERTS),
        "stage0_table": torch.zeros(lw.STAGE0_TABLE, dtype=torch.int64),
    }
    dcp.load(state, storage_reader=ShardsafeStorageReader(pipeline))
    _assert_equal(state, want, "dcp reader")
