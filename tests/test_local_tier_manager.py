"""The manager's local tier in one process: steps() by tier, retention, start-up cleanup, budgets, recovery.

One process is one node: local saves go through the tier's own async writer
process and server (no peers, so no replicas); the multi-node behaviour is in
`tests/test_local_tier.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint
from checkpoint.tiers.node import estimate_node_bytes as _estimate_node_bytes
from checkpoint.tiers.tier_files import TEMP_MARK
from planners.metadata import METADATA_FILE
from tests.test_cli import _run

pytestmark = [pytest.mark.timeout(300)]


def _manager(
    tmp_path: Path, ckpt: checkpoint.Checkpointer, durable: str = "durable", **kw
) -> checkpoint.CheckpointManager:
    return checkpoint.CheckpointManager(
        str(tmp_path / durable),
        checkpointer=ckpt,
        interval_steps=5,
        local_root=str(tmp_path / "local"),
        local_address="127.0.0.1",
        **kw,
    )


def test_local_steps_every_step_retention_steps_by_tier_and_resume_without_durable_root(
    tmp_path: Path, caplog
) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    state = {"w": torch.zeros(6, 5), "n": 0}
    with _manager(tmp_path, ckpt, local_keep_last=2) as mgr:
        for step in range(1, 9):
            state["w"] += step
            state["n"] = step
            assert mgr.save(step, state) is True
        mgr.wait_until_finished()
        records = mgr.steps()
    assert [(r.step, r.tiers) for r in records] == [(5, ("durable",)), (7, ("local",)), (8, ("local",))]
    assert records[2].path == str(tmp_path / "local" / "step-000000008") and records[2].complete
    assert records[2].to_json()["tiers"] == ["local"]
    assert sorted(os.listdir(tmp_path / "local")) == ["step-000000007", "step-000000008"]
    code, out, _ = _run("ls", str(tmp_path / "durable"), "--local-root", str(tmp_path / "local"), "--json")
    assert code == 0
    assert [(s["step"], s["tiers"]) for s in json.loads(out)["steps"]] == [
        (5, ["durable"]),
        (7, ["local"]),
        (8, ["local"]),
    ]

    target = {"w": torch.zeros(6, 5), "n": None}
    caplog.set_level(logging.INFO)
    # The durable root cannot be read (a file where its directory was: every read fails, none says
    # "not found"): the local steps tagged with this root are this run's, and step 8 resumes.
    (tmp_path / "durable").rename(tmp_path / "durable-away")
    (tmp_path / "durable").write_bytes(b"")
    with _manager(tmp_path, ckpt) as mgr:
        assert mgr.load(target) == 8
        for step in (9, 11):  # local saves go on (not durable ones: 10 would fail, as it must)
            assert mgr.save(step, target) is True
        mgr.wait_until_finished()
        assert [r.step for r in mgr.steps()] == [9, 11]  # this run's local steps, tagged as 8 was
    assert target["n"] == 8 and torch.equal(target["w"], torch.full((6, 5), float(sum(range(1, 9)))))
    assert "resumed step 8 from the local tier" in caplog.text
    assert caplog.text.count("cannot store the run record") == 1  # warned once, retried at every local save
    ckpt.close()


def test_start_up_cleans_leftovers_of_a_killed_job(tmp_path: Path) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    with _manager(tmp_path, ckpt, local_interval_steps=3) as mgr:
        mgr.save(3, {"w": torch.ones(4)})
    local = tmp_path / "local"
    shutil.copytree(local / "step-000000003", local / "step-000000002")
    os.unlink(local / "step-000000002" / METADATA_FILE)  # a save killed before its commit
    shutil.copytree(local / "step-000000003", local / "step-000000004")
    os.unlink(local / "step-000000004" / METADATA_FILE)  # newer than the newest commit: may hold copies
    (local / "step-000000003" / f"metadata.json{TEMP_MARK}1a2b").write_bytes(b"half a receipt")
    with _manager(tmp_path, ckpt) as mgr:
        assert sorted(n for n in os.listdir(local) if not n.startswith(".")) == [
            "step-000000003",
            "step-000000004",
        ]
        assert not any(TEMP_MARK in n for n in os.listdir(local / "step-000000003"))
        assert [(r.step, r.tiers) for r in mgr.steps()] == [(3, ("local",))]
    ckpt.close()


def test_a_local_save_that_does_not_fit_is_skipped_with_one_warning(tmp_path: Path, caplog) -> None:
    free = shutil.disk_usage(tmp_path).free
    huge = torch.zeros(1).expand(free)  # 4 bytes x free elements, no memory behind them
    state = {"w": huge}
    assert _estimate_node_bytes(state, 1, 1) > free
    ckpt = checkpoint.make_sync_checkpointer()
    with _manager(tmp_path, ckpt) as mgr:
        with caplog.at_level(logging.WARNING):
            assert mgr.save(1, state) is False  # not a durable step either
        assert mgr.steps() == []
    warnings = [r.getMessage() for r in caplog.records if "skipping the local save" in r.getMessage()]
    assert (
        len(warnings) == 1
        and "step 1" in warnings[0]
        and "node 0" in warnings[0]
        and str(tmp_path) in warnings[0]
    )
    assert not (tmp_path / "local" / "step-000000001").exists()
    ckpt.close()


def test_local_tier_options_are_checked(tmp_path: Path) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    for kw, match in (
        ({"local_interval_steps": 0}, "local_interval_steps must be an int >= 1 or None, got 0"),
        ({"local_keep_last": 0}, "local_keep_last must be an int >= 1, got 0"),
        ({"replicas": -1}, "replicas must be an int >= 0, got -1"),
        ({"local_root": "s3://bucket/x"}, "local_root must be a local directory path"),
    ):
        with pytest.raises(ValueError, match=match):
            checkpoint.CheckpointManager(
                str(tmp_path), checkpointer=ckpt, **{"local_root": str(tmp_path / "l"), **kw}
            )
    ckpt.close()
