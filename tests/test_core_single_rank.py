"""Save and load on one process: every kind of leaf, the on-disk files, and each clear error."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open

import checkpoint
from checkpoint import (
    CheckpointExistsError,
    IncompleteCheckpointError,
    InvalidStateDictError,
    MismatchError,
    MissingKeysError,
    PickleNotAllowedError,
)
from planners.metadata import METADATA_FILE, PLAIN_FORMAT_VERSION, SHARD_FILE_RE

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2,
    torch.float8_e5m2fnuz,
    torch.complex64,
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


class Counter:
    """A torchtitan-style stateful wrapper."""

    def __init__(self, n: int, weight: torch.Tensor) -> None:
        self.n = n
        self.weight = weight
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return {"n": self.n, "weight": self.weight}

    def load_state_dict(self, sd: dict) -> None:
        self.loaded = sd
        self.n = sd["n"]


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


def test_every_dtype_and_odd_tensor_round_trips_exactly(ckpt, tmp_path):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    state = {
        "dtypes": {str(d).removeprefix("torch."): _tensor(d) for d in ALL_DTYPES},
        "zero_dim": torch.tensor(3.5),
        "empty": torch.empty(0, 5),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.ones(3, 1).expand(3, 4),
        "keys.with.dots": {"a.b": torch.arange(3)},
    }
    ckpt.save(state, str(tmp_path / "c"))
    full = ckpt.load(str(tmp_path / "c"))
    for name, t in state["dtypes"].items():
        assert _same(full["dtypes"][name], t), name
    assert _same(full["zero_dim"], state["zero_dim"]) and full["zero_dim"].dim() == 0
    assert full["empty"].shape == (0, 5)
    assert torch.equal(full["transposed"], base.t().contiguous())
    assert torch.equal(full["strided"], base[::2, 1::3].contiguous())
    assert torch.equal(full["expanded"], torch.ones(3, 4))
    assert torch.equal(full["keys.with.dots"]["a.b"], torch.arange(3))


def test_values_keep_their_types(ckpt, tmp_path):
    state = {
        "w": torch.ones(2),
        "step": 12,
        "lr": 0.25,
        "name": "run-1",
        "flag": True,
        "nothing": None,
        "betas": (0.9, 0.999),
        "groups": [{"lr": 1e-3, "params": [0, 1], "nan": float("nan")}],
        "int_keys": {0: "a", 1: (2, 3)},
        "od": OrderedDict(w2=torch.zeros(1)),
    }
    ckpt.save(state, str(tmp_path / "c"))
    full = ckpt.load(str(tmp_path / "c"))
    assert full["step"] == 12 and type(full["step"]) is int
    assert full["lr"] == 0.25 and full["name"] == "run-1" and full["flag"] is True and full["nothing"] is None
    assert full["betas"] == (0.9, 0.999) and type(full["betas"]) is tuple
    assert full["groups"][0]["params"] == [0, 1] and full["groups"][0]["nan"] != full["groups"][0]["nan"]
    assert full["int_keys"] == {0: "a", 1: (2, 3)}
    # None means "load this key"; an empty dict asks for no key in particular and takes the saved dict whole.
    target = {"w": torch.zeros(2), "step": 0, "betas": None, "int_keys": {}}
    out = ckpt.load(str(tmp_path / "c"), state_dict=target)
    assert (
        out is target
        and out["step"] == 12
        and out["betas"] == (0.9, 0.999)
        and out["int_keys"] == {0: "a", 1: (2, 3)}
    )
    assert torch.equal(target["w"], torch.ones(2))


def test_load_fills_target_in_place_and_reads_only_asked_keys(ckpt, tmp_path):
    ckpt.save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, str(tmp_path / "c"))
    a = torch.zeros(2, 3)
    storage_before = a.data_ptr()
    out = ckpt.load(str(tmp_path / "c"), state_dict={"a": a}, strict=True)
    assert out["a"] is a and a.data_ptr() == storage_before
    assert torch.equal(a, torch.arange(6.0).reshape(2, 3))
    assert "b" not in out


def test_stateful_objects_are_saved_and_restored(ckpt, tmp_path):
    ckpt.save({"counter": Counter(5, torch.arange(4.0))}, str(tmp_path / "c"))
    target = Counter(0, torch.zeros(4))
    ckpt.load(str(tmp_path / "c"), state_dict={"counter": target})
    assert target.n == 5 and torch.equal(target.weight, torch.arange(4.0))
    assert target.loaded is not None and target.loaded["weight"] is target.weight
    model = torch.nn.Linear(3, 2)
    ckpt.save({"model": model}, str(tmp_path / "m"))
    fresh = torch.nn.Linear(3, 2)
    ckpt.load(str(tmp_path / "m"), state_dict={"model": fresh}, strict=True)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_files_are_safetensors_and_metadata_is_json(ckpt, tmp_path):
    state = {"a": torch.arange(10.0), "b": {"c": torch.ones(2, 2, dtype=torch.bfloat16)}, "step": 3}
    ckpt.save(state, f"file://{tmp_path}/c")
    names = os.listdir(tmp_path / "c")
    shards = [n for n in names if SHARD_FILE_RE.fullmatch(n)]
    assert sorted(names) == sorted([*shards, METADATA_FILE]) and shards
    for name in shards:
        with safe_open(str(tmp_path / "c" / name), "pt") as f:
            assert torch.equal(f.get_tensor("a"), torch.arange(10.0))
            assert torch.equal(f.get_tensor("b.c"), torch.ones(2, 2, dtype=torch.bfloat16))
            assert f.metadata()["format"] == "shardsafe"
    doc = json.loads((tmp_path / "c" / METADATA_FILE).read_text())
    assert (
        doc["format"] == "shardsafe"
        and doc["version"] == PLAIN_FORMAT_VERSION
        and doc["values"] == {"step": 3}
    )
    assert doc["tensors"]["a"]["shape"] == [10] and doc["tensors"]["a"]["dtype"] == "float32"


def test_max_file_bytes_splits_a_rank_into_several_files(tmp_path):
    config = checkpoint.CheckpointerConfig(
        writer_config=checkpoint.CheckpointWriterConfig(max_file_bytes=1000)
    )
    ckpt = checkpoint.make_sync_checkpointer(config)
    state = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    ckpt.save(state, str(tmp_path / "c"))
    shards = [n for n in os.listdir(tmp_path / "c") if SHARD_FILE_RE.fullmatch(n)]
    assert len(shards) == 3
    full = ckpt.load(str(tmp_path / "c"))
    assert all(torch.equal(full[k], v) for k, v in state.items())


def test_default_map_location_places_untargeted_tensors(ckpt, tmp_path):
    ckpt.save({"a": torch.ones(2)}, str(tmp_path / "c"))
    out = ckpt.load(str(tmp_path / "c"), default_map_location=lambda t: t.to(torch.float64))
    assert out["a"].dtype == torch.float64
    assert ckpt.load(str(tmp_path / "c"), default_map_location="cpu")["a"].device.type == "cpu"


def test_incomplete_checkpoint_is_reported(ckpt, tmp_path):
    ckpt.save({"a": torch.ones(2)}, str(tmp_path / "c"))
    os.unlink(tmp_path / "c" / METADATA_FILE)
    with pytest.raises(IncompleteCheckpointError, match="incomplete.*metadata.json"):
        ckpt.load(str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load(str(tmp_path / "nothing-here"))


def test_strict_lists_missing_keys(ckpt, tmp_path):
    ckpt.save({"a": torch.ones(2)}, str(tmp_path / "c"))
    target = {"a": torch.zeros(2), "b": torch.zeros(2), "c": {"d": 1}}
    with pytest.raises(MissingKeysError) as info:
        ckpt.load(str(tmp_path / "c"), state_dict=target, strict=True)
    assert info.value.missing == ["b", "c.d"] and "'b', 'c.d'" in str(info.value)  # dicts are walked
    assert torch.equal(target["a"], torch.zeros(2))  # nothing was read before the error
    out = ckpt.load(str(tmp_path / "c"), state_dict=target)  # non-strict: load what is there
    assert torch.equal(out["a"], torch.ones(2)) and torch.equal(out["b"], torch.zeros(2))


def test_shape_and_dtype_mismatch_name_the_key(ckpt, tmp_path):
    ckpt.save({"layer": {"w": torch.ones(2, 3)}}, str(tmp_path / "c"))
    with pytest.raises(
        MismatchError, match=r"'layer\.w'.*shape \[2, 3\] dtype float32.*shape \[3, 2\] dtype float32"
    ):
        ckpt.load(str(tmp_path / "c"), state_dict={"layer": {"w": torch.zeros(3, 2)}})
    with pytest.raises(MismatchError, match=r"'layer\.w'.*dtype float32.*dtype bfloat16"):
        ckpt.load(str(tmp_path / "c"), state_dict={"layer": {"w": torch.zeros(2, 3, dtype=torch.bfloat16)}})


def test_overwrite_is_refused_then_replaces_whole(ckpt, tmp_path):
    path = str(tmp_path / "c")
    ckpt.save({"a": torch.ones(2), "old": torch.zeros(1)}, path)
    old_files = set(os.listdir(path))
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        ckpt.save({"a": torch.full((2,), 2.0)}, path)
    assert torch.equal(ckpt.load(path)["a"], torch.ones(2))
    ckpt.save({"a": torch.full((2,), 2.0)}, path, overwrite=True)
    full = ckpt.load(path)
    assert set(full) == {"a"} and torch.equal(full["a"], torch.full((2,), 2.0))
    assert not (set(os.listdir(path)) & (old_files - {METADATA_FILE}))  # old shard files are gone


def test_non_json_leaf_needs_opt_in(ckpt, tmp_path):
    class Opaque:
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Opaque)

    with pytest.raises(PickleNotAllowedError, match=r"key 'extra\.obj'.*allow_pickle=True"):
        ckpt.save({"w": torch.ones(1), "extra": {"obj": Opaque(), "t": torch.ones(1)}}, str(tmp_path / "c"))
    assert not (tmp_path / "c" / METADATA_FILE).exists()
    ckpt.save({"w": torch.ones(1), "obj": {1, 2}}, str(tmp_path / "p"), allow_pickle=True)
    with pytest.raises(PickleNotAllowedError, match=r"key 'obj' holds a pickled value"):
        ckpt.load(str(tmp_path / "p"))
    assert ckpt.load(str(tmp_path / "p"), allow_pickle=True)["obj"] == {1, 2}


def test_clashing_keys_and_bad_arguments(ckpt, tmp_path):
    with pytest.raises(InvalidStateDictError, match=r"both flatten to the key 'a\.b'"):
        ckpt.save({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, str(tmp_path / "c"))
    with pytest.raises(TypeError, match="swapped"):
        ckpt.save(str(tmp_path / "c"), {"a": torch.ones(1)})
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['overwite'\]"):
        ckpt.save({"a": torch.ones(1)}, str(tmp_path / "c"), overwite=True)
    ckpt.close()
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.save({"a": torch.ones(1)}, str(tmp_path / "c"))


def test_unchanged_structure_reuses_the_plan(ckpt, tmp_path):
    ckpt.save({"a": torch.ones(3), "step": 1}, str(tmp_path / "1"))
    assert ckpt.last_save.plan_reused is False
    ckpt.save({"a": torch.full((3,), 2.0), "step": 2}, str(tmp_path / "2"))
    assert ckpt.last_save.plan_reused is True
    ckpt.save({"a": torch.ones(4), "step": 3}, str(tmp_path / "3"))
    assert ckpt.last_save.plan_reused is False
    assert ckpt.load(str(tmp_path / "2"))["step"] == 2
    assert torch.equal(ckpt.load(str(tmp_path / "2"))["a"], torch.full((3,), 2.0))


def test_parameters_that_require_grad_load_in_place(ckpt, tmp_path):
    model = torch.nn.Linear(4, 3)
    ckpt.save({"w": model.weight.detach().clone() + 1}, str(tmp_path / "c"))
    ckpt.load(str(tmp_path / "c"), state_dict={"w": model.weight})  # the Parameter itself, requires_grad=True
    assert model.weight.requires_grad
    assert torch.equal(model.weight.detach(), ckpt.load(str(tmp_path / "c"))["w"])
