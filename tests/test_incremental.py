"""Incremental checkpoints (issue 27): references instead of rewrites, loads, verify, hostile references.

One process here; FSDP2 on real ranks and retention under SIGKILL are in tests/test_incremental_ranks.py.
"""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch

import checkpoint
import planners.metadata_parse
from planners.digest import seal
from planners.errors import CheckpointPathError, InvalidCheckpointError, MissingReferenceError
from planners.metadata import METADATA_FILE
from planners.metadata_parse import parse_metadata

FROZEN = torch.arange(200_000, dtype=torch.float32).reshape(400, 500) / 7  # 800 KB: two checksum blocks


def _state(step: int) -> dict:
    """A LoRA-like state: a frozen base (unchanged bytes), an adapter and its optimizer moment (changed)."""
    g = torch.Generator().manual_seed(step)
    return {
        "model": {
            "base": FROZEN.clone(),
            "emb": FROZEN[:10].to(torch.bfloat16),
            "lora": torch.randn(8, 8, generator=g),
        },
        "optim": {"exp_avg": torch.randn(8, 8, generator=g)},
        "step": step,
        "rng": checkpoint.RankLocal(torch.tensor([step, 7])),
    }


def _doc(path: str) -> dict:
    with open(os.path.join(path, METADATA_FILE), "rb") as f:
        return json.loads(f.read())


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], dict):
            _same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


@pytest.fixture
def chain(ckpt, tmp_path):
    """step-1 (full, hashes recorded), step-2 (base step-1), step-3 (base step-2): the run root and bytes written."""
    root = str(tmp_path / "run")
    written = []
    ckpt.save(_state(1), f"{root}/step-1", incremental=True)
    written.append(ckpt.last_save.bytes_written)
    ckpt.save(_state(2), f"{root}/step-2", base=f"{root}/step-1")
    written.append(ckpt.last_save.bytes_written)
    ckpt.save(_state(3), f"{root}/step-3", base=f"{root}/step-2")
    written.append(ckpt.last_save.bytes_written)
    return root, written


def test_unchanged_chunks_are_referenced_one_hop_and_load_exactly(ckpt, chain):
    root, written = chain
    frozen_bytes = FROZEN.numel() * 4 + 10 * 500 * 2
    assert written[0] > frozen_bytes and written[1] < 2000 and written[2] < 2000
    doc = _doc(f"{root}/step-3")
    assert doc["version"] == 3
    step1_files = [n for n in os.listdir(f"{root}/step-1") if n.startswith("shard-")]
    # One hop: step-3 points at the file step-1 wrote, not at step-2 (which only referenced it).
    assert doc["references"]["files"] == {
        step1_files[0]: {"checkpoint": "step-1", "nbytes": os.path.getsize(f"{root}/step-1/{step1_files[0]}")}
    }
    assert {c["file"] for c in doc["tensors"]["model.base"]["chunks"]} == {step1_files[0]}
    assert all(c["file"] != step1_files[0] for c in doc["tensors"]["model.lora"]["chunks"])
    for step in (1, 2, 3):
        expected = _state(step)
        loaded = ckpt.load(f"{root}/step-{step}")
        assert [t.tolist() for t in loaded.pop("rng")] == [[step, 7]]
        expected.pop("rng")
        _same(loaded, expected)
    target = _state(99)  # a target: filled in place from the referenced and the written bytes
    filled = ckpt.load(f"{root}/step-3", target, strict=True)
    expected = _state(3)
    assert torch.equal(filled["model"]["base"], FROZEN) and torch.equal(
        filled["model"]["lora"], expected["model"]["lora"]
    )
    assert torch.equal(filled["rng"].value, torch.tensor([3, 7]))


