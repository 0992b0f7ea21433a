"""Integrity: checksums written with the data, verified on load, and `verify()` over a whole checkpoint.

Every test damages a real checkpoint the way disks, copies and people do
(a flipped bit, a truncated or missing file, a file from another save, edited
metadata) and checks that the damage is reported with the file, the key and
the checkpoint named, and that no damaged byte reaches a load target.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import os
import shutil
import subprocess
import sys

import crc32c
import pytest
import torch
from safetensors import safe_open

import checkpoint
from checkpoint.load.chunk_reader import ChunkReader
from checkpoint.load.loader import read_metadata
from checkpoint.save.collectives import SingleRankExchange
from checkpoint.save.protocol import PlanCache, describe_local, prepare_save
from checkpoint.state.flatten import flatten_state_dict
from checkpoint.tools.verify import EXIT_NO_CHECKPOINT, EXIT_OK, EXIT_PROBLEMS, main
from planners.boxes import Box
from planners.digest import seal
from planners.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PlanCoverageError,
)
from planners.load_plan import LoadTarget
from planners.metadata import CHECKSUM_BLOCK_BYTES, METADATA_FILE
from planners.save_plan import LocalPlan, WriteItem, plan_global
from storage.backend import open_storage

A_NUMEL = 200_000  # 800,000 bytes of float32: two checksum blocks, the second one short
B_NUMEL = 10
R_NUMEL = 3


def _state() -> dict:
    return {
        "a": torch.arange(A_NUMEL, dtype=torch.float32),
        "b": torch.arange(B_NUMEL, dtype=torch.int64) * 3,
        "r": checkpoint.RankLocal(torch.arange(R_NUMEL, dtype=torch.int16)),
        "step": 5,
    }


def _zeros() -> dict:
    return {"a": torch.zeros(A_NUMEL), "b": torch.zeros(B_NUMEL, dtype=torch.int64), "step": 0}


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


@pytest.fixture
def saved(ckpt, tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    ckpt.save(_state(), path)
    return path


def _doc(path: str) -> dict:
    with open(os.path.join(path, METADATA_FILE)) as f:
        return json.load(f)


def _chunk(path: str, key: str) -> dict:
    (chunk,) = _doc(path)["tensors"][key]["chunks"]
    return chunk


def _flip(path: str, name: str, offset: int) -> None:
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def test_each_block_checksum_is_recorded_with_the_data(saved):
    a = _chunk(saved, "a")
    with safe_open(os.path.join(saved, a["file"]), "pt") as f:
        data = f.get_tensor("a").numpy().tobytes()
    assert len(data) == A_NUMEL * 4
    assert a["crc32c"] == [
        crc32c.crc32c(data[:CHECKSUM_BLOCK_BYTES]),
        crc32c.crc32c(data[CHECKSUM_BLOCK_BYTES:]),
    ]
    assert _doc(saved)["checksum_block_bytes"] == CHECKSUM_BLOCK_BYTES


def test_corrupt_block_fails_the_load_and_leaves_the_target_untouched(ckpt, saved):
    a = _chunk(saved, "a")
    bad = a["offset_bytes"] + CHECKSUM_BLOCK_BYTES + 4 * 1000  # element 132072 of "a", in its second block
    _flip(saved, a["file"], bad)
    target = _zeros()
    with pytest.raises(CorruptCheckpointError) as info:
        ckpt.load(saved, target)
    message = str(info.value)
    first = a["offset_bytes"] + CHECKSUM_BLOCK_BYTES
    assert message.startswith(
        f"{saved}: file {a['file']}, key 'a': checksum mismatch in block 1 (bytes [{first}, "
    )
    assert f"[{first}, {a['offset_bytes'] + A_NUMEL * 4})" in message
    assert "crc32c" not in message and "0x" not in message  # no checksum of the damaged bytes is echoed
    # Verified before anything is copied: nothing of the file reached the target, "b" included.
    assert torch.equal(target["a"], torch.zeros(A_NUMEL))
    assert torch.equal(target["b"], torch.zeros(B_NUMEL, dtype=torch.int64))
    assert target["step"] == 0
    with pytest.raises(CorruptCheckpointError, match="key 'a': checksum mismatch"):
        ckpt.load(saved)

    # verify=False reads the damaged value: the checksum is what stopped the load.
    loaded = ckpt.load(saved, _zeros(), verify=False)
    expected = torch.arange(A_NUMEL, dtype=torch.float32)
    changed = (loaded["a"] != expected).nonzero().flatten().tolist()
    assert changed == [(CHECKSUM_BLOCK_BYTES + 4 * 1000) // 4]
    assert torch.equal(loaded["b"], torch.arange(B_NUMEL) * 3)


def test_corrupt_chunk_never_reaches_the_target_when_others_load(tmp_path):
    config = checkpoint.CheckpointerConfig(
        writer_config=checkpoint.CheckpointWriterConfig(max_file_bytes=1024)
    )
    ckpt = checkpoint.make_sync_checkpointer(config)
    path = str(tmp_path / "ckpt")
    ckpt.save(_state(), path)
    a, b = _chunk(path, "a"), _chunk(path, "b")
    assert a["file"] != b["file"]
    _flip(path, b["file"], b["offset_bytes"] + 8)
    target = _zeros()
    with pytest.raises(CorruptCheckpointError, match=rf"file {b['file']}, key 'b': checksum mismatch"):
        ckpt.load(path, target)
    assert torch.equal(target["b"], torch.zeros(B_NUMEL, dtype=torch.int64))
    ckpt.close()


def test_partial_read_verifies_the_blocks_it_reads(saved):
    """A resharded read checks whole blocks around its range and nothing else."""
    a = _chunk(saved, "a")
    storage = open_storage(saved)
    metadata = read_metadata(storage)
    target = LoadTarget(
        fqn="a", dtype=torch.float32, global_shape=(A_NUMEL,), box=Box(offsets=(150_000,), sizes=(1000,))
    )

    def read() -> torch.Tensor:
        dest = torch.zeros(1000)
        reader = ChunkReader(storage, metadata, verify=True, io_threads=1)
        reader.run([(item, dest) for item in reader.plan(target, metadata.tensors["a"])])
        assert reader.bytes_read == A_NUMEL * 4 - CHECKSUM_BLOCK_BYTES  # exactly the second block
        return dest

    _flip(saved, a["file"], a["offset_bytes"] + 10)  # the first block: not read
    assert torch.equal(read(), torch.arange(150_000, 151_000, dtype=torch.float32))
    storage.close()
    storage = open_storage(saved)
    _flip(saved, a["file"], a["offset_bytes"] + A_NUMEL * 4 - 1)  # the second block's last byte
    with pytest.raises(CorruptCheckpointError, match="key 'a'"):
        read()
    storage.close()


def test_verify_passes_a_good_checkpoint(saved, capsys):
    report = checkpoint.verify(saved)
    assert report == checkpoint.VerifyReport(
        path=saved,
        save_id=_doc(saved)["save_id"],
        files_checked=1,
        tensors_checked=3,
        bytes_checked=A_NUMEL * 4 + B_NUMEL * 8 + R_NUMEL * 2,
        problems=(),
        leftovers=(),
        pickled_keys=(),
    )
    assert report.ok
    report.raise_if_failed()
    assert main([saved]) == EXIT_OK
    out = capsys.readouterr().out
    assert (
        out
        == f"{saved}: OK: save {report.save_id}, 1 files, 3 tensors, {report.bytes_checked} bytes checked\n"
    )


def _damaged(saved: str, tmp_path, name: str) -> str:
    copy = str(tmp_path / name)
    shutil.copytree(saved, copy)
    return copy


def _write_doc(path: str, doc: dict) -> None:
    """Write a changed metadata document, re-sealed so that only the change itself is at fault."""
    with open(os.path.join(path, METADATA_FILE), "wb") as f:
        f.write(seal(doc))


def test_verify_reports_flipped_truncated_missing_and_foreign_files(saved, tmp_path, capsys):
    a = _chunk(saved, "a")
    name = a["file"]
    size = os.path.getsize(os.path.join(saved, name))

    flipped = _damaged(saved, tmp_path, "flipped")
    _flip(flipped, name, a["offset_bytes"] + 4)
    report = checkpoint.verify(flipped)
    first = a["offset_bytes"]
    assert report.problems == (
        f"file {name}, key 'a': checksum mismatch in 1 of 2 block(s), first at bytes "
        f"[{first}, {first + CHECKSUM_BLOCK_BYTES}); the file is corrupt",
    )
    with pytest.raises(checkpoint.InvalidCheckpointError, match="failed verification with 1 problem"):
        report.raise_if_failed()
    assert main([flipped]) == EXIT_PROBLEMS
    assert capsys.readouterr().out.splitlines()[1] == f"  problem: {report.problems[0]}"

    truncated = _damaged(saved, tmp_path, "truncated")
    os.truncate(os.path.join(truncated, name), size - 100)
    ends = {k: _chunk(saved, k)["offset_bytes"] for k in ("a", "b")}
    r = _doc(saved)["rank_local"]["r"][0]["tensor"]["offset_bytes"]
    assert checkpoint.verify(truncated).problems == (
        f"file {name}: {size - 100} bytes on storage, the metadata records {size}; it was truncated or replaced",
        f"file {name}, key 'a': chunk bytes [{ends['a']}, {ends['a'] + A_NUMEL * 4}) lie outside the file of {size - 100} bytes",
        f"file {name}, key 'b': chunk bytes [{ends['b']}, {ends['b'] + B_NUMEL * 8}) lie outside the file of {size - 100} bytes",
        f"file {name}, key 'r': chunk bytes [{r}, {r + R_NUMEL * 2}) lie outside the file of {size - 100} bytes",
    )

    missing = _damaged(saved, tmp_path, "missing")
    os.remove(os.path.join(missing, name))
    assert checkpoint.verify(missing).problems == (
        f"file {name}: missing (the metadata lists it with {size} bytes)",
    )
    with pytest.raises(IncompleteCheckpointError, match=f"shard file {name} .*is missing"):
        checkpoint.make_sync_checkpointer().load(missing)

    # A same-named file from another save: its own header gives it away.
    foreign = _damaged(saved, tmp_path, "foreign")
    checkpoint.make_sync_checkpointer().save(_state(), str(tmp_path / "other"))
    other_name = _chunk(str(tmp_path / "other"), "a")["file"]
    shutil.copyfile(tmp_path / "other" / other_name, os.path.join(foreign, name))
    problems = checkpoint.verify(foreign).problems
    assert problems == (
        f"file {name}: its header says save {other_name.split('-')[1]!r} rank '0', the metadata says save "
        f"{name.split('-')[1]!r} rank 0; the file belongs to another save",
    )


def test_verify_checks_headers_against_the_metadata(saved, tmp_path):
    a = _chunk(saved, "a")
    name = a["file"]
    edited = _damaged(saved, tmp_path, "edited-header")
    with open(os.path.join(edited, name), "r+b") as f:
        head = f.read(4096)
        at = head.index(b'"a":{"dtype":"F32"')
        f.seek(at + len(b'"a":{"dtype":"'))
        f.write(b"I32")  # same size, so the file still parses: only the cross-check can tell
    (problem,) = checkpoint.verify(edited).problems
    assert problem == (
        f"file {name}, key 'a': the header has dtype I32 shape [{A_NUMEL}] at bytes "
        f"[{a['offset_bytes']}, {a['offset_bytes'] + A_NUMEL * 4}), the metadata F32 [{A_NUMEL}] at "
        f"[{a['offset_bytes']}, {a['offset_bytes'] + A_NUMEL * 4})"
    )
    # The load trusts the metadata's byte ranges and checksums, which are intact.
    assert torch.equal(
        checkpoint.make_sync_checkpointer().load(edited)["a"], torch.arange(A_NUMEL, dtype=torch.float32)
    )


def test_verify_reports_chunks_that_do_not_tile_a_tensor(saved, tmp_path):
    gap = _damaged(saved, tmp_path, "gap")
    doc = _doc(gap)
    doc["tensors"]["b"]["chunks"][0].update(sizes=[B_NUMEL - 1], nbytes=(B_NUMEL - 1) * 8)
    _write_doc(gap, doc)
    report = checkpoint.verify(gap)
    assert (report.save_id, report.files_checked) == (None, 0)
    assert report.problems == (
        f"{gap}: metadata.json: invalid metadata: key 'b': chunks cover 9 of 10 elements: there is a gap",
    )
    assert main([gap]) == EXIT_PROBLEMS

    overlap = _damaged(saved, tmp_path, "overlap")
    doc = _doc(overlap)
    doc["tensors"]["b"]["chunks"] *= 2
    _write_doc(overlap, doc)
    assert checkpoint.verify(overlap).problems == (
        f"{overlap}: metadata.json: invalid metadata: key 'b': chunks cover 20 elements of a tensor of 10: chunks overlap",
    )


def test_verify_lists_leftovers_and_pickled_values_without_running_them(ckpt, tmp_path):
    path = str(tmp_path / "ckpt")
    ckpt.save({"w": torch.ones(2), "frac": fractions.Fraction(1, 3)}, path, allow_pickle=True)
    leftover = "shard-0123456789ab-r00001-000.safetensors"
    (tmp_path / "ckpt" / leftover).write_bytes(b"partial")
    report = checkpoint.verify(path)
    assert (report.ok, report.leftovers, report.pickled_keys) == (True, (leftover,), ("frac",))


def test_verify_without_a_checkpoint(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.verify(str(tmp_path / "nothing"))
    assert main([str(tmp_path / "nothing")]) == EXIT_NO_CHECKPOINT
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        checkpoint.verify(str(tmp_path / "file"))
    assert main([str(tmp_path / "file")]) == EXIT_NO_CHECKPOINT
    assert "is a file" in capsys.readouterr().err


def test_plan_with_a_gap_or_overlap_is_refused_before_anything_is_written(tmp_path):
    def plan(rank: int, rows: tuple[int, int]) -> LocalPlan:
        box = Box(offsets=(rows[0], 0), sizes=(rows[1] - rows[0], 5))
        item = WriteItem(fqn="w", dtype="float32", global_shape=(8, 5), box=box, nbytes=box.numel * 4)
        return LocalPlan(rank=rank, items=(item,), keys=("w",))

    with pytest.raises(PlanCoverageError, match=r"key 'w': chunks cover 35 of 40 elements: there is a gap"):
        plan_global([plan(0, (0, 4)), plan(1, (5, 8))], max_file_bytes=1 << 20)
    with pytest.raises(
        PlanCoverageError, match=r"key 'w': chunks cover 45 elements of a tensor of 40: chunks overlap"
    ):
        plan_global([plan(0, (0, 5)), plan(1, (4, 8))], max_file_bytes=1 << 20)

    # Through the save protocol: the coordinator refuses the plan and no shard file appears.
    local = describe_local(flatten_state_dict({"w": torch.ones(8, 5)}), 0, allow_pickle=False)
    (item,) = local.plan.items
    holed = dataclasses.replace(item, box=Box(offsets=(0, 0), sizes=(7, 5)), nbytes=7 * 5 * 4)
    local = dataclasses.replace(local, plan=dataclasses.replace(local.plan, items=(holed,)))
    storage = open_storage(str(tmp_path / "ckpt"))
    with pytest.raises(PlanCoverageError, match="key 'w': chunks cover 35 of 40 elements: there is a gap"):
        prepare_save(
            local, SingleRankExchange(), storage, PlanCache(), overwrite=False, max_file_bytes=1 << 20
        )
    assert not (tmp_path / "ckpt").exists()  # nor the directory the refused save created


@pytest.mark.s3
def test_s3_corruption_is_caught_by_load_and_verify(s3_endpoint, s3_bucket, s3_fs):
    options = s3_endpoint.storage_options
    ckpt = checkpoint.make_sync_checkpointer(checkpoint.CheckpointerConfig(storage_options=options))
    path = f"{s3_bucket}/run/step-1"
    ckpt.save(_state(), path)
    assert checkpoint.verify(path, storage_options=options).ok
    a = _chunk_remote(s3_fs, path, "a")
    key = f"{path.removeprefix('s3://')}/{a['file']}"
    data = bytearray(s3_fs.cat_file(key))
    data[a["offset_bytes"] + 7] ^= 0x01
    s3_fs.pipe_file(key, bytes(data))
    target = _zeros()
    with pytest.raises(
        CorruptCheckpointError, match=rf"{path}: file {a['file']}, key 'a': checksum mismatch"
    ):
        ckpt.load(path, target)
    assert torch.equal(target["a"], torch.zeros(A_NUMEL))
    (problem,) = checkpoint.verify(path, storage_options=options).problems
    assert problem.startswith(f"file {a['file']}, key 'a': checksum mismatch in 1 of 2 block(s)")
    ckpt.close()


def _chunk_remote(fs, path: str, key: str) -> dict:
    doc = json.loads(fs.cat_file(f"{path.removeprefix('s3://')}/{METADATA_FILE}"))
    (chunk,) = doc["tensors"][key]["chunks"]
    return chunk


def test_command_line_entry_point(saved):
    """`python -m checkpoint.tools.verify` runs as a command: exit status 0 and nothing on stderr (no runpy warning)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "checkpoint.tools.verify", saved]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (EXIT_OK, "")
    save_id = _doc(saved)["save_id"]
    assert (
        done.stdout
        == f"{saved}: OK: save {save_id}, 1 files, 3 tensors, {A_NUMEL * 4 + B_NUMEL * 8 + R_NUMEL * 2} bytes checked\n"
    )
