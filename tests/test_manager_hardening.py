"""Issue 19, the manager's cases: retention around damaged, resumed and linked steps, the lease's host
identity, retention under slow async writes, capped metadata reads, and odd entries in a run root.

Everything runs for real: sync and async checkpointers on local disk or `memory://`, real corrupt
files, real symbolic links, real in-progress markers next to a real save, sparse files for the
huge-metadata cases (each reader's peak Python allocation is measured with tracemalloc).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import checkpoint
from checkpoint import CheckpointManager, CommitHook
from checkpoint.manager.steps import StepRecord
from checkpoint.save.commit import metadata_holds
from checkpoint.save.lease import live_save_ids, marker_name
from checkpoint.tools.cli import main as cli_main
from planners.errors import InvalidCheckpointError
from storage.local import LocalStorage
from storage.spec import StorageSpec


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


def _state(value: float) -> dict:
    return {"w": torch.full((3, 2), float(value)), "step": int(value)}


def _corrupt_shard(step_dir: Path) -> Path:
    shard = next(step_dir.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in w's last element
    shard.write_bytes(bytes(data))
    return shard


def _complete(mgr: CheckpointManager) -> list[int]:
    return [r.step for r in mgr.steps() if r.complete]


def _loads(root: str, ckpt, expected_step: int) -> None:
    target = _state(-1)
    assert CheckpointManager(root, checkpointer=ckpt).load(target) == expected_step
    assert torch.equal(target["w"], torch.full((3, 2), float(expected_step)))
    assert target["step"] == expected_step


# --- case 1: retention never deletes the resumed step, the one just saved, or counts a damaged one --


def test_retention_keeps_the_resumed_and_just_saved_steps_and_quarantines_the_damaged_one(
    tmp_path: Path, ckpt, caplog
) -> None:
    with CheckpointManager(str(tmp_path), checkpointer=ckpt) as first:
        first.save(10, _state(10))
        first.save(20, _state(20))
    shard = _corrupt_shard(tmp_path / "step-000000020")
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt, keep_last=1)
    target = _state(-1)
    with caplog.at_level(logging.WARNING):
        assert mgr.load(target) == 10
    assert torch.equal(target["w"], torch.full((3, 2), 10.0))
    assert mgr.save(15, _state(15))
    # keep_last=1 newer step committed in this run: the resumed step's protection ended (issue 22 case 3)
    assert {r.step: r.complete for r in mgr.steps()} == {15: True}
    mgr.close()
    (quarantined,) = tmp_path.glob("step-000000020.damaged-*")
    assert sorted(p.name for p in quarantined.iterdir()) == ["metadata.json", shard.name]
    assert any("damaged step 20 renamed to" in r.getMessage() for r in caplog.records)
    _loads(str(tmp_path), ckpt, 15)


def test_a_damaged_step_that_cannot_be_renamed_is_neither_counted_nor_deleted(ckpt) -> None:
    """On an object store (here `memory://`) nothing is renamed: retention leaves the damaged step alone."""
    root = f"memory://h19a-{uuid.uuid4().hex[:8]}/run"
    with CheckpointManager(root, checkpointer=ckpt) as first:
        first.save(10, _state(10))
        first.save(20, _state(20))
    fs = StorageSpec.resolve(root).fs
    (shard,) = [p for p in fs.ls(f"{root}/step-000000020", detail=False) if p.endswith(".safetensors")]
    data = bytearray(fs.cat_file(shard))
    data[-1] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    mgr = CheckpointManager(root, checkpointer=ckpt, keep_last=1)
    assert mgr.load(_state(-1)) == 10
    mgr.save(15, _state(15))
    # 10 (resumed) went once keep_last=1 newer step committed (issue 22 case 3); 20 (damaged) stays
    assert _complete(mgr) == [15, 20]
    mgr.save(16, _state(16))
    assert _complete(mgr) == [16, 20]  # 15 went; 16 (just saved) and 20 (damaged) stay
    mgr.close()
    _loads(root, ckpt, 16)  # a restart skips the damaged 20 again and loads 16


def test_steps_to_delete_is_pure_and_protects_what_it_is_told_to() -> None:
    from checkpoint.manager.retention import RetentionPolicy, steps_to_delete

    def record(step: int, complete: bool = True) -> StepRecord:
        return StepRecord(
            step=step, path=f"/r/step-{step}", complete=complete, nbytes=1, world_size=1, saved_at=None
        )

    records = [record(5, complete=False), record(10), record(15), record(20), record(25, complete=False)]
    chosen = steps_to_delete(records, RetentionPolicy(keep_last=1), protected={10}, unloadable={20})
    assert [(d.record.step, d.reason) for d in chosen] == [(5, "incomplete")]
    chosen = steps_to_delete(records, RetentionPolicy(keep_last=1), protected=(), unloadable=())
    assert [(d.record.step, d.reason) for d in chosen] == [(5, "incomplete"), (10, "old"), (15, "old")]
    assert steps_to_delete(records, RetentionPolicy(keep_last=1), unloadable={10, 15, 20}) == []


# --- case 2: pruning never deletes through a symbolic link ------------------------------------------


def test_pruning_a_linked_step_removes_only_the_link(tmp_path: Path, ckpt) -> None:
    pretrained, root = tmp_path / "pretrained", tmp_path / "run"
    ckpt.save(_state(0), str(pretrained))
    (pretrained / "NOTES.txt").write_text("base model, do not delete")
    before = sorted(p.name for p in pretrained.iterdir())
    root.mkdir()
    (root / "step-0").symlink_to("../pretrained")
    _loads(str(root), ckpt, 0)  # a linked step is listed and loaded like any other
    mgr = CheckpointManager(str(root), checkpointer=ckpt, keep_last=1)
    assert [(r.step, r.complete) for r in mgr.steps()] == [(0, True)]
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    mgr.close()
    assert sorted(p.name for p in root.iterdir()) == ["step-000000002"]  # the link went
    assert sorted(p.name for p in pretrained.iterdir()) == before  # what it pointed at did not
    assert (pretrained / "NOTES.txt").read_text() == "base model, do not delete"
    assert torch.equal(ckpt.load(str(pretrained))["w"], torch.full((3, 2), 0.0))


# --- case 6: the lease judges a pid only on the very same host identity -----------------------------


def _invisible_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1  # above the largest pid the kernel hands out: never a process here


def _foreign_save(path: Path, save_id: str, doc: dict) -> tuple[str, str]:
    """Another save's marker and shard file at `path` (as a save in progress leaves them)."""
    shard = f"shard-{save_id}-r00000-000.safetensors"
    (path / shard).write_bytes(b"another save's bytes")
    (path / marker_name(save_id)).write_text(json.dumps({"save_id": save_id, **doc}))
    return marker_name(save_id), shard