def test_verify_checks_the_referenced_bytes_too(chain):
    root, _ = chain
    report = checkpoint.verify(f"{root}/step-3")
    assert (report.ok, report.problems, report.leftovers) == (True, (), ())
    assert report.files_checked == 2  # its own file and step-1's
    assert report.bytes_checked == FROZEN.numel() * 4 + 10 * 500 * 2 + 2 * 8 * 8 * 4 + 16
    # A flipped byte in the referenced file is found through step-3.
    name = next(n for n in os.listdir(f"{root}/step-1") if n.startswith("shard-"))
    base = _doc(f"{root}/step-3")["tensors"]["model.base"]["chunks"][0]
    with open(f"{root}/step-1/{name}", "r+b") as f:
        f.seek(base["offset_bytes"] + 600_000)  # the frozen base, in its second checksum block
        f.write(b"\xff")
    report = checkpoint.verify(f"{root}/step-3")
    assert not report.ok
    assert (
        len(report.problems) == 1
        and name in report.problems[0]
        and "referenced from checkpoint 'step-1'" in report.problems[0]
    )


def test_a_deleted_referenced_file_names_the_file_and_the_checkpoint(ckpt, chain):
    root, _ = chain
    name = next(n for n in os.listdir(f"{root}/step-1") if n.startswith("shard-"))
    os.remove(f"{root}/step-1/{name}")
    with pytest.raises(
        MissingReferenceError, match=rf"shard file {name}, referenced from checkpoint 'step-1' .* is missing"
    ):
        ckpt.load(f"{root}/step-3")
    assert isinstance(MissingReferenceError("x"), FileNotFoundError)
    report = checkpoint.verify(f"{root}/step-3")
    assert report.problems == (
        f"referenced file {name} (checkpoint 'step-1'): missing; loads of this checkpoint fail until it is restored",
    )


def test_a_base_not_in_the_run_root_or_the_path_itself_is_refused(ckpt, tmp_path):
    ckpt.save(_state(1), str(tmp_path / "a" / "step-1"), incremental=True)
    with pytest.raises(
        CheckpointPathError, match=r"is not another checkpoint of the run of .*sibling directory"
    ):
        ckpt.save(_state(2), str(tmp_path / "b" / "step-2"), base=str(tmp_path / "a" / "step-1"))
    with pytest.raises(CheckpointPathError, match=r"is not another checkpoint of the run"):
        ckpt.save(
            _state(2), str(tmp_path / "a" / "step-1"), base=str(tmp_path / "a" / "step-1"), overwrite=True
        )
    with pytest.raises(TypeError, match=r"save\(incremental=...\) must be a bool"):
        ckpt.save(_state(2), str(tmp_path / "a" / "step-2"), incremental=1)
    assert not os.path.exists(tmp_path / "b" / "step-2")


def test_a_base_in_flight_or_failed_is_never_referenced(ckpt, tmp_path, caplog):
    root = tmp_path / "run"
    ckpt.save(_state(1), str(root / "step-1"), incremental=True)
    os.rename(root / "step-1" / METADATA_FILE, root / "metadata.aside")  # step-1 is now an uncommitted save
    with caplog.at_level(logging.WARNING, logger="checkpoint.save.incremental"):
        ckpt.save(_state(1), str(root / "step-2"), base=str(root / "step-1"))
    assert ckpt.last_save.bytes_written > FROZEN.numel() * 4  # everything written
    doc = _doc(str(root / "step-2"))
    assert doc["version"] == 2 and doc["references"]["files"] == {}
    assert any("base step-1 is not referenced" in r.getMessage() for r in caplog.records)
    os.remove(root / "metadata.aside")
    _same(
        {k: v for k, v in ckpt.load(str(root / "step-2")).items() if k != "rng"},
        {k: v for k, v in _state(1).items() if k != "rng"},
    )


