"""CheckpointManager on one rank: layout, interval, resume, skipping broken steps, retention, signals.

Multi-rank behaviour (agreement, kill -9 of a job, async retention, S3) is in
tests/test_manager_multiproc.py.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import torch

import checkpoint
from checkpoint import CheckpointManager, StepRecord
from checkpoint.manager.steps import STEP_DIGITS, parse_step_dir, step_dir_name
from planners.errors import IncompleteCheckpointError, MismatchError


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


def _state(value: float) -> dict:
    return {"w": torch.full((3, 2), value), "step": int(value)}


def _step_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_step_directory_names_are_padded_and_parsed_either_way() -> None:
    assert STEP_DIGITS == 9
    assert step_dir_name(42) == "step-000000042"
    assert parse_step_dir("step-000000042") == 42
    assert parse_step_dir("step-42") == 42
    assert parse_step_dir("step-1234567890") == 1234567890
    assert parse_step_dir("step-x") is None
    assert parse_step_dir("checkpoint-3") is None


def test_saves_on_the_interval_and_records_every_step(tmp_path: Path, ckpt) -> None:
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt, interval_steps=3)
    saved = [mgr.save(step, _state(step)) for step in range(8)]
    assert saved == [True, False, False, True, False, False, True, False]
    assert mgr.save(7, _state(7), force=True) is True
    mgr.close()
    assert _step_names(tmp_path) == ["step-000000000", "step-000000003", "step-000000006", "step-000000007"]
    records = mgr.steps()
    assert [r.step for r in records] == [0, 3, 6, 7]
    assert all(isinstance(r, StepRecord) and r.complete and r.world_size == 1 for r in records)
    assert records[1].path == str(tmp_path / "step-000000003")
    # one shard file holding w (6 float32 = 24 bytes) plus its safetensors header
    assert records[1].nbytes == os.path.getsize(next((tmp_path / "step-000000003").glob("shard-*")))
    assert records[0].saved_at is not None and records[0].saved_at <= records[-1].saved_at
    assert mgr.latest_step() == 7


def test_load_returns_none_on_a_fresh_start_then_the_newest_step(tmp_path: Path, ckpt) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"), checkpointer=ckpt)
    target = _state(-1)
    assert mgr.load(target) is None
    assert torch.equal(target["w"], torch.full((3, 2), -1.0))
    for step in (1, 2, 5):
        mgr.save(step, _state(step))
    mgr.close()
    again = CheckpointManager(str(tmp_path / "run"), checkpointer=ckpt)
    target = _state(-1)
    assert again.load(target) == 5
    assert torch.equal(target["w"], torch.full((3, 2), 5.0)) and target["step"] == 5
    assert again.load(target, step=2) == 2
    assert torch.equal(target["w"], torch.full((3, 2), 2.0)) and target["step"] == 2
    with pytest.raises(FileNotFoundError, match="no step 3 under"):
        again.load(target, step=3)
    # a step that is not newer than the one loaded is never saved again (it is on storage already)
    assert again.save(2, _state(9)) is False
    assert again.save(6, _state(6)) is True
    again.close()


def test_load_skips_incomplete_and_damaged_steps_with_a_warning(tmp_path: Path, ckpt, caplog) -> None:
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt)
    for step in (10, 20, 30, 40):
        mgr.save(step, _state(step))
    mgr.close()
    (tmp_path / "step-000000040" / "metadata.json").unlink()  # interrupted save: shard files, no commit
    (tmp_path / "step-000000030" / "metadata.json").write_text("{not json")  # unreadable metadata
    shard = next((tmp_path / "step-000000020").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in w's last element
    shard.write_bytes(bytes(data))
    target = _state(-1)
    with caplog.at_level(logging.WARNING, logger="checkpoint.manager.manager"):
        assert CheckpointManager(str(tmp_path), checkpointer=ckpt).load(target) == 10
    assert torch.equal(target["w"], torch.full((3, 2), 10.0)) and target["step"] == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 40" in w and "no readable metadata.json" in w for w in warnings), warnings
    assert any("step 30" in w and "no readable metadata.json" in w for w in warnings), warnings
    assert any("step 20" in w and "CorruptCheckpointError" in w for w in warnings), warnings
    with pytest.raises(IncompleteCheckpointError, match="step 40 .* no readable metadata.json"):
        CheckpointManager(str(tmp_path), checkpointer=ckpt).load(_state(-1), step=40)
    records = {r.step: r.complete for r in mgr.steps()}
    assert records == {10: True, 30: False, 40: False}  # the damaged step 20 was renamed aside, whole
    (quarantined,) = tmp_path.glob("step-000000020.damaged-*")
    assert sorted(p.name for p in quarantined.iterdir()) == ["metadata.json", shard.name]


def test_a_target_that_does_not_fit_raises_instead_of_falling_back(tmp_path: Path, ckpt) -> None:
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    with pytest.raises(MismatchError, match="'w'"):
        mgr.load({"w": torch.zeros(4, 4), "step": 0})
    mgr.close()


def test_retention_keeps_last_n_and_every_kth_and_removes_old_leftovers(tmp_path: Path, ckpt) -> None:
    leftover = tmp_path / "step-000000002"
    leftover.mkdir()
    (leftover / "shard-0123456789ab-r00000-000.safetensors").write_bytes(b"partial")
    newer_leftover = tmp_path / "step-000000099"  # newer than any complete step: maybe a save in flight
    newer_leftover.mkdir()
    (tmp_path / "notes.txt").write_text("not a step")
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt, keep_last=2, keep_every=10)
    for step in range(1, 26):
        assert mgr.save(step, _state(step))
        complete = [r.step for r in mgr.steps() if r.complete]
        assert complete[-1] == step  # the newest complete step is never deleted
    mgr.close()
    assert _step_names(tmp_path) == [
        "notes.txt",
        "step-000000010",
        "step-000000020",
        "step-000000024",
        "step-000000025",
        "step-000000099",
    ]


def test_keep_last_none_keeps_everything(tmp_path: Path, ckpt) -> None:
    with CheckpointManager(str(tmp_path), checkpointer=ckpt) as mgr:
        for step in range(5):
            mgr.save(step, _state(step))
    assert [r.step for r in mgr.steps()] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="closed"):
        mgr.save(5, _state(5))


def test_deleting_a_step_removes_its_commit_marker_first(tmp_path: Path, ckpt) -> None:
    """A deletion that stops after the marker leaves an incomplete step, cleaned up by the next purge."""
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt, keep_last=1)
    mgr.save(1, _state(1))
    mgr.save(2, _state(2))
    assert _step_names(tmp_path) == ["step-000000002"]
    half_deleted = tmp_path / "step-000000001"
    half_deleted.mkdir()
    (half_deleted / "shard-0123456789ab-r00000-000.safetensors").write_bytes(b"x" * 10)
    assert {r.step: r.complete for r in mgr.steps()} == {1: False, 2: True}
    assert mgr.latest_step() == 2
    mgr.save(3, _state(3))
    mgr.close()
    assert _step_names(tmp_path) == ["step-000000003"]


def test_sigterm_makes_the_next_save_happen_and_restores_the_handler(tmp_path: Path, ckpt) -> None:
    before = signal.getsignal(signal.SIGTERM)
    mgr = CheckpointManager(
        str(tmp_path), checkpointer=ckpt, interval_steps=1000, save_on_signals=(signal.SIGTERM,)
    )
    assert mgr.save(1, _state(1)) is False
    os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag: this process lives on
    assert not mgr.preempted
    assert mgr.save(2, _state(2)) is True
    assert mgr.preempted
    assert (tmp_path / "step-000000002" / "metadata.json").exists()
    assert mgr.save(3, _state(3)) is False  # the flag is consumed by the save
    mgr.close()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    ("option", "value"),
    [("keep_last", 0), ("keep_every", -1), ("interval_steps", 0), ("preemption_check_steps", True)],
)
def test_bad_options_raise_value_error(tmp_path: Path, ckpt, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        CheckpointManager(str(tmp_path), checkpointer=ckpt, **{option: value})


def test_bad_step_raises_type_error(tmp_path: Path, ckpt) -> None:
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt)
    with pytest.raises(TypeError, match="step must be an int"):
        mgr.save(-1, _state(0))
    mgr.close()


def test_a_failed_deletion_is_logged_not_raised_and_leaves_an_incomplete_step(
    tmp_path: Path, ckpt, caplog
) -> None:
    mgr = CheckpointManager(str(tmp_path), checkpointer=ckpt, keep_last=1)
    mgr.save(1, _state(1))
    (tmp_path / "step-000000001" / "stuck").mkdir()  # unlink() of a directory fails
    (tmp_path / "step-000000001" / "stuck" / "f").write_text("x")
    with caplog.at_level(logging.WARNING, logger="checkpoint.manager.manager"):
        assert mgr.save(2, _state(2)) is True
    assert any("pruning old steps under" in r.getMessage() for r in caplog.records)
    # the commit marker went first, so the half-deleted step no longer counts as complete
    assert {r.step: r.complete for r in mgr.steps()} == {1: False, 2: True}
    target = _state(-1)
    assert CheckpointManager(str(tmp_path), checkpointer=ckpt).load(target) == 2
    mgr.close()