def test_cleanup_trusts_only_the_heartbeat_unless_the_host_identity_matches_exactly(
    tmp_path: Path, ckpt
) -> None:
    path = tmp_path / "ckpt"
    ckpt.save(_state(1), str(path))
    boot_id, namespace = _boot_id(), str(os.stat("/proc/self/ns/pid").st_ino)
    dead, now = _invisible_pid(), time.time()
    fresh = {"heartbeat_unix": now, "lease_secs": 300.0, "host": socket.gethostname(), "pid": dead}
    next_door = _foreign_save(path, "aaaaaaaa0001", {**fresh, "boot_id": boot_id, "pid_namespace": "1"})
    old_format = _foreign_save(path, "aaaaaaaa0002", fresh)  # written before identities were recorded
    same_ns = _foreign_save(path, "aaaaaaaa0003", {**fresh, "boot_id": boot_id, "pid_namespace": namespace})
    expired = _foreign_save(path, "aaaaaaaa0004", {**fresh, "heartbeat_unix": now - 301.0})
    ckpt.save(_state(2), str(path), overwrite=True)  # its cleanup judges the four markers
    names = set(os.listdir(path))
    assert set(next_door) <= names  # another container with this host name: its save is alive
    assert set(old_format) <= names  # an old marker is read; a fresh heartbeat keeps it
    assert not set(same_ns) & names  # this very host and namespace, pid gone: a SIGKILLed save
    assert not set(expired) & names  # heartbeat older than the lease
    assert torch.equal(ckpt.load(str(path))["w"], torch.full((3, 2), 2.0))


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_lease_records_the_host_identity_and_reads_old_markers(tmp_path: Path) -> None:
    from checkpoint.save.lease import HostIdentity, LeaseRecord, claim

    here = HostIdentity.current()
    assert here.host == socket.gethostname()
    assert here.boot_id == _boot_id()
    assert here.pid_namespace == str(os.stat("/proc/self/ns/pid").st_ino)
    record = LeaseRecord(
        save_id="ab" * 6, heartbeat_unix=1.0, lease_secs=2.0, host=here.host, pid=_invisible_pid()
    )
    assert record.live(2.5, here)  # no boot id / namespace: the pid is not judged, the heartbeat is fresh
    assert not record.live(3.5, here)
    assert not HostIdentity(host="h").same_pid_space(HostIdentity(host="h"))  # empty parts never match
    claim(LocalStorage(str(tmp_path)), "cd" * 6, 60.0)
    doc = json.loads((tmp_path / marker_name("cd" * 6)).read_text())
    assert (doc["host"], doc["boot_id"], doc["pid_namespace"], doc["pid"]) == (
        here.host,
        here.boot_id,
        here.pid_namespace,
        os.getpid(),
    )