def test_same_bytes_at_another_dtype_or_box_are_written(ckpt, tmp_path):
    root = tmp_path / "run"
    ckpt.save({"w": FROZEN.clone()}, str(root / "step-1"), incremental=True)
    # Same bytes reinterpreted as int32, and the same values at another shape: nothing matches.
    ckpt.save({"w": FROZEN.view(torch.int32).clone()}, str(root / "step-2"), base=str(root / "step-1"))
    assert ckpt.last_save.bytes_written > FROZEN.numel() * 4
    ckpt.save({"w": FROZEN.reshape(500, 400).clone()}, str(root / "step-3"), base=str(root / "step-1"))
    assert ckpt.last_save.bytes_written > FROZEN.numel() * 4
    assert torch.equal(ckpt.load(str(root / "step-2"))["w"], FROZEN.view(torch.int32))


def test_async_incremental_save_references_from_the_writer_process(tmp_path):
    root = tmp_path / "run"
    ckpt = checkpoint.make_async_checkpointer()
    try:
        ckpt.save(_state(1), str(root / "step-1"), incremental=True)[1].result(timeout=120)
        ckpt.save(_state(2), str(root / "step-2"), base=str(root / "step-1"))[1].result(timeout=120)
        assert ckpt.last_save.bytes_written < 2000
        loaded = ckpt.load(str(root / "step-2"))
    finally:
        ckpt.close()
    assert torch.equal(loaded["model"]["base"], FROZEN) and torch.equal(
        loaded["optim"]["exp_avg"], _state(2)["optim"]["exp_avg"]
    )
    assert _doc(str(root / "step-2"))["references"]["files"] != {}


def test_an_old_reader_refuses_the_new_version_clearly(chain, monkeypatch):
    root, _ = chain
    with open(os.path.join(root, "step-3", METADATA_FILE), "rb") as f:
        data = f.read()
    assert parse_metadata(data, where="x").version == 3
    monkeypatch.setattr(planners.metadata_parse, "FORMAT_VERSION", 2)  # the reader of format version 2
    with pytest.raises(
        InvalidCheckpointError, match=r"format version 3 is newer than this reader \(2\); upgrade shardsafe"
    ):
        parse_metadata(data, where="x")


# --- hostile references -------------------------------------------------------------------------


def _hostile(root: str, change) -> None:
    doc = _doc(f"{root}/step-3")
    doc.pop("digest")
    change(doc)
    with open(f"{root}/step-3/{METADATA_FILE}", "wb") as f:
        f.write(seal(doc))


def _ref_name(doc: dict) -> str:
    return next(iter(doc["references"]["files"]))


def _retarget(checkpoint_name: str):
    def change(doc: dict) -> None:
        doc["references"]["files"][_ref_name(doc)]["checkpoint"] = checkpoint_name

    return change


def _own_file(doc: dict) -> None:
    """A reference to a file of this very save: a cycle."""
    own = next(iter(doc["files"]))
    doc["references"]["files"][own] = doc["references"]["files"].pop(_ref_name(doc))


def _huge_range(doc: dict) -> None:
    """A referenced range far past the end of the referenced file."""
    for c in (*doc["tensors"]["model.base"]["chunks"], *doc["references"]["chunks"]["model.base"]):
        c["offset_bytes"] = 1 << 40


def _version_2(doc: dict) -> None:
    doc["version"] = 2


def _overlap(doc: dict) -> None:
    base = doc["tensors"]["model.base"]["chunks"][0]
    emb = doc["tensors"]["model.emb"]["chunks"][0]
    emb["offset_bytes"] = base["offset_bytes"]
    for e in doc["references"]["chunks"]["model.emb"]:
        e["offset_bytes"] = base["offset_bytes"]


def _index_not_a_chunk(doc: dict) -> None:
    doc["references"]["chunks"]["model.base"][0]["offset_bytes"] += 4


