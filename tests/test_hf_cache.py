"""Issue 19, case 15: Hugging Face cache snapshots load; links out of the repository and repeated keys do not.

The cache is built the way huggingface_hub lays it out (`models--org--name/blobs/<sha256>`,
`refs/main`, `snapshots/<rev>/<file> -> ../../blobs/<sha256>`), from real safetensors files written
by `save_torch_state_dict`; `scan_cache_dir` and `try_to_load_from_cache` confirm the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict, scan_cache_dir, try_to_load_from_cache

import checkpoint
from planners.errors import InvalidCheckpointError

REPO_ID = "acme/tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"
INDEX = "model.safetensors.index.json"


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a": torch.randn(300), "b": torch.arange(300, dtype=torch.float32), "c": torch.ones(40, 2)}


def _cache_repo(cache: Path, files: dict[str, bytes], repo_id: str = REPO_ID) -> Path:
    """A cache repository holding `files` at REVISION; returns its snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / name)
    return snapshot


def _exported(tmp_path: Path, state: dict[str, torch.Tensor], **kwargs) -> dict[str, bytes]:
    out = tmp_path / "export"
    out.mkdir()
    save_torch_state_dict(state, str(out), **kwargs)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _load(directory: Path) -> dict:
    return checkpoint.make_sync_checkpointer().load(str(directory))


@pytest.mark.parametrize("max_shard_size", ["1KB", "1GB"])  # an index and three shards; one model.safetensors
def test_a_cache_snapshot_loads_exactly(tmp_path: Path, max_shard_size: str) -> None:
    state = _state()
    files = _exported(tmp_path, state, max_shard_size=max_shard_size)
    assert (INDEX in files) == (max_shard_size == "1KB")
    cache = tmp_path / "hub"
    snapshot = _cache_repo(cache, files)
    found = try_to_load_from_cache(REPO_ID, next(iter(files)), cache_dir=str(cache))
    assert found == str(snapshot / next(iter(files)))
    (repo,) = scan_cache_dir(cache).repos
    assert repo.repo_id == REPO_ID and {f.file_name for r in repo.revisions for f in r.files} == set(files)
    assert all((snapshot / n).is_symlink() for n in files)

    loaded = _load(snapshot)
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def _link_out(snapshot: Path, name: str, target: Path | str) -> None:
    os.remove(snapshot / name)
    os.symlink(target, snapshot / name)


def test_a_link_out_of_the_cache_repository_is_refused(tmp_path: Path) -> None:
    files = _exported(tmp_path, _state(), max_shard_size="1KB")
    cache = tmp_path / "hub"
    snapshot = _cache_repo(cache, files)
    other = _cache_repo(cache, files, repo_id="acme/other")  # a sibling repository: still outside
    shard = next(n for n in files if n.endswith(".safetensors"))
    _link_out(snapshot, shard, other / shard)
    with pytest.raises(
        InvalidCheckpointError, match=rf"{shard}: is a symbolic link to .*models--acme--other.*, outside"
    ):
        _load(snapshot)
    _link_out(snapshot, shard, "/dev/zero")  # a device, and outside too
    with pytest.raises(InvalidCheckpointError, match=rf"{shard}: is a symbolic link to /dev/zero, outside"):
        _load(snapshot)


def test_a_link_to_a_fifo_inside_the_repository_is_refused(tmp_path: Path) -> None:
    files = _exported(tmp_path, _state(), max_shard_size="1GB")
    snapshot = _cache_repo(tmp_path / "hub", files)
    fifo = snapshot.parent.parent / "blobs" / "fifo"
    os.mkfifo(fifo)
    _link_out(snapshot, "model.safetensors", "../../blobs/fifo")
    with pytest.raises(InvalidCheckpointError, match="model.safetensors: is not a regular file"):
        _load(snapshot)


def test_a_link_in_a_plain_model_directory_stays_inside_it(tmp_path: Path) -> None:
    files = _exported(tmp_path, _state(), max_shard_size="1GB")
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes(files["model.safetensors"])
    os.symlink(tmp_path / "elsewhere.safetensors", model / "model.safetensors")
    with pytest.raises(
        InvalidCheckpointError,
        match="model.safetensors: is a symbolic link to .*elsewhere.safetensors, outside",
    ):
        _load(model)
    os.remove(model / "model.safetensors")
    (model / "blob").write_bytes(files["model.safetensors"])
    os.symlink("blob", model / "model.safetensors")  # a link to a file inside the directory is fine
    assert torch.equal(_load(model)["b"], _state()["b"])


def test_a_key_repeated_in_the_index_is_refused_naming_both_files(tmp_path: Path) -> None:
    files = _exported(tmp_path, _state(), max_shard_size="1KB")
    weight_map = json.loads(files[INDEX])["weight_map"]
    file_a, file_c = weight_map["a"], weight_map["c"]
    assert file_a != file_c
    index = files[INDEX].decode()
    entry = f'"a": "{file_a}"'
    assert index.count(entry) == 1
    files[INDEX] = index.replace(entry, f'{entry}, "a": "{file_c}"').encode()  # last one wins in json.loads
    snapshot = _cache_repo(tmp_path / "hub", files)
    with pytest.raises(
        InvalidCheckpointError, match=rf"key 'a' appears twice, mapped to '{file_a}' and '{file_c}'"
    ):
        _load(snapshot)


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    header, data, offset = {}, b"", 0
    for key, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def test_a_key_in_two_shard_headers_is_refused_naming_both_files(tmp_path: Path) -> None:
    files = {
        "model-00001-of-00002.safetensors": _safetensors({"a": torch.zeros(4), "b": torch.ones(4)}),
        "model-00002-of-00002.safetensors": _safetensors({"a": torch.full((4,), 7.0), "c": torch.ones(2)}),
        INDEX: json.dumps(
            {
                "metadata": {"total_size": 40},
                "weight_map": {
                    "a": "model-00002-of-00002.safetensors",
                    "b": "model-00001-of-00002.safetensors",
                    "c": "model-00002-of-00002.safetensors",
                },
            }
        ).encode(),
    }
    snapshot = _cache_repo(tmp_path / "hub", files)
    with pytest.raises(
        InvalidCheckpointError,
        match="key 'a' is in both model-00001-of-00002.safetensors and model-00002-of-00002.safetensors",
    ):
        _load(snapshot)
