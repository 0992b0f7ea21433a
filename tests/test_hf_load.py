"""Hugging Face safetensors layouts loaded straight into (sharded) targets by `ckpt.load`."""

from __future__ import annotations

import json
import os

import fsspec
import pytest
import torch
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub import save_torch_state_dict
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import checkpoint
from checkpoint import CheckpointerConfig
from checkpoint.testing.ranks import run_ranks
from planners.errors import IncompleteCheckpointError, InvalidCheckpointError, MismatchError, MissingKeysError

LAYERS = 4
WIDTH = 256


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))
        self.head = nn.Linear(WIDTH, 10)  # 10 rows: uneven over 3 ranks


class CountingFileSystem(DirFileSystem):
    """Local files under a `countfs://` URL, counting every byte handed back by a read."""

    protocol = "countfs"
    bytes_read = 0

    def __init__(self, **kwargs) -> None:
        super().__init__(path="/", fs=LocalFileSystem(), **kwargs)

    def _join(self, path):  # URLs carry absolute local paths: nothing to join
        if isinstance(path, str):
            return self._strip_protocol(path)
        return [self._join(p) for p in path]

    def _relpath(self, path):
        return path

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        CountingFileSystem.bytes_read += len(data)
        return data

    def cat_ranges(self, paths, starts, ends, **kwargs):
        got = [self.cat_file(p, s, e) for p, s, e in zip(paths, starts, ends)]
        return got


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in Stack().state_dict().items()}


def _header_bytes(directory: str) -> int:
    """Index plus every file's length prefix and header: what each rank reads besides tensor bytes."""
    total = 0
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            if name.endswith(".json"):
                total += len(f.read())
            else:
                total += 8 + int.from_bytes(f.read(8), "little")
    return total


def _load_fsdp(rank: int, world_size: int, directory: str, expected: dict) -> tuple[int, int]:
    fsspec.register_implementation("countfs", CountingFileSystem, clobber=True)
    torch.manual_seed(100 + rank)
    model = Stack()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    target = model.state_dict()
    ckpt = checkpoint.make_sync_checkpointer()
    CountingFileSystem.bytes_read = 0
    ckpt.load("countfs://" + directory, state_dict=target, strict=True)
    ckpt.close()
    share = 0
    for key, value in model.state_dict().items():
        assert isinstance(value, DTensor), key
        local = value.to_local()
        share += local.numel() * local.element_size()
        assert torch.equal(value.full_tensor(), expected[key]), key
    return CountingFileSystem.bytes_read, share


@pytest.mark.multiproc
def test_sharded_hf_layout_loads_into_fsdp2_on_3_ranks_reading_each_ranks_share(tmp_path):
    directory = str(tmp_path / "hf")
    os.makedirs(directory)
    expected = _model_state(seed=0)
    save_torch_state_dict(expected, directory, max_shard_size="300KB")
    shards = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in os.listdir(directory)
    total = sum(v.numel() * v.element_size() for v in expected.values())
    results = run_ranks(_load_fsdp, 3, directory, expected)
    headers = _header_bytes(directory)
    assert sum(share for _, share in results) == total
    for rank, (read, share) in enumerate(results):
        # Each rank reads its own rows, the index and the headers. The loader fetches runs closer than
        # COALESCE_GAP_BYTES in one request, so the small gaps between a rank's rows of the small
        # tensors (biases, the 10-row head) come along: a few percent, never the other ranks' share.
        assert share + headers <= read <= 1.05 * share + headers, (rank, read, share, headers)
        assert read < total / 2, (rank, read, total)


