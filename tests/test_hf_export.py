"""`checkpoint.export_hf`: consolidated Hugging Face layouts, streamed, readable by safetensors and huggingface_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import load_torch_model
from safetensors import safe_open

import checkpoint
from checkpoint.testing.ranks import run_ranks
from checkpoint.tools.hf_export import export_hf, parse_size, plan_files
from planners.errors import CheckpointExistsError
from tests.fsdp_workers import MLP, save_trained


def _read_all(directory: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, metadata = {}, []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                metadata.append(f.metadata())
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors, metadata


@pytest.mark.multiproc
def test_fsdp_checkpoint_exports_sharded_with_prefix_and_loads_into_a_module(tmp_path):
    path, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    expected = run_ranks(save_trained, 2, "fsdp", path)[0]["model"]  # chunks from 2 ranks per tensor
    result = export_hf(path, out, prefix="model.", max_shard_size="500B")
    names = sorted(os.listdir(out))
    assert len(names) == result.tensors + 1 == 5  # one tensor per file here, plus the index
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert (
        sorted(index["weight_map"])
        == sorted(expected)
        == ["down.bias", "down.weight", "up.bias", "up.weight"]
    )
    assert (
        index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values()) == result.total_bytes
    )
    assert set(index["weight_map"].values()) == {f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)}
    tensors, metadata = _read_all(out)
    assert metadata == [{"format": "pt"}] * 4
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    module = MLP()
    missing, unexpected = load_torch_model(module, out, strict=True)
    assert (missing, unexpected) == ([], [])
    assert all(torch.equal(module.state_dict()[k], expected[k]) for k in expected)
    assert "step" in result.skipped and "rng" in result.skipped  # values and rank-local entries stay out


def test_single_file_dtype_casts_floats_only(tmp_path):
    state = {
        "w": torch.randn(5, 3),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(4, dtype=torch.float16),
        "step": 12,
    }
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(state, str(tmp_path / "ckpt"))
    result = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype="bfloat16")
    assert result.files == ("model.safetensors",) and sorted(os.listdir(tmp_path / "hf")) == [
        "model.safetensors"
    ]
    tensors, metadata = _read_all(str(tmp_path / "hf"))
    assert metadata == [{"format": "pt"}]
    assert torch.equal(tensors["w"], state["w"].to(torch.bfloat16))
    assert torch.equal(tensors["half"], state["half"].to(torch.bfloat16))
    assert tensors["ids"].dtype == torch.int64 and torch.equal(tensors["ids"], state["ids"])
    assert tensors["mask"].dtype == torch.bool and torch.equal(tensors["mask"], state["mask"])

    module = torch.nn.Linear(3, 5, bias=False)
    ckpt.save({"model": {"weight": state["w"]}}, str(tmp_path / "lin"))
    export_hf(str(tmp_path / "lin"), str(tmp_path / "lin-hf"), prefix="model.")
    load_torch_model(module, str(tmp_path / "lin-hf"), strict=True)
    assert torch.equal(module.weight.detach(), state["w"])


def test_existing_output_is_refused_then_replaced_without_stale_shards(tmp_path):
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"a": torch.ones(100), "b": torch.zeros(100)}, str(tmp_path / "ckpt"))
    out = str(tmp_path / "hf")
    export_hf(str(tmp_path / "ckpt"), out, max_shard_size=400)
    assert len(os.listdir(out)) == 3
    with pytest.raises(CheckpointExistsError, match="already holds"):
        export_hf(str(tmp_path / "ckpt"), out)
    export_hf(str(tmp_path / "ckpt"), out, overwrite=True)
    assert os.listdir(out) == ["model.safetensors"]  # the old index would shadow the new file
    with pytest.raises(ValueError, match="prefix 'nope.'"):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "x"), prefix="nope.")
    with pytest.raises(ValueError, match="floating-point"):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "x"), dtype="int8")


def test_sizes_and_file_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123 and parse_size("1.5KB") == 1500
    with pytest.raises(ValueError, match="not a size"):
        parse_size("5 gigs")
    assert plan_files([3, 3, 3], 6) == [[0, 1], [2]]
    assert plan_files([10, 1, 1], 5) == [[0], [1, 2]]  # a tensor bigger than the limit gets a file of its own
    assert plan_files([], 5) == [[]]


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import torch, checkpoint
    from checkpoint.tools.hf_export import export_hf

    def anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    path, out = sys.argv[1], sys.argv[2]
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({f"layer{i}": torch.full((1024, 1024), float(i)) for i in range(16)}, path)  # 16 x 4 MiB
    ckpt.close()
    export_hf(path, out + "-warm", dtype="bfloat16", max_shard_size="20MB")  # first-use allocations out
    base = peak = anon_kib()
    done = False
    def sample():
        global peak
        while not done:
            peak = max(peak, anon_kib())
            time.sleep(0.002)
    t = threading.Thread(target=sample)
    t.start()
    export_hf(path, out, dtype="bfloat16", max_shard_size="20MB")
    done = True
    t.join()
    print((peak - base) * 1024)
    """
)


def test_export_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    got = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    growth = int(got.stdout.split()[-1])
    model_bytes, largest = 64 * 2**20, 4 * 2**20
    # one tensor read (a pread buffer), its copy and its cast, plus allocator slack: a few times
    # the largest tensor, and well under the model
    assert growth < 6 * largest < model_bytes / 2, growth
    tensors, _ = _read_all(str(tmp_path / "hf"))
    assert len(tensors) == 16 and torch.equal(
        tensors["layer7"], torch.full((1024, 1024), 7.0, dtype=torch.bfloat16)
    )


def test_cli_export_hf_json_output_and_exit_codes(tmp_path):
    from click.testing import CliRunner

    from checkpoint.tools.cli import main

    state = {"model": {"w": torch.randn(4, 4)}, "step": 3}
    checkpoint.make_sync_checkpointer().save(state, str(tmp_path / "ckpt"))
    out = str(tmp_path / "hf")
    args = ["export-hf", str(tmp_path / "ckpt"), out, "--prefix", "model.", "--dtype", "bfloat16"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["files"], doc["tensors"], doc["skipped"]) == (["model.safetensors"], 1, ["step"])
    tensors, _ = _read_all(out)
    assert torch.equal(tensors["w"], state["model"]["w"].to(torch.bfloat16))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(main, [*args, "--overwrite", "-q"]).exit_code == 0
    bad = CliRunner().invoke(
        main, ["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "x"), "--prefix", "zz"]
    )
    assert bad.exit_code == 2 and "prefix 'zz'" in bad.output
    missing = CliRunner().invoke(main, ["export-hf", str(tmp_path / "nothing"), str(tmp_path / "y")])
    assert missing.exit_code == 2 and "no checkpoint" in missing.output