def _chain(doc: dict) -> None:
    """A reference to a file of another run, reached through a path."""
    doc["references"]["files"][_ref_name(doc)]["checkpoint"] = "step-2/../../other-run/step-1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_retarget("../other-run"), r"checkpoint '../other-run' is not one directory name of the run root"),
        (_retarget("/etc"), r"checkpoint '/etc' is not one directory name of the run root"),
        (_retarget("s3://bucket/run/step-1"), r"is not one directory name of the run root"),
        (_retarget(".."), r"checkpoint '..' is not one directory name"),
        (_chain, r"is not one directory name of the run root"),
        (_own_file, r"belongs to this save: a checkpoint cannot reference itself"),
        (_huge_range, r"lie outside file"),
        (_version_2, r"version 2 metadata cannot reference files"),
        (_overlap, r"overlap those of key"),
        (_index_not_a_chunk, r"indexed chunk at \[0, 0\] differs from every chunk the key lists"),
    ],
    ids=[
        "parent",
        "absolute",
        "url",
        "dotdot",
        "path",
        "cycle",
        "huge-range",
        "old-version",
        "overlap",
        "index",
    ],
)
def test_hostile_references_are_refused(ckpt, chain, change, message):
    root, _ = chain
    _hostile(root, change)
    with pytest.raises(InvalidCheckpointError, match=message):
        ckpt.load(f"{root}/step-3")
    report = checkpoint.verify(f"{root}/step-3")
    assert not report.ok and re.search(message, report.problems[0])


def test_a_referenced_file_smaller_than_recorded_is_refused_before_allocating(ckpt, chain):
    root, _ = chain

    def claim(doc: dict) -> None:
        doc["references"]["files"][_ref_name(doc)]["nbytes"] = 1 << 40
        for c in (*doc["tensors"]["model.base"]["chunks"], *doc["references"]["chunks"]["model.base"]):
            c["offset_bytes"] = (1 << 40) - c["nbytes"]

    _hostile(root, claim)
    with pytest.raises(
        InvalidCheckpointError, match=r"lie outside the file of \d+ bytes; the file is truncated"
    ):
        ckpt.load(f"{root}/step-3")
    report = checkpoint.verify(f"{root}/step-3")
    assert [p for p in report.problems if "where 1099511627776 were recorded" in p] != []


def test_a_huge_reference_count_is_refused_before_any_loop(ckpt, chain, monkeypatch):
    root, _ = chain
    monkeypatch.setattr("planners.references.MAX_REFERENCED_FILES", 0)
    with pytest.raises(
        InvalidCheckpointError, match=r"references.files must be an object of at most 0 entries"
    ):
        ckpt.load(f"{root}/step-3")


# --- tools follow references ----------------------------------------------------------------------


