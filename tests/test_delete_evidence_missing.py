"""Deletes added this round, with their evidence missing or unreadable: each must keep the bytes.

- Retention of an incremental run marks what every kept step references before it sweeps a dropped
  one (`checkpoint.run.sweep`); a kept step whose metadata read fails (EIO) is no mark, so nothing
  is deleted, not even a step the policy drops.
- The local tier deletes only step directories whose tag it read and found this run's: a step with
  an unreadable tag, or none, keeps every file (temporary names included), whatever its number.
- `referenced_files` answers None (keep everything) for a kept step whose metadata does not parse.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from checkpoint import CheckpointManager
from checkpoint.run.identity import RUN_FILE, RunRecord
from checkpoint.run.steps import step_dir_name
from checkpoint.run.sweep import referenced_files
from checkpoint.tiers.local_steps import clean_leftovers, prune
from checkpoint.tiers.tier_files import TEMP_MARK
from planners.metadata import METADATA_FILE
from storage.spec import StorageSpec
from tests.test_manager_evidence import _state, ckpt, flaky  # noqa: F401 - fixtures

_ = (ckpt, flaky)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_unreadable_kept_step_stops_the_incremental_sweep(tmp_path: Path, ckpt, flaky) -> None:
    root = f"flakyfs://{tmp_path}/run"
    mgr = CheckpointManager(root, checkpointer=ckpt, keep_last=1, incremental=True, full_every=100)
    mgr.save(1, _state(1))
    frozen = {"w": torch.full((3, 2), 1.0), "step": 2}  # unchanged bytes: step 2 references step 1
    mgr.save(2, frozen)
    assert [r.step for r in mgr.steps() if r.complete] == [2]  # step 1 swept, its referenced files kept
    kept_one = _files(tmp_path / "run" / "step-000000001")
    assert kept_one and METADATA_FILE not in kept_one
    flaky.add("step-000000002/metadata.json")  # the only evidence of what step 1's files serve
    mgr.save(3, _state(3))
    # Step 2 is unknown (kept), so the mark fails: step 1's files stay, and step 2 is whole.
    assert _files(tmp_path / "run" / "step-000000001") == kept_one
    assert (tmp_path / "run" / "step-000000002" / METADATA_FILE).is_file()
    flaky.clear()
    target = {"w": torch.zeros(3, 2), "step": 0}
    assert mgr.load(target, step=2) == 2
    assert torch.equal(target["w"], torch.full((3, 2), 1.0))
    mgr.close()


def test_a_kept_step_whose_metadata_does_not_parse_marks_nothing(tmp_path: Path) -> None:
    step = tmp_path / "step-000000002"
    step.mkdir()
    (step / METADATA_FILE).write_bytes(b'{"format_version": 3, "truncated')
    assert referenced_files([StorageSpec.resolve(str(step))]) is None


def test_local_steps_without_this_runs_tag_are_never_deleted(tmp_path: Path) -> None:
    root = tmp_path / "local"
    for step, tag in ((1, b"\xff not a tag"), (2, None), (3, b"{}")):
        directory = root / step_dir_name(step)
        directory.mkdir(parents=True)
        (directory / METADATA_FILE).write_bytes(b"{}")
        (directory / "shard-r00000-000.safetensors").write_bytes(b"bytes")
        (directory / f"shard-r00000-001.safetensors{TEMP_MARK}partial").write_bytes(b"half")
        if tag is not None:
            (directory / RUN_FILE).write_bytes(tag)
    before = _files(root)
    record = RunRecord.new()
    clean_leftovers(str(root), record)
    prune(str(root), record, keep_last=1)
    assert _files(root) == before
    assert sorted(os.listdir(root)) == [step_dir_name(s) for s in (1, 2, 3)]