def test_single_file_layout_loads_whole_and_into_a_target(tmp_path):
    expected = _model_state(seed=1)
    save_torch_state_dict(expected, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    ckpt = checkpoint.make_sync_checkpointer()
    whole = ckpt.load(str(tmp_path))
    assert sorted(whole) == sorted(expected)
    assert all(torch.equal(whole[k], expected[k]) for k in expected)
    model = Stack()
    ckpt.load(str(tmp_path), state_dict=model.state_dict(), strict=True)
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_key_map_prefix_strips_and_callable_renames(tmp_path):
    expected = _model_state(seed=2)
    prefixed = {f"model.{k}": v for k, v in expected.items()}
    prefixed["lm_head.weight"] = torch.arange(6, dtype=torch.int64)
    save_torch_state_dict(prefixed, str(tmp_path), max_shard_size="500KB")
    ckpt = checkpoint.make_sync_checkpointer()
    model = Stack()
    target = {**model.state_dict(), "lm_head.weight": torch.zeros(6, dtype=torch.int64)}
    ckpt.load(str(tmp_path), state_dict=target, key_map="model.", strict=True)
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert torch.equal(target["lm_head.weight"], torch.arange(6))  # keys without the prefix keep their name
    renamed = {f"net.{k}": torch.zeros_like(v) for k, v in expected.items()}
    ckpt.load(
        str(tmp_path),
        state_dict=renamed,
        key_map=lambda k: "net." + k.removeprefix("model.") if k.startswith("model.") else None,
        strict=True,
    )
    assert all(torch.equal(renamed[f"net.{k}"], expected[k]) for k in expected)
    with pytest.raises(MissingKeysError, match="layers.0.weight"):  # without the map the names differ
        ckpt.load(str(tmp_path), state_dict=model.state_dict(), strict=True)
    with pytest.raises(InvalidCheckpointError, match="both"):
        ckpt.load(str(tmp_path), state_dict={}, key_map=lambda k: "same")


def test_dtype_and_shape_mismatches_raise_the_usual_error(tmp_path):
    save_torch_state_dict({"w": torch.ones(4, 4, dtype=torch.bfloat16)}, str(tmp_path))
    ckpt = checkpoint.make_sync_checkpointer()
    with pytest.raises(MismatchError, match="'w'"):
        ckpt.load(str(tmp_path), state_dict={"w": torch.zeros(4, 4)})
    with pytest.raises(MismatchError, match="'w'"):
        ckpt.load(str(tmp_path), state_dict={"w": torch.zeros(4, 5, dtype=torch.bfloat16)})


def test_key_map_on_a_shardsafe_checkpoint_is_refused(tmp_path):
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.ones(2)}, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="Hugging Face layouts only"):
        ckpt.load(str(tmp_path / "c"), state_dict={"w": torch.zeros(2)}, key_map="model.")


@pytest.mark.parametrize(
    "index, problem",
    [
        ({"weight_map": {"w": "../other/model.safetensors"}}, "plain"),
        ({"weight_map": {"w": "/etc/model.safetensors"}}, "plain"),
        ({"weight_map": {"x": "model-00001-of-00001.safetensors"}}, "lacks it"),
        ({"metadata": {}}, "weight_map"),
    ],
)
def test_hostile_index_is_refused(tmp_path, index, problem):
    save_torch_state_dict({"w": torch.ones(3)}, str(tmp_path))
    os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpointError, match=problem):
        checkpoint.make_sync_checkpointer().load(str(tmp_path))


def test_a_shard_missing_from_the_index_is_an_incomplete_layout(tmp_path):
    save_torch_state_dict({"a": torch.ones(300), "b": torch.zeros(300)}, str(tmp_path), max_shard_size="1KB")
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(IncompleteCheckpointError, match="model-00002-of-00002.safetensors"):
        checkpoint.make_sync_checkpointer().load(str(tmp_path))


def test_hostile_header_and_non_regular_file_are_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(InvalidCheckpointError, match="header length"):
        checkpoint.make_sync_checkpointer().load(str(bad))
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "model.safetensors")
    with pytest.raises(InvalidCheckpointError, match="not a regular file"):
        checkpoint.make_sync_checkpointer().load(str(fifo))


def test_empty_directory_is_still_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.make_sync_checkpointer().load(str(tmp_path))


@pytest.mark.s3
def test_sharded_layout_on_s3_loads_and_exports_back(tmp_path, s3_endpoint, s3_bucket, s3_fs):
    expected = _model_state(seed=3)
    (tmp_path / "hf").mkdir()
    save_torch_state_dict(expected, str(tmp_path / "hf"), max_shard_size="400KB")
    s3_fs.put(str(tmp_path / "hf") + "/", f"{s3_bucket}/hf/", recursive=True)
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=s3_endpoint.storage_options))
    model = Stack()
    ckpt.load(f"{s3_bucket}/hf", state_dict=model.state_dict(), strict=True)
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    ckpt.save({"model": model.state_dict()}, f"{s3_bucket}/ckpt")
    checkpoint.export_hf(
        f"{s3_bucket}/ckpt", f"{s3_bucket}/out", prefix="model.", storage_options=s3_endpoint.storage_options
    )
    back = Stack()
    ckpt.load(
        f"{s3_bucket}/out", state_dict=back.state_dict(), strict=True
    )  # the export is a loadable layout
    assert all(torch.equal(back.state_dict()[k], expected[k]) for k in expected)