def test_diff_inspect_export_hf_and_the_dcp_reader_follow_references(ckpt, chain, tmp_path):
    import torch.distributed.checkpoint as dcp
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from checkpoint.integrations.dcp import ShardsafeStorageReader
    from checkpoint.tools.cli import main
    from checkpoint.tools.diff import diff_checkpoints

    root, _ = chain
    full = str(tmp_path / "full")
    ckpt.save(_state(3), full)  # the same state, saved whole
    report = diff_checkpoints(f"{root}/step-3", full)
    assert report.identical and len(report.tensors) == 4 and all(t.equal for t in report.tensors)
    assert not diff_checkpoints(f"{root}/step-3", f"{root}/step-2").identical

    result = CliRunner().invoke(main, ["inspect", "--json", f"{root}/step-3"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["version"] == 3
    assert doc["referenced"] == {
        "checkpoints": ["step-1"],
        "files": 1,
        "nbytes": FROZEN.numel() * 4 + 10 * 500 * 2,
    }
    text = CliRunner().invoke(main, ["inspect", f"{root}/step-3"]).stdout
    assert "references 810000 bytes in 1 file(s) of checkpoint(s) step-1" in " ".join(text.split())

    out = str(tmp_path / "hf")
    checkpoint.export_hf(f"{root}/step-3", out, prefix="model.")
    exported = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            exported.update(load_file(os.path.join(out, name)))
    expected = _state(3)["model"]
    assert sorted(exported) == sorted(expected) and all(
        torch.equal(exported[k], expected[k]) for k in expected
    )

    target = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
    dcp.load(target, storage_reader=ShardsafeStorageReader(f"{root}/step-3"))
    assert all(torch.equal(target["model"][k], expected[k]) for k in expected)


def test_consolidate_makes_a_step_self_contained(ckpt, chain):
    from click.testing import CliRunner

    from checkpoint.tools.cli import main

    root, _ = chain
    result = CliRunner().invoke(main, ["consolidate", "--json", f"{root}/step-3"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bytes_copied"] == FROZEN.numel() * 4 + 10 * 500 * 2 and len(doc["files_written"]) == 1
    meta = _doc(f"{root}/step-3")
    assert meta["version"] == 2 and meta["references"]["files"] == {}
    import shutil

    shutil.rmtree(f"{root}/step-1")  # nothing of step-1 or step-2 is needed any more
    shutil.rmtree(f"{root}/step-2")
    loaded = ckpt.load(f"{root}/step-3")
    expected = _state(3)
    loaded.pop("rng"), expected.pop("rng")
    _same(loaded, expected)
    report = checkpoint.verify(f"{root}/step-3")
    assert (report.ok, report.files_checked, report.leftovers) == (True, 2, ())
    # Still a base: its index survived, so the next save references its new file.
    ckpt.save(_state(4), f"{root}/step-4", base=f"{root}/step-3")
    assert ckpt.last_save.bytes_written < 2000
    assert _doc(f"{root}/step-4")["references"]["files"].keys() == {doc["files_written"][0]}


def test_consolidate_copies_grid_chunks_to_their_writer_rank(ckpt, tmp_path):
    import shutil

    from tests.golden.make_golden import two_rank_global

    for name in ("two_rank", "two_rank-base"):
        shutil.copytree(os.path.join(os.path.dirname(__file__), "golden", "v3", name), tmp_path / name)
    checkpoint.consolidate(str(tmp_path / "two_rank"))
    shutil.rmtree(tmp_path / "two_rank-base")
    loaded = ckpt.load(str(tmp_path / "two_rank"))
    assert all(torch.equal(loaded["model"][k], v) for k, v in two_rank_global().items())
    assert checkpoint.verify(str(tmp_path / "two_rank")).ok


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_manager_incremental_chain_full_every_and_retention(tmp_path, mode):
    root = str(tmp_path / "run")
    ckpt = checkpoint.make_sync_checkpointer() if mode == "sync" else checkpoint.make_async_checkpointer()
    mgr = checkpoint.CheckpointManager(root, checkpointer=ckpt, keep_last=2, incremental=True, full_every=3)
    try:
        for step in range(1, 8):
            mgr.save(step, _state(step))
        mgr.wait_until_finished()
        steps = {r.step: r for r in mgr.steps()}
        complete = sorted(s for s, r in steps.items() if r.complete)
        assert complete == [6, 7]
        versions = {s: _doc(steps[s].path)["version"] for s in complete}
        # Saves 1, 4, 7 are whole (full_every=3); 6 references 5's base bytes, which came from step 4.
        assert versions == {6: 3, 7: 2}
        assert {f["checkpoint"] for f in _doc(steps[6].path)["references"]["files"].values()} == {
            "step-000000004"
        }
        # Step 4 is no checkpoint any more (its metadata went first) but keeps what step 6 reads.
        assert not steps[4].complete and os.listdir(steps[4].path) == list(
            _doc(steps[6].path)["references"]["files"]
        )
        assert 5 not in steps and all(s not in steps for s in (1, 2, 3))
        for s in complete:
            loaded = ckpt.load(steps[s].path)
            assert torch.equal(loaded["model"]["base"], FROZEN) and loaded["step"] == s
        # A resumed manager starts its chain with a whole save.
        mgr.close()
        mgr = checkpoint.CheckpointManager(
            root, checkpointer=ckpt, keep_last=2, incremental=True, full_every=3
        )
        assert mgr.load(_state(0)) == 7
        mgr.save(8, _state(8))
        mgr.save(9, _state(9))
        mgr.wait_until_finished()
        assert _doc(os.path.join(root, "step-000000008"))["version"] == 2
        assert _doc(os.path.join(root, "step-000000009"))["version"] == 3
        assert not os.path.exists(steps[4].path)  # no kept step references step 4 any more: swept whole
    finally:
        mgr.close()
        ckpt.close()


def test_the_incremental_benchmark_runs_at_a_tiny_scale(tmp_path, capsys):
    from benchmarks import incremental

    results = incremental.main(
        ["--scale", "0.002", "--rounds", "1", "--dir", str(tmp_path), "--out", str(tmp_path / "r.json")]
    )
    by_name = {r["workload"]: r for r in results}
    assert sorted(by_name) == ["dense", "frozen_embedding", "lora"]
    assert by_name["lora"]["inc_bytes"] < by_name["lora"]["full_bytes"] / 2
    assert by_name["dense"]["inc_bytes"] >= by_name["dense"]["full_bytes"]  # nothing frozen: all written
    assert json.loads((tmp_path / "r.json").read_text()) == results
    assert "| lora |" in capsys.readouterr().out


@pytest.mark.s3
def test_incremental_chain_on_s3_with_retention(s3_endpoint, s3_bucket, s3_fs):
    options = s3_endpoint.storage_options
    ckpt = checkpoint.make_sync_checkpointer(checkpoint.CheckpointerConfig(storage_options=options))
    root = f"{s3_bucket}/run"
    mgr = checkpoint.CheckpointManager(root, checkpointer=ckpt, keep_last=1, incremental=True, full_every=10)
    try:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
        assert ckpt.last_save.bytes_written < 2000
        steps = {r.step: r for r in mgr.steps()}
        assert [s for s, r in steps.items() if r.complete] == [3]
        loaded = ckpt.load(steps[3].path)
        assert torch.equal(loaded["model"]["base"], FROZEN) and loaded["step"] == 3
        report = checkpoint.verify(steps[3].path, storage_options=options)
        assert report.ok and report.files_checked == 2
        # Step 1 keeps only the file step 3 references; step 2 is gone.
        step1 = s3_fs.ls(f"{root.removeprefix('s3://')}/step-000000001")
        assert [p.rsplit("/", 1)[-1] for p in step1] == list(
            _doc_s3(s3_fs, steps[3].path)["references"]["files"]
        )
        s3_fs.rm(step1[0])
        with pytest.raises(MissingReferenceError, match=r"referenced from checkpoint 'step-000000001'"):
            ckpt.load(steps[3].path)
    finally:
        mgr.close()
        ckpt.close()


def _doc_s3(fs, path: str) -> dict:
    with fs.open(f"{path.removeprefix('s3://')}/{METADATA_FILE}", "rb") as f:
        return json.loads(f.read())


def test_manager_refuses_incremental_with_a_local_tier_and_bad_full_every(tmp_path):
    ckpt = checkpoint.make_sync_checkpointer()
    with pytest.raises(ValueError, match=r"incremental=True cannot be combined with a node-local tier"):
        checkpoint.CheckpointManager(
            str(tmp_path / "run"), checkpointer=ckpt, incremental=True, local_root=str(tmp_path / "local")
        )
    with pytest.raises(ValueError, match=r"full_every must be an int >= 1, got 0"):
        checkpoint.CheckpointManager(str(tmp_path / "run"), checkpointer=ckpt, incremental=True, full_every=0)
    ckpt.close()


def test_a_save_where_nothing_changed_writes_only_an_empty_shard_file(ckpt, tmp_path):
    root = tmp_path / "run"
    state = {"a": torch.arange(1000.0), "b": torch.ones(10, 10)}
    ckpt.save(state, str(root / "step-1"), incremental=True)
    ckpt.save(state, str(root / "step-2"), base=str(root / "step-1"))
    assert (ckpt.last_save.files_written, ckpt.last_save.bytes_written) == (1, 88)  # a header, no tensor
    loaded = ckpt.load(str(root / "step-2"))
    assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])
    assert checkpoint.verify(str(root / "step-2")).ok
