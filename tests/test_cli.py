"""The `shardsafe` command: ls, inspect, verify and diff, their JSON output and exit codes.

Most cases run the click group in-process (CliRunner, stdout and stderr kept apart); the module
entry points (`python -m checkpoint.tools.cli`, `python -m checkpoint.tools.verify`) and the installed console
script run as real subprocesses.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import click
import pytest
import torch
from click.testing import CliRunner

import checkpoint
from checkpoint.tools.cli import main
from checkpoint.tools.diff import diff_checkpoints

REPO = Path(__file__).resolve().parent.parent
GOLDEN_TWO_RANK = REPO / "tests" / "golden" / "v1" / "two_rank"


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _save(path: Path, state: dict) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(state, str(path))
    ckpt.close()


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """A run with complete steps 5 and 10 (world size 1) and an interrupted step 15."""
    ckpt = checkpoint.make_sync_checkpointer()
    mgr = checkpoint.CheckpointManager(str(tmp_path / "run"), checkpointer=ckpt, interval_steps=5)
    for step in (5, 10):
        mgr.save(step, {"w": torch.full((4, 4), float(step)), "step": step})
    mgr.close()
    ckpt.close()
    partial = tmp_path / "run" / "step-000000015"
    partial.mkdir()
    (partial / "shard-0123456789ab-r00000-000.safetensors").write_bytes(b"x" * 100)
    return tmp_path / "run"


# --- ls ---------------------------------------------------------------------------------------------


def test_ls_json_lists_every_step_as_the_manager_does(run_root: Path) -> None:
    code, out, _ = _run("ls", str(run_root), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["root"] == str(run_root)
    steps = [(s["step"], s["complete"], s["world_size"], s["nbytes"]) for s in doc["steps"]]
    size = os.path.getsize(next((run_root / "step-000000005").glob("shard-*")))
    assert steps == [(5, True, 1, size), (10, True, 1, size), (15, False, None, 100)]
    assert doc["steps"][0]["path"] == str(run_root / "step-000000005")
    assert doc["steps"][0]["saved_at"].endswith("+00:00") and doc["steps"][2]["saved_at"] is None


def test_ls_table_and_empty_root(run_root: Path, tmp_path: Path) -> None:
    code, out, _ = _run("ls", str(run_root))
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[:3] for r in rows] == [["5", "yes", "1"], ["10", "yes", "1"], ["15", "NO", "-"]]
    assert rows[2][-1] == str(run_root / "step-000000015")
    (tmp_path / "nothing").mkdir()  # an empty run; a missing root exits 2 (tests/test_first_hour_cli.py)
    code, out, err = _run("ls", str(tmp_path / "nothing"))
    assert (code, out) == (0, "")
    assert "no step directories" in err


# --- inspect ----------------------------------------------------------------------------------------


def test_inspect_json_of_the_golden_two_rank_checkpoint() -> None:
    code, out, _ = _run("inspect", str(GOLDEN_TWO_RANK), "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["format"], doc["version"], doc["world_size"], doc["save_id"]) == (
        "shardsafe",
        1,
        2,
        "58a0d2b6ca83",
    )
    assert doc["files"] == 2 and doc["nbytes"] == sum(
        p.stat().st_size for p in GOLDEN_TWO_RANK.glob("shard-*.safetensors")
    )
    assert doc["tensors"] == [
        {"key": "model.b", "dtype": "bfloat16", "shape": [3, 4], "chunks": 2, "nbytes": 24},
        {"key": "model.r", "dtype": "int32", "shape": [5], "chunks": 1, "nbytes": 20},
        {"key": "model.w", "dtype": "float32", "shape": [6, 4], "chunks": 2, "nbytes": 96},
    ]
    assert doc["values"] == [
        {"key": "pos", "value": "rank-local, 2 ranks"},
        {"key": "rng", "value": "rank-local, 2 ranks"},
        {"key": "step", "value": "77"},
    ]


def test_inspect_keys_glob_and_table() -> None:
    code, out, _ = _run("inspect", str(GOLDEN_TWO_RANK), "--keys", "model.[bw]")
    assert code == 0
    assert "format shardsafe v1, save 58a0d2b6ca83, saved by 2 rank(s)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("model.")]
    assert rows == [
        ["model.b", "bfloat16", "[3,", "4]", "2", "24"],
        ["model.w", "float32", "[6,", "4]", "2", "96"],
    ]
    assert "step" not in out


def test_inspect_exit_codes(run_root: Path, tmp_path: Path) -> None:
    code, out, err = _run("inspect", str(tmp_path / "missing"))
    assert (code, out) == (2, "") and "FileNotFoundError" in err
    code, _, err = _run("inspect", str(run_root))
    assert code == 2 and "is a run with 3 step(s), not a checkpoint" in err and "shardsafe ls" in err
    code, _, err = _run("inspect", str(run_root / "step-000000015"))
    assert code == 2 and "IncompleteCheckpointError" in err
    (run_root / "step-000000010" / "metadata.json").write_text('{"format": "shardsafe", "version": 1}')
    code, _, err = _run("inspect", str(run_root / "step-000000010"))
    assert code == 1 and "InvalidCheckpointError" in err
    code, _, err = _run("inspect", str(run_root / "step-000000005"), "--storage-options", "[1]")
    assert code == 2 and "must be a JSON object" in err


# --- verify -----------------------------------------------------------------------------------------


def test_verify_exit_codes_and_json(run_root: Path) -> None:
    good = run_root / "step-000000005"
    code, out, _ = _run("verify", str(good), "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["ok"], doc["files_checked"], doc["tensors_checked"], doc["bytes_checked"]) == (True, 1, 1, 64)
    assert doc["problems"] == []
    shard = next((run_root / "step-000000010").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    code, out, _ = _run("verify", str(run_root / "step-000000010"))
    assert code == 1
    assert "FAILED (1 problem(s))" in out and "checksum mismatch" in out and "'w'" in out
    code, out, err = _run("verify", str(run_root / "step-000000015"))
    assert (code, out) == (2, "") and "IncompleteCheckpointError" in err


def test_module_entry_points_keep_working(run_root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    good = str(run_root / "step-000000005")
    for argv, expected in (
        (["-m", "checkpoint.tools.verify", good], 0),
        (["-m", "checkpoint.tools.verify", str(run_root / "nothing")], 2),
        (["-m", "checkpoint.tools.cli", "verify", good], 0),
        (["-m", "checkpoint.tools.cli", "verify", str(run_root / "nothing")], 2),
    ):
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == expected, (argv, result.stdout, result.stderr)
        if expected == 0:
            assert result.stdout.startswith(f"{good}: OK: save ")
            assert "1 files, 1 tensors, 64 bytes checked" in result.stdout


# --- diff -------------------------------------------------------------------------------------------


def test_diff_reports_each_kind_of_difference(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    changed = base.clone()
    changed[2, 1] += 0.5
    _save(
        tmp_path / "a",
        {
            "same": base,
            "moved": base,
            "dtype": base,
            "shape": base,
            "gone": base,
            "count": torch.tensor(7.0),
            "lr": 0.1,
            "epoch": 3,
        },
    )
    _save(
        tmp_path / "b",
        {
            "same": base.clone(),
            "moved": changed,
            "dtype": base.double(),
            "shape": base.reshape(4, 3),
            "new": base,
            "count": torch.tensor(8.5),
            "lr": 0.2,
            "epoch": 3,
        },
    )
    code, out, _ = _run("diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["identical"] is False
    assert (doc["only_in_a"], doc["only_in_b"]) == (["gone"], ["new"])
    assert doc["changed"] == [
        {"key": "dtype", "a": "float32[3, 4]", "b": "float64[3, 4]"},
        {"key": "shape", "a": "float32[3, 4]", "b": "float32[4, 3]"},
    ]
    assert doc["tensors"] == [
        {"key": "count", "equal": False, "max_abs_diff": 1.5},  # 0-d tensors too
        {"key": "moved", "equal": False, "max_abs_diff": 0.5},
        {"key": "same", "equal": True, "max_abs_diff": 0.0},
    ]
    assert doc["values"] == [{"key": "epoch", "equal": True}, {"key": "lr", "equal": False}]
    code, out, _ = _run("diff", str(tmp_path / "a"), str(tmp_path / "a"))
    assert code == 0 and out.splitlines()[-1] == "identical: 6 of 6 common tensors equal"
    code, _, err = _run("diff", str(tmp_path / "a"), str(tmp_path / "missing"))
    assert code == 2 and "FileNotFoundError" in err


def test_diff_streams_a_tensor_larger_than_its_block() -> None:
    """8 MiB tensors compared in 16 blocks; every read stays near one block, far below the tensors.

    The memory:// backend returns each read as a fresh bytes object, which tracemalloc counts.
    """
    rows, cols = 4096, 512
    full = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    other = full.clone()
    other[rows - 1, cols - 1] -= 2.0
    url_a, url_b = f"memory://diff-{os.getpid()}/a", f"memory://diff-{os.getpid()}/b"
    _save_url(url_a, {"w": full})
    _save_url(url_b, {"w": other})
    block = 1024 * 1024  # float64 bytes per block: 256 rows, 512 KiB of float32 read per side
    blocks: list[int] = []
    tracemalloc.start()
    try:
        report = diff_checkpoints(url_a, url_b, block_bytes=block, progress=blocks.append)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(t.key, t.equal, t.max_abs_diff) for t in report.tensors] == [("w", False, 2.0)]
    assert blocks == [block // 2] * 16
    assert peak < 3 * 1024 * 1024, peak  # reading whole tensors would take 2 x 8 MiB


def test_diff_of_a_two_rank_checkpoint_with_itself_is_identical() -> None:
    code, out, _ = _run("diff", str(GOLDEN_TWO_RANK), str(GOLDEN_TWO_RANK), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["identical"] is True
    assert [t["key"] for t in doc["tensors"]] == ["model.b", "model.r", "model.w"]
    assert doc["values"] == [
        {"key": "pos", "equal": True},
        {"key": "rng", "equal": True},
        {"key": "step", "equal": True},
    ]


def _save_url(url: str, state: dict) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(state, url)
    ckpt.close()


# --- the console script -----------------------------------------------------------------------------


def test_console_script_is_declared_in_pyproject_and_resolves_to_the_group() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"shardsafe": "checkpoint.tools.cli:main"}
    module, attr = scripts["shardsafe"].split(":")
    group = getattr(importlib.import_module(module), attr)
    assert isinstance(group, click.Group)
    assert sorted(group.commands) == [
        "consolidate",
        "diff",
        "export-hf",
        "import-dcp",
        "inspect",
        "ls",
        "verify",
    ]


def test_console_script_is_installed_and_runs(run_root: Path) -> None:
    try:
        dist = importlib.metadata.distribution("shardsafe")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    declared = [e for e in (dist.entry_points if dist else []) if e.group == "console_scripts"]
    if not declared:
        if os.environ.get("CI") == "true":
            pytest.fail("shardsafe is not installed with its console script (CI runs `pip install -e .`)")
        pytest.skip(
            "the installed shardsafe distribution predates the console script (reinstall with pip install -e .)"
        )
    assert [(e.name, e.value) for e in declared] == [("shardsafe", "checkpoint.tools.cli:main")]
    # pip puts console scripts beside the interpreter; the venv need not be on PATH (make test does not activate it)
    beside = Path(sys.executable).parent / "shardsafe"
    exe = str(beside) if beside.exists() else shutil.which("shardsafe")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the shardsafe console script is not on PATH in CI")
        pytest.skip("shardsafe is not on PATH")
    result = subprocess.run([exe, "ls", str(run_root), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [s["step"] for s in json.loads(result.stdout)["steps"]] == [5, 10, 15]
