"""The seed API's load contract, checked for every checkpointer alike.

The seed's `Checkpointer.load` (shared/reference/seed_checkpointer.txt) and
the tests written for it rely on these semantics:

- a target leaf that is `None` means "load this key": the saved value comes
  back there, tensor or not;
- partial loading reaches into nested containers that hold no tensor, and
  keys absent from the target are never returned;
- `strict=True` with missing keys raises an error that `except RuntimeError`
  catches (`MissingKeysError`, also a `KeyError`);
- a missing checkpoint path raises `FileNotFoundError`.

Each check runs against the sync checkpointer, the seed-shaped
`SyncCheckpointer(writer, reader)` and the async checkpointer (whose writer
process runs the save; the load is synchronous).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import checkpoint
from checkpoint import (
    CheckpointReader,
    CheckpointWriter,
    CheckpointWriterConfig,
    MissingKeysError,
    RankInfo,
    SyncCheckpointer,
)

KINDS = ["sync", "seed_shaped", "async"]


def _make(kind: str) -> checkpoint.Checkpointer:
    if kind == "sync":
        return checkpoint.make_sync_checkpointer()
    if kind == "seed_shaped":
        rank_info = RankInfo(0, 1)
        return SyncCheckpointer(
            CheckpointWriter(CheckpointWriterConfig(), rank_info), CheckpointReader(rank_info)
        )
    return checkpoint.make_async_checkpointer()


def _saved() -> dict[str, Any]:
    return {
        "model": {"layer1": {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.ones(2)}},
        "metadata": {"epoch": 10, "step": 2000},
        "history": [0.5, 0.25],
        "name": "run-7",
    }


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory) -> Iterator[tuple[checkpoint.Checkpointer, str]]:
    """A checkpointer of each kind, and a checkpoint it saved."""
    ckpt = _make(request.param)
    path = str(tmp_path_factory.mktemp(request.param) / "ckpt")
    result = ckpt.save(_saved(), path)
    if result is not None:  # async: (stage future, write future)
        result[1].result(timeout=120)
    yield ckpt, path
    ckpt.close()


def test_a_none_leaf_loads_the_saved_tensor(saved):
    ckpt, path = saved
    out = ckpt.load(path, {"model": {"layer1": {"weight": None}}})
    assert list(out) == ["model"] and list(out["model"]["layer1"]) == ["weight"]
    assert torch.equal(out["model"]["layer1"]["weight"], torch.arange(6.0).reshape(2, 3))


def test_a_none_leaf_loads_a_saved_value_or_subtree(saved):
    ckpt, path = saved
    out = ckpt.load(path, {"name": None, "history": None, "model": None})
    assert (out["name"], out["history"]) == ("run-7", [0.5, 0.25])
    assert list(out["model"]["layer1"]) == ["weight", "bias"]
    assert torch.equal(out["model"]["layer1"]["bias"], torch.ones(2))


def test_partial_loading_reaches_into_a_saved_dict(saved):
    ckpt, path = saved
    out = ckpt.load(path, {"metadata": {"epoch": None}})
    assert out == {"metadata": {"epoch": 10}}  # "step" is not in the target, so it is not returned
    out = ckpt.load(path, {"metadata": {"step": 0}, "model": {"layer1": {"bias": torch.zeros(2)}}})
    assert out["metadata"] == {"step": 2000} and list(out["model"]["layer1"]) == ["bias"]
    assert torch.equal(out["model"]["layer1"]["bias"], torch.ones(2))


def test_strict_missing_keys_is_a_runtime_error(saved):
    ckpt, path = saved
    target = {"metadata": {"epoch": None, "seed": None}, "optim": None}
    with pytest.raises(RuntimeError) as info:
        ckpt.load(path, target, strict=True)
    assert type(info.value) is MissingKeysError and isinstance(info.value, KeyError)
    assert info.value.missing == ["metadata.seed", "optim"]
    assert "'metadata.seed', 'optim'" in str(info.value)
    out = ckpt.load(path, target)  # not strict: what is there is loaded, the rest left as it was
    assert out == {"metadata": {"epoch": 10, "seed": None}, "optim": None}


def test_a_missing_path_is_file_not_found(saved, tmp_path):
    ckpt, _ = saved
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load(str(tmp_path / "never-saved"))
    with pytest.raises(FileNotFoundError):
        ckpt.load(str(tmp_path / "never-saved"), {"metadata": {"epoch": None}})


def test_an_empty_dict_takes_the_saved_dict_whole(saved):
    ckpt, path = saved
    assert ckpt.load(path, {"metadata": {}}) == {"metadata": {"epoch": 10, "step": 2000}}
    out = ckpt.load(path, {"model": {"layer1": {}}})
    assert list(out["model"]["layer1"]) == ["weight", "bias"]
    assert torch.equal(out["model"]["layer1"]["weight"], torch.arange(6.0).reshape(2, 3))


def test_a_fresh_optimizer_gets_the_saved_state(saved, tmp_path):
    """A new optimizer's state dict has an empty `state`: it takes the saved state whole."""
    ckpt, _ = saved
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optim.step()
    result = ckpt.save({"model": model, "optim": optim}, str(tmp_path / "ckpt"))
    if result is not None:
        result[1].result(timeout=120)

    fresh_model = torch.nn.Linear(3, 2)
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=0.5)
    ckpt.load(str(tmp_path / "ckpt"), {"model": fresh_model, "optim": fresh}, strict=True)
    want, got = optim.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"]) == [0, 1]
    for i, state in want["state"].items():
        assert sorted(got["state"][i]) == sorted(state)
        assert all(torch.equal(got["state"][i][k], v) for k, v in state.items())