# --- case 7: async retention keeps up with writes slower than the save interval ---------------------


class SlowCommit(CommitHook):
    """Makes every write take longer than a training step (runs in the writer process)."""

    def pre_commit(self, path: str, **kwargs: object) -> None:
        time.sleep(0.3)  # the slowness under test, not a wait for an event

    def post_commit(self, path: str, **kwargs: object) -> None:
        pass


def test_async_retention_prunes_while_writes_are_slower_than_saves(tmp_path: Path) -> None:
    ckpt = checkpoint.make_async_checkpointer(commit_hook=SlowCommit())
    try:
        mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt, keep_last=2)
        held = []
        for step in range(6):
            assert mgr.save(step, _state(step))  # no pause: each save finds the previous write running
            held.append(_complete(mgr))
        mgr.close()
        assert all(len(c) <= 2 + 1 for c in held), held  # keep_last, plus the write that may just have landed
        assert held[-1][:2] == [3, 4], held  # step 5 is in flight; 0..2 were pruned while saving
        assert _complete(mgr) == [4, 5]
        _loads(str(tmp_path), ckpt, 5)
    finally:
        ckpt.close()


# --- case 11: every metadata read is capped --------------------------------------------------------


def _sparse(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.truncate(nbytes)  # sparse: no disk used, but a whole read would need `nbytes` of memory


def _traced_peak(fn: Callable[[], object]) -> tuple[object, int]:
    """`fn()`'s result (or the exception it raised) and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            result = fn()
        except Exception as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_sparse_metadata_and_markers_are_refused_before_they_are_read(
    tmp_path: Path, ckpt, caplog
) -> None:
    run = tmp_path / "run"
    with CheckpointManager(str(run), checkpointer=ckpt) as first:
        first.save(10, _state(10))
        first.save(20, _state(20))
    huge = 1 << 30  # over the 256 MiB default cap (the 8 GiB behaves the same, only slower)
    meta = run / "step-000000020" / "metadata.json"
    _sparse(meta, huge)
    (tmp_path / "marker").mkdir()
    _sparse(tmp_path / "marker" / marker_name("bbbbbbbb0001"), huge)
    mgr = CheckpointManager(str(run), checkpointer=ckpt)
    target = _state(-1)
    step20, marker = LocalStorage(str(meta.parent)), LocalStorage(str(tmp_path / "marker"))
    reads = {  # every reader of a metadata file: the run listing, load(), load(step=), the commit, the lease
        "steps": lambda: [(r.step, r.complete) for r in mgr.steps()],
        "load": lambda: mgr.load(target),
        "load_named": lambda: mgr.load(target, step=20),
        "commit_reread": lambda: metadata_holds(step20, "bbbbbbbb0002"),
        "lease": lambda: live_save_ids(marker, marker.list_names(), own="x")[0],
    }
    with caplog.at_level(logging.WARNING):
        outcome = {name: _traced_peak(read) for name, read in reads.items()}
    assert {name: peak < (16 << 20) for name, (_, peak) in outcome.items()} == dict.fromkeys(reads, True)
    assert outcome["steps"][0] == [(10, True), (20, False)]
    assert outcome["load"][0] == 10  # fell back to the older step
    assert torch.equal(target["w"], torch.full((3, 2), 10.0)) and target["step"] == 10
    refused = f"{meta}: holds at least {huge} bytes, over the limit of {256 << 20} bytes"
    error = outcome["load_named"][0]
    assert isinstance(error, InvalidCheckpointError) and refused in str(error), error
    assert outcome["commit_reread"][0] is None
    assert outcome["lease"][0] == {"bbbbbbbb0001"}  # unreadable: treated as live, never guessed dead
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(refused in w for w in warnings) == 1, warnings  # the listing says it once per manager
    assert any(f"over the limit of {64 * 1024} bytes" in w for w in warnings), warnings  # the marker's cap


def test_read_metadata_document_names_the_file_and_the_cap(tmp_path: Path, ckpt) -> None:
    from storage.metadata_file import read_metadata_document

    ckpt.save(_state(1), str(tmp_path / "c"))
    storage = LocalStorage(str(tmp_path / "c"))
    assert read_metadata_document(storage)["world_size"] == 1
    size = (tmp_path / "c" / "metadata.json").stat().st_size
    with pytest.raises(
        InvalidCheckpointError,
        match=rf"c/metadata\.json: holds at least {size} bytes, over the limit of 10 bytes",
    ):
        read_metadata_document(storage, max_bytes=10)
    (tmp_path / "c" / "metadata.json").write_text("[1, 2]")
    with pytest.raises(InvalidCheckpointError, match=r"metadata\.json: not a JSON object"):
        read_metadata_document(storage)


# --- case 13: a plain file or a looping link with a step's name is skipped with one warning ---------


def test_a_plain_file_and_a_looping_link_named_like_steps_are_skipped_with_one_warning(
    tmp_path: Path, ckpt, caplog
) -> None:
    with CheckpointManager(str(tmp_path), checkpointer=ckpt) as first:
        first.save(1, _state(1))
        first.save(3, _state(3))
    (tmp_path / "step-5").write_text("not a checkpoint")
    (tmp_path / "step-7").symlink_to("step-7")  # loops
    (tmp_path / "step-11").symlink_to("nowhere")  # dangles
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt, keep_last=1)
    with caplog.at_level(logging.WARNING, logger="checkpoint.manager.steps"):
        assert [r.step for r in mgr.steps()] == [1, 3]
        assert mgr.latest_step() == 3
        mgr.save(8, _state(8))  # retention runs past the odd entries
        mgr.save(9, _state(9))
    mgr.close()
    skipped = sorted(r.getMessage() for r in caplog.records if "it is not a step directory" in r.getMessage())
    assert skipped == [
        f"skipping {tmp_path / 'step-11'}: a symbolic link to nothing; it is not a step directory",
        f"skipping {tmp_path / 'step-5'}: a plain file, not a directory; it is not a step directory",
        f"skipping {tmp_path / 'step-7'}: cannot be opened (Too many levels of symbolic links); "
        "it is not a step directory",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000009", "step-11", "step-5", "step-7"]
    assert (tmp_path / "step-5").read_text() == "not a checkpoint"
    _loads(str(tmp_path), ckpt, 9)
    result = CliRunner().invoke(cli_main, ["ls", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert [s["step"] for s in json.loads(result.stdout)["steps"]] == [9]


def test_a_plain_object_named_like_a_step_on_an_object_store_is_skipped_with_one_warning(
    ckpt, caplog
) -> None:
    root = f"memory://h19a-{uuid.uuid4().hex[:8]}/run"
    mgr = CheckpointManager(root, checkpointer=ckpt, keep_last=1)
    mgr.save(1, _state(1))
    StorageSpec.resolve(root).fs.pipe_file(f"{root}/step-5", b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="checkpoint.manager.steps"):
        assert _complete(mgr) == [1]
        mgr.save(6, _state(6))
        assert _complete(mgr) == [6]
    mgr.close()
    skipped = [r.getMessage() for r in caplog.records if "it is not a step directory" in r.getMessage()]
    assert skipped == [f"skipping {root}/step-5: a plain object; it is not a step directory"]
    assert StorageSpec.resolve(root).fs.cat_file(f"{root}/step-5") == b"not a checkpoint"
