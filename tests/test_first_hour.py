"""Issue 17, "the first hour": the mistakes a new user makes in one process, each with a clear answer.

Multi-rank cases (torchrun without a process group, ranks with different paths, a rank that never
saves, a failed save's directory) are in tests/test_first_hour_ranks.py; the command line is in
tests/test_first_hour_cli.py.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import checkpoint
from checkpoint import CheckpointManager
from planners.errors import (
    CheckpointError,
    CheckpointPathError,
    MismatchError,
    NotADirectoryCheckpointError,
    PickleNotAllowedError,
)
from planners.metadata import METADATA_FILE


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


# --- case 3: a value saved where the target holds a tensor, and the reverse ----------------------


@pytest.mark.parametrize("strict", [False, True])
def test_value_saved_where_the_target_holds_a_tensor_is_a_mismatch(ckpt, tmp_path, strict):
    path = str(tmp_path / "c")
    ckpt.save({"step": 1, "w": torch.ones(2)}, path)
    target = {"step": torch.zeros(()), "w": torch.zeros(2)}
    with pytest.raises(MismatchError) as info:
        ckpt.load(path, target, strict=strict)
    assert str(info.value) == (
        f"{path}: key 'step': the checkpoint holds a value of type int, but the target holds a tensor; "
        "put a value (or None) at this key of the target, or save a tensor under it"
    )
    assert torch.equal(target["step"], torch.zeros(()))


@pytest.mark.parametrize("strict", [False, True])
def test_tensor_saved_where_the_target_holds_a_value_is_a_mismatch(ckpt, tmp_path, strict):
    path = str(tmp_path / "c")
    ckpt.save({"step": torch.tensor([3, 4])}, path)
    with pytest.raises(MismatchError) as info:
        ckpt.load(path, {"step": 0}, strict=strict)
    assert str(info.value) == (
        f"{path}: key 'step': the checkpoint holds a tensor (shape [2], int64), but the target holds "
        "a value of type int; put a tensor (or None, to get the saved tensor) at this key of the target"
    )
    # None still asks for whatever was saved
    assert torch.equal(ckpt.load(path, {"step": None}, strict=strict)["step"], torch.tensor([3, 4]))


# --- case 4: a load that loads nothing warns ----------------------------------------------------


def test_a_load_that_matches_no_key_warns_naming_both_sides(ckpt, tmp_path):
    path = str(tmp_path / "c")
    torch.manual_seed(0)
    saved = nn.Linear(4, 3)
    ckpt.save(saved.state_dict(), path)  # keys 'weight', 'bias'
    model = nn.Sequential(nn.Linear(4, 3))
    before = model[0].weight.detach().clone()
    with pytest.warns(UserWarning) as record:
        ckpt.load(path, {"model": model})
    assert len(record) == 1
    assert str(record[0].message) == (
        f"load from {path} matched none of the target's 2 key(s), so nothing was loaded and the target "
        "is unchanged. Target keys: 'model.0.bias', 'model.0.weight'; saved keys: 'bias', 'weight'. "
        "Nest the target as the state was saved (e.g. {'model': model} only if it was saved that way), "
        "or pass strict=True to raise instead"
    )
    assert torch.equal(model[0].weight, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit strict=False load that matches some key does not warn
        out = ckpt.load(path, {"weight": torch.zeros(3, 4), "extra": torch.zeros(1)}, strict=False)
    assert torch.equal(out["weight"], saved.weight.detach())


# --- case 5: a manager pointed at a checkpoint -----------------------------------------------------


def test_manager_root_that_is_a_checkpoint_points_to_the_parent(ckpt, tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(str(run), checkpointer=ckpt)
    mgr.save(4, {"w": torch.ones(2)})
    mgr.close()
    step_dir = run / "step-000000004"
    mgr = CheckpointManager(str(step_dir), checkpointer=ckpt)
    message = (
        f"CheckpointManager root {step_dir} is itself a checkpoint (it holds {METADATA_FILE}); pass the "
        f"run's root, the directory that holds the step-... folders, e.g. {run}"
    )
    for call in (
        lambda: mgr.load({"w": torch.zeros(2)}),
        mgr.steps,
        lambda: mgr.save(5, {"w": torch.ones(2)}),
    ):
        with pytest.raises(CheckpointPathError) as info:
            call()
        assert str(info.value) == message
    assert sorted(p.name for p in run.iterdir()) == ["step-000000004"]
    assert sorted(p.name for p in step_dir.iterdir() if p.name.startswith("step-")) == []


# --- case 7: map_location ------------------------------------------------------------------------


def test_map_location_is_accepted_as_default_map_location(ckpt, tmp_path):
    path = str(tmp_path / "c")
    ckpt.save({"w": torch.arange(3)}, path)
    out = ckpt.load(path, map_location=lambda t: t.to(torch.float64))
    assert out["w"].dtype == torch.float64 and torch.equal(out["w"], torch.arange(3, dtype=torch.float64))
    assert torch.equal(ckpt.load(path, map_location="cpu")["w"], torch.arange(3))
    with pytest.raises(TypeError, match=r"^load\(\) got both map_location and default_map_location"):
        ckpt.load(path, map_location="cpu", default_map_location="cpu")


# --- case 8: os.PathLike everywhere a path is taken ----------------------------------------------


def test_pathlib_paths_work_for_save_load_manager_verify_export_import(ckpt, tmp_path):
    path = tmp_path / "c"
    ckpt.save({"w": torch.arange(6.0).reshape(2, 3)}, path)
    assert torch.equal(ckpt.load(path)["w"], torch.arange(6.0).reshape(2, 3))
    assert checkpoint.verify(path).ok
    result = checkpoint.export_hf(path, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["model.safetensors"]
    assert result.tensors == 1
    mgr = CheckpointManager(tmp_path / "run", checkpointer=ckpt)
    assert mgr.save(0, {"w": torch.ones(1)}) is True
    assert mgr.latest_step() == 0
    mgr.close()
    import torch.distributed.checkpoint as dcp

    dcp.save({"v": torch.arange(4.0)}, checkpoint_id=str(tmp_path / "dcp"))
    checkpoint.import_dcp(tmp_path / "dcp", tmp_path / "imported", trust_pickle=True)
    assert torch.equal(ckpt.load(tmp_path / "imported")["v"], torch.arange(4.0))


def test_an_empty_path_says_empty(ckpt):
    for call in (lambda: ckpt.save({"w": torch.ones(1)}, ""), lambda: ckpt.load("")):
        with pytest.raises(TypeError) as info:
            call()
        assert (
            str(info.value) == "path is an empty path; pass the checkpoint directory (a str or os.PathLike)"
        )
    with pytest.raises(TypeError, match=r"^root is an empty path"):
        CheckpointManager("", checkpointer=ckpt)


# --- case 9: the nested item that needs pickle ---------------------------------------------------


def test_pickle_refusal_names_the_nested_item(ckpt, tmp_path):
    with pytest.raises(PickleNotAllowedError) as info:
        ckpt.save({"np_rng": np.random.get_state()}, str(tmp_path / "c"))
    assert str(info.value).startswith(
        "key 'np_rng': a value of type tuple (its item np_rng[1] is a numpy.ndarray) cannot be stored as JSON."
    )
    with pytest.raises(PickleNotAllowedError, match=re.escape("its item cfg['a'][0] is a pathlib.PosixPath")):
        ckpt.save({"cfg": {"n": 1, "a": [pathlib.PosixPath("/x")]}}, str(tmp_path / "d"))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# --- case 11: saving to a file -------------------------------------------------------------------


def test_saving_to_metadata_json_raises_a_not_a_directory_error(ckpt, tmp_path):
    path = tmp_path / "c"
    ckpt.save({"w": torch.ones(2)}, str(path))
    target = path / METADATA_FILE
    before = target.read_bytes()
    with pytest.raises(NotADirectoryError) as info:
        ckpt.save({"w": torch.zeros(2)}, str(target), overwrite=True)
    assert type(info.value) is NotADirectoryCheckpointError
    assert isinstance(info.value, CheckpointError)
    assert str(info.value) == f"checkpoint path {target} is a file, not a directory; choose another path"
    assert target.read_bytes() == before
