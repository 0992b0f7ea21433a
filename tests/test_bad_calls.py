"""Bad calls get clear errors: the exact error type, and the key or path named in the message.

Single-process mistakes are checked directly; mistakes that only show when
ranks disagree run on 2 real gloo ranks, all in one spawn, ending with a
good save to show that failed saves leave the ranks ready for the next one.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import checkpoint
from checkpoint.testing.ranks import run_ranks
from planners.errors import (
    CheckpointError,
    DistributedCheckpointError,
    InvalidStateDictError,
    NotADirectoryCheckpointError,
    PickleNotAllowedError,
)
from planners.metadata import METADATA_FILE


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


def test_path_that_is_a_file(ckpt, tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as info:
        ckpt.save({"w": torch.ones(2)}, str(path))
    assert type(info.value) is NotADirectoryCheckpointError
    assert str(info.value) == f"checkpoint path {path} is a file, not a directory; choose another path"
    with pytest.raises(CheckpointError) as info:
        ckpt.load(str(path))
    assert type(info.value) is NotADirectoryCheckpointError
    assert str(info.value) == f"checkpoint path {path} is a file, not a checkpoint directory"
    assert path.read_bytes() == b"not a checkpoint"


def test_meta_tensors_are_refused_on_save_and_as_load_targets(ckpt, tmp_path):
    path = str(tmp_path / "ckpt")
    with pytest.raises(InvalidStateDictError) as info:
        ckpt.save({"layer": {"w": torch.empty(3, device="meta")}}, path)
    assert (
        str(info.value)
        == "key 'layer.w': tensor is on the meta device and holds no data; materialise it before saving"
    )
    assert not os.path.exists(path)
    ckpt.save({"layer": {"w": torch.ones(3)}}, path)
    with pytest.raises(InvalidStateDictError, match=rf"^{path}: target key 'layer\.w' is on the meta device"):
        ckpt.load(path, {"layer": {"w": torch.empty(3, device="meta")}})


def test_wrong_arguments(ckpt, tmp_path):
    path = str(tmp_path / "ckpt")
    state = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match=r"save\(\) takes \(state_dict, path\): the arguments are swapped"):
        ckpt.save(path, state)
    with pytest.raises(TypeError, match=r"^load\(\) takes \(path, state_dict\): the arguments are swapped$"):
        ckpt.load(state, path)
    with pytest.raises(
        TypeError, match=r"^path must be a str or os\.PathLike \(e\.g\. pathlib\.Path\), got dict$"
    ):
        ckpt.load(state)
    with pytest.raises(
        TypeError, match=r"^path is an empty path; pass the checkpoint directory \(a str or os\.PathLike\)$"
    ):
        ckpt.save(state, "")
    with pytest.raises(
        TypeError, match=r"^state_dict must be a dict \(or list/tuple/stateful object\), got Tensor$"
    ):
        ckpt.save(torch.ones(2), path)
    with pytest.raises(TypeError, match=r"save\(\) got unexpected keyword argument\(s\) \['overwite'\]"):
        ckpt.save(state, path, overwite=True)
    ckpt.save(state, path)
    with pytest.raises(TypeError, match=r"load\(\) got unexpected keyword argument\(s\) \['allow_pickel'\]"):
        ckpt.load(path, allow_pickel=True)
    with pytest.raises(
        FileNotFoundError, match=rf"^no checkpoint at {tmp_path}/missing: {METADATA_FILE} not found$"
    ):
        ckpt.load(str(tmp_path / "missing"))


def _try(fn: Any) -> tuple[str, str, dict | None]:
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e), getattr(e, "failures", None)
    return "ok", "", None


def _disagreeing_ranks(rank: int, world_size: int, root: str) -> dict[str, tuple[str, str, dict | None]]:
    ckpt = checkpoint.make_sync_checkpointer()
    base = {"w": torch.arange(4, dtype=torch.float32), "step": 1}
    out = {}
    # A key may live on some ranks only (a pipeline stage's), but it is one kind of leaf everywhere.
    extra = {"extra": torch.ones(1)} if rank == 1 else {"extra": 1}
    out["keys"] = _try(lambda: ckpt.save({**base, **extra}, f"{root}/keys"))
    w = base["w"].double() if rank == 1 else base["w"]
    out["dtype"] = _try(lambda: ckpt.save({**base, "w": w}, f"{root}/dtype"))
    obj = object() if rank == 1 else 0
    out["pickle"] = _try(lambda: ckpt.save({**base, "obj": obj}, f"{root}/pickle"))
    meta = torch.empty(4, device="meta") if rank == 1 else base["w"]
    out["meta"] = _try(lambda: ckpt.save({**base, "w": meta}, f"{root}/meta"))
    out["file"] = _try(lambda: ckpt.save(base, f"{root}/a-file"))
    out["good"] = _try(lambda: ckpt.save(base, f"{root}/good"))
    loaded = ckpt.load(f"{root}/good")
    assert torch.equal(loaded["w"], base["w"]) and loaded["step"] == 1
    ckpt.close()
    return out


@pytest.mark.multiproc
def test_ranks_that_disagree_fail_together_with_clear_errors(tmp_path):
    (tmp_path / "a-file").write_bytes(b"x")
    r0, r1 = run_ranks(_disagreeing_ranks, 2, str(tmp_path))

    keys = (
        "InvalidStateDictError",
        "key 'extra': rank 1 holds a tensor, rank 0 a value; every rank must hold the same kind of leaf",
        None,
    )
    assert r0["keys"] == r1["keys"] == keys
    dtype = "key 'w': rank 0 has dtype float32 shape [4], rank 1 has dtype float64 shape [4]"
    assert r0["dtype"] == r1["dtype"] == ("InvalidStateDictError", dtype, None)

    # A rank's own mistake: that rank gets its error, the others learn which rank failed and why.
    kind, message, _ = r1["pickle"]
    assert kind == PickleNotAllowedError.__name__ and message.startswith(
        "key 'obj': a value of type object cannot be stored"
    )
    kind, message, failures = r0["pickle"]
    assert kind == DistributedCheckpointError.__name__
    assert message.startswith(f"save to {tmp_path}/pickle failed on rank(s) [1]; nothing was committed")
    assert failures == {1: f"PickleNotAllowedError: {r1['pickle'][1]}"}
    meta = "key 'w': tensor is on the meta device and holds no data; materialise it before saving"
    assert r1["meta"] == ("InvalidStateDictError", meta, None)
    assert r0["meta"][2] == {1: f"InvalidStateDictError: {meta}"}

    a_file = (
        "NotADirectoryCheckpointError",
        f"checkpoint path {tmp_path}/a-file is a file, not a directory; choose another path",
        None,
    )
    assert r0["file"] == r1["file"] == a_file
    assert r0["good"] == r1["good"] == ("ok", "", None)
    for name in ("keys", "dtype", "pickle", "meta"):
        assert not (tmp_path / name / METADATA_FILE).exists()


def test_rank_info_is_validated_and_positional_as_in_the_seed():
    assert checkpoint.RankInfo(1, 4) == checkpoint.RankInfo(global_rank=1, global_world_size=4)
    with pytest.raises(ValueError, match=r"global_rank 4 is not in \[0, 4\)"):
        checkpoint.RankInfo(4, 4)
