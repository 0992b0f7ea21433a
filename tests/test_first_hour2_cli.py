"""Issue 25, "the first hour, round two", on the command line, run as a user runs `shardsafe`.

Each call is a fresh `python -m checkpoint.tools.cli ...` process (what the `shardsafe` script
runs), so the exit status, stdout and stderr are what a shell sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import checkpoint
from checkpoint.tools.interop_cli import MAX_SKIPPED_NAMED
from planners.metadata import METADATA_FILE

ROOT = Path(__file__).resolve().parent.parent


def _shardsafe(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "checkpoint.tools.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout, done.stderr


def _training_state() -> dict:
    """A model and its AdamW state after one step, as a training script saves them."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optim.step()
    return {"model": model.state_dict(), "optim": optim.state_dict(), "step": 3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with one step, a Lightning-style checkpoints folder, and a DCP directory."""
    base = tmp_path_factory.mktemp("cli2")
    ckpt = checkpoint.make_sync_checkpointer()
    mgr = checkpoint.CheckpointManager(str(base / "run"), checkpointer=ckpt)
    mgr.save(3, {"train": _training_state(), "step": 3})
    mgr.close()
    lightning = base / "lightning_logs" / "version_0" / "checkpoints"
    for step in (
        4,
        8,
    ):  # what ShardsafeModelParallelStrategy saves: the Lightning dict with its `lightning` part
        state = {"state_dict": {"w": torch.ones(2) * step}, "lightning": {"global_step": step, "epoch": 0}}
        ckpt.save(state, str(lightning / f"epoch=0-step={step}.ckpt"))
    ckpt.save(_training_state(), str(base / "plain"))
    ckpt.close()
    dcp.save({"w": torch.arange(4.0), "step": 2}, checkpoint_id=str(base / "dcp"))
    return base


# --- item 13: ls on something that is not a run --------------------------------------------------


def test_ls_on_a_step_directory_says_it_is_a_checkpoint_and_exits_2(saved: Path) -> None:
    step = saved / "run" / "step-000000003"
    code, out, err = _shardsafe("ls", str(step))
    assert (code, out) == (2, "")
    assert err.strip() == (
        f"error: CheckpointPathError: {step} is a checkpoint (it holds {METADATA_FILE}), not a run: "
        f"`shardsafe inspect {step}` shows it, `shardsafe verify {step}` checks it; if it is a step of a run, "
        f"`shardsafe ls {saved / 'run'}` lists the run"
    )
    code, out, _ = _shardsafe("ls", str(step), "--json")
    assert (code, out) == (2, "")


def test_ls_on_a_lightning_checkpoint_or_its_folder_says_which_and_exits_2(saved: Path) -> None:
    folder = saved / "lightning_logs" / "version_0" / "checkpoints"
    one = folder / "epoch=0-step=4.ckpt"
    code, out, err = _shardsafe("ls", str(one))
    assert (code, out) == (2, "")
    assert err.strip().startswith(f"error: CheckpointPathError: {one} is a Lightning checkpoint (it holds ")
    code, out, err = _shardsafe("ls", str(folder))
    assert (code, out) == (2, "")
    assert err.strip() == (
        f"error: CheckpointPathError: {folder} holds no step-N directories but 2 checkpoint(s) named otherwise "
        "(epoch=0-step=4.ckpt, epoch=0-step=8.ckpt): `shardsafe ls` lists runs saved by CheckpointManager; "
        f"see one with `shardsafe inspect {folder}/epoch=0-step=4.ckpt`"
    )


def test_ls_on_a_dcp_directory_names_it_and_an_empty_one_is_an_empty_run(saved: Path, tmp_path: Path) -> None:
    code, out, err = _shardsafe("ls", str(saved / "dcp"))
    assert (code, out) == (2, "")
    assert err.strip() == (
        f"error: CheckpointPathError: {saved / 'dcp'} is a torch.distributed.checkpoint (DCP) checkpoint, not "
        f"a run: `shardsafe import-dcp {saved / 'dcp'} NEW_DIR` converts it"
    )
    code, out, err = _shardsafe("ls", str(tmp_path))
    assert (code, err.strip()) == (0, f"no step directories under {tmp_path}")


# --- item 7 on the command line: inspect and verify of a DCP directory ----------------------------


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_inspect_and_verify_of_a_dcp_directory_point_to_import_dcp(saved: Path, command: str) -> None:
    path = saved / "dcp"
    code, out, err = _shardsafe(command, str(path))
    assert (code, out) == (2, "")
    assert err.strip().startswith(
        f"error: FileNotFoundError: {path} is a torch.distributed.checkpoint (DCP) checkpoint (.metadata, no "
        f"metadata.json): convert it once with `shardsafe import-dcp {path} NEW_DIR`"
    )
    assert err.strip().endswith("storage_reader=checkpoint.integrations.dcp.ShardsafeStorageReader(NEW_DIR)")


# --- item 14: inspect --keys matching nothing -----------------------------------------------------


def test_inspect_keys_matching_nothing_suggests_the_real_prefixes(saved: Path) -> None:
    step = str(saved / "run" / "step-000000003")
    code, out, err = _shardsafe("inspect", step, "--keys", "model.*")
    assert code == 1
    assert err.strip() == (
        "no keys match 'model.*' (a glob over the full keys); '*.model.*' matches 2 key(s); its top-level "
        "keys: 'step', 'train.*'"
    )
    code, out, _ = _shardsafe("inspect", step, "--keys", "*.model.*", "--json")
    assert code == 0
    assert [t["key"] for t in json.loads(out)["tensors"]] == ["train.model.bias", "train.model.weight"]


# --- item 15: export-hf -----------------------------------------------------------------------------


def test_export_hf_of_a_training_state_requires_a_prefix_and_lists_the_subtrees(saved: Path, tmp_path: Path):
    out_dir = tmp_path / "hf"
    code, out, err = _shardsafe("export-hf", str(saved / "plain"), str(out_dir))
    assert (code, out) == (2, "")
    assert err.strip().splitlines()[-1] == (
        f"Error: {saved / 'plain'} holds a training state, not one model: its tensors are under 'model' "
        "(2 tensors), 'optim' (6 tensors), and one of them is an optimizer's; pass prefix= (--prefix) naming "
        "the model's subtree, e.g. --prefix model"
    )
    assert not out_dir.exists()
    code, out, err = _shardsafe("export-hf", str(saved / "plain"), str(out_dir), "--prefix", "model")
    assert code == 0, err
    assert out.strip() == f"exported 2 tensors (32 bytes) to {out_dir}: model.safetensors"


def test_export_hf_of_a_model_state_dict_needs_no_prefix(tmp_path: Path) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).state_dict(), str(tmp_path / "m"))
    ckpt.close()
    code, out, err = _shardsafe("export-hf", str(tmp_path / "m"), str(tmp_path / "hf"))
    assert code == 0, err
    assert out.strip() == f"exported 4 tensors (36 bytes) to {tmp_path / 'hf'}: model.safetensors"


def test_export_hf_of_a_corrupt_checkpoint_leaves_no_output_directory(tmp_path: Path) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.arange(1000.0)}, str(tmp_path / "c"))
    ckpt.close()
    (shard,) = [p for p in (tmp_path / "c").iterdir() if p.suffix == ".safetensors"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    out_dir = tmp_path / "exports" / "hf"
    code, out, err = _shardsafe("export-hf", str(tmp_path / "c"), str(out_dir))
    assert (code, out) == (1, "")
    assert err.strip().startswith(
        f"error: CorruptCheckpointError: {tmp_path / 'c'}: file {shard.name}, key 'w'"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # neither hf/ nor exports/ is left


def test_export_hf_into_an_existing_directory_keeps_it_when_the_export_fails(tmp_path: Path) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.arange(1000.0)}, str(tmp_path / "c"))
    ckpt.close()
    (shard,) = [p for p in (tmp_path / "c").iterdir() if p.suffix == ".safetensors"]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated: a missing chunk
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("mine\n")
    code, _, err = _shardsafe("export-hf", str(tmp_path / "c"), str(tmp_path / "out"))
    assert code == 1, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md"]


def test_export_hf_summarises_a_long_skipped_list(tmp_path: Path) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    # beside a tensor, each plain entry of a dict is a value key of its own (as Lightning's loop state)
    loops = {"progress": torch.ones(1), **{f"k{i}": i for i in range(40)}}
    state = {"state_dict": {"w": torch.ones(2)}, "loops": loops, "callbacks": {"a": [1, "b"]}, "epoch": 0}
    ckpt.save(state, str(tmp_path / "c"))
    ckpt.close()
    code, out, err = _shardsafe(
        "export-hf", str(tmp_path / "c"), str(tmp_path / "hf"), "--prefix", "state_dict"
    )
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("not exported")]
    assert skipped == [
        "not exported (not tensors, or rank-local): 42 keys: loops.* (40), callbacks (1), epoch (1) "
        "(--json lists every key)"
    ]
    code, out, _ = _shardsafe(
        "export-hf", str(tmp_path / "c"), str(tmp_path / "hf2"), "--prefix", "state_dict", "--json"
    )
    assert len(json.loads(out)["skipped"]) == 42 > MAX_SKIPPED_NAMED


# --- item 19: import-dcp counts in words -------------------------------------------------------------


def test_import_dcp_says_one_value_not_one_values(saved: Path, tmp_path: Path) -> None:
    code, out, err = _shardsafe(
        "import-dcp", str(saved / "dcp"), str(tmp_path / "imported"), "--trust-pickle"
    )
    assert code == 0, err
    assert out.strip().startswith("imported 1 tensor (")
    assert out.strip().endswith(f"bytes) and 1 value into {tmp_path / 'imported'}")
