"""The benchmark entry point, end to end at tiny sizes, so it never rots.

It asserts that every scenario produced figures for both systems and that the
outputs are complete, never what the figures are: times on a shared CI
machine say nothing, and the benchmark's own run reports them.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("psutil", reason="the benchmark samples RSS with psutil (the 'bench' extra)")

import checkpoint  # noqa: E402
from benchmarks import run  # noqa: E402
from benchmarks.peers import TCKPT, TCKPT_FSYNC  # noqa: E402
from benchmarks.scenarios import UNVERIFIED  # noqa: E402
from benchmarks.stats import DCP, OURS  # noqa: E402

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

# (scenario, metric) -> figures both systems must have; async ones only where the async checkpointer exists.
_BOTH = [
    ("durable_save", "sync_s"),
    ("durable_save", "first_sync_s"),
    ("load", "ws1to2_s"),
    ("load", "ws1to2_read_bytes"),
    ("load", "ws1to2_needed_bytes"),
    ("memory", "sync_trainer_bytes"),
    ("memory", "trainer_held_bytes"),
    ("planning", "first_save_s"),
    ("planning", "repeat_save_s"),
]
_ASYNC = [
    ("async_blocking", "block_s"),
    ("async_blocking", "first_block_s"),
    ("durable_save", "async_s"),
    ("durable_save", "first_async_s"),
    ("memory", "async_trainer_bytes"),
    ("memory", "async_writers_bytes"),
]
REPEATS = 2


# torch-checkpointing's async saver starts a writer process that imports torch (10-15 s on a busy machine).
@pytest.mark.timeout(300)
def test_entry_point_produces_every_scenario_for_both_systems(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = [
        "--size-mib", "2", "--tensors", "4", "--save-world-size", "1", "--load-world-sizes", "2",
        "--repeats", str(REPEATS), "--small-tensors", "50", "--planning-repeats", "1",
        "--work-dir", str(tmp_path), "--out-dir", str(out), "--plugins", "none", "--timeout-s", "250",
    ]  # fmt: skip
    assert run.main(argv) == 0

    report = json.loads((out / "results.json").read_text())
    figures = {(f["scenario"], f["metric"], f["system"]): f for f in report["figures"]}
    has_async = hasattr(checkpoint, "make_async_checkpointer")
    for scenario, metric in _BOTH + (_ASYNC if has_async else []):
        for system in (OURS, DCP):
            assert (scenario, metric, system) in figures, f"no {system} figure for {scenario}/{metric}"
    if not has_async:
        missing = {(u["scenario"], u["metric"], u["system"]) for u in report["unavailable"]}
        assert ("async_blocking", "block_s", OURS) in missing
        assert ("async_blocking", "block_s", DCP) in figures
    # Steady-state figures hold one sample per run; first-save figures one in all.
    assert len(figures[("durable_save", "sync_s", OURS)]["samples"]) == REPEATS
    assert len(figures[("durable_save", "first_sync_s", DCP)]["samples"]) == 1
    # The references are measured in the same runs as the systems.
    assert len(figures[("async_blocking", "block_s", "memcpy")]["samples"]) == REPEATS
    assert len(figures[("durable_save", "sync_s", "dd")]["samples"]) == REPEATS
    # Both systems' loads needed the same bytes: the same checkpoint content, loaded by two ranks.
    needed = {figures[("load", "ws1to2_needed_bytes", s)]["samples"][0] for s in (OURS, DCP)}
    assert needed == {float(report["config"]["size_bytes"])}

    ratio_names = {(r["scenario"], r["metric"], r["name"]) for r in report["ratios"]}
    assert ("load", "ws1to2_s", "dcp / shardsafe") in ratio_names
    assert ("durable_save", "sync_s", "bandwidth shardsafe / dd") in ratio_names
    assert ("planning", "repeat_save_s", "dcp / shardsafe") in ratio_names
    assert report["machine"]["logical_cpus"] >= 1
    assert report["command"].startswith("python -m benchmarks.run --size-mib 2 ")

    # torch-checkpointing (the bench extra) runs in the same processes, as shipped and with fsync; a
    # scenario it cannot run (a resharding load on CPU ranks) is reported as unavailable, not dropped.
    missing = {(u["scenario"], u["metric"], u["system"]): u["reason"] for u in report["unavailable"]}
    for system in (TCKPT, TCKPT_FSYNC):
        assert len(figures[("durable_save", "sync_s", system)]["samples"]) == REPEATS
    assert ("load", "ws1to2_s", TCKPT) not in figures
    assert "device='cuda'" in missing[("load", "ws1to2_s", TCKPT)]
    # Warm loads, and shardsafe's unverified warm load beside its verified one (goal 1).
    assert len(figures[("load", "ws1to2_warm_s", UNVERIFIED)]["samples"]) == REPEATS
    assert len(figures[("load", "ws1to2_warm_s", OURS)]["samples"]) == REPEATS
    goals = {g["goal"]: g for g in report["goals"]}
    sync_goal = goals["2. sync save / DCP"]
    assert sync_goal["target"] == "<= 0.8" and len(sync_goal["samples"]) == REPEATS
    assert goals["5. sync save / torch-checkpointing+fsync"]["median"] > 0
    assert (
        "--plugins s3"
        in goals["6. S3 save through the 10 MB/s-per-connection proxy / one stream"]["unavailable"]
    )
    assert report["commit"] != ""

    table = capsys.readouterr().out
    assert "| goal (issue 26) | this run: median [min-max] | target | met |" in table
    assert "| 2. sync save / DCP | " in table
    assert "| load | load time, page cache evicted, saved by 1 rank, loaded by 2 ranks (resharded) |" in table
    pytest.importorskip("matplotlib")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
