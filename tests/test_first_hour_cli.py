"""Issue 17, "the first hour", on the command line: wrong paths, prefixes and patterns get clear answers.

The click group runs in-process (CliRunner, stdout and stderr kept apart), as in tests/test_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import checkpoint
from checkpoint.tools.cli import MAX_VALUE_CHARS, main


def _run(*args: str, width: int = 80) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), terminal_width=width)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A run with step 4 holding a small model under `model.` and a long optimizer value."""
    ckpt = checkpoint.make_sync_checkpointer()
    mgr = checkpoint.CheckpointManager(str(tmp_path / "run"), checkpointer=ckpt)
    groups = [{"lr": 0.001, "betas": [0.9, 0.999], "params": list(range(40))}]
    state = {"model": {"0": {"weight": torch.ones(2, 3), "bias": torch.arange(2.0)}}, "param_groups": groups}
    mgr.save(4, state)
    mgr.close()
    ckpt.close()
    return tmp_path / "run"


# --- case 12 ---------------------------------------------------------------------------------------


def test_ls_of_a_missing_root_exits_2(tmp_path: Path) -> None:
    code, out, err = _run("ls", str(tmp_path / "nope"))
    assert (code, out) == (2, "")
    assert err.strip() == f"error: FileNotFoundError: no run at {tmp_path}/nope: the directory does not exist"
    (tmp_path / "empty").mkdir()
    code, out, err = _run("ls", str(tmp_path / "empty"))
    assert (code, err.strip()) == (0, f"no step directories under {tmp_path}/empty")


@pytest.mark.s3
def test_ls_of_a_missing_s3_prefix_exits_2(s3_endpoint, s3_bucket: str) -> None:
    options = json.dumps(s3_endpoint.storage_options)
    code, out, err = _run("ls", f"{s3_bucket}/nope", "--storage-options", options)
    assert (code, out) == (2, "")
    assert (
        err.strip() == f"error: FileNotFoundError: no run at {s3_bucket}/nope: the directory does not exist"
    )
    code, out, err = _run("ls", s3_bucket, "--storage-options", options)
    assert (code, err.strip()) == (0, f"no step directories under {s3_bucket}")


def test_verify_of_a_run_root_points_to_ls(saved: Path) -> None:
    code, out, err = _run("verify", str(saved))
    assert (code, out) == (2, "")
    assert err.strip() == (
        f"error: FileNotFoundError: {saved} is a run with 1 step(s), not a checkpoint: `shardsafe ls {saved}` "
        "lists them"
    )


# --- case 13 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["model", "model."])
def test_export_prefix_is_a_key_path_and_says_what_it_selected(saved: Path, tmp_path: Path, prefix: str):
    out_dir = tmp_path / f"hf-{prefix}"
    code, out, err = _run("export-hf", str(saved / "step-000000004"), str(out_dir), "--prefix", prefix)
    assert code == 0, err
    tensors = load_file(str(out_dir / "model.safetensors"))
    assert sorted(tensors) == ["0.bias", "0.weight"]
    assert torch.equal(tensors["0.weight"], torch.ones(2, 3)) and torch.equal(
        tensors["0.bias"], torch.arange(2.0)
    )
    assert err.splitlines()[0] == "--prefix selected the 2 tensor key(s) under 'model.', written without it"


# --- case 14 ---------------------------------------------------------------------------------------


def test_inspect_with_keys_matching_nothing_exits_1(saved: Path) -> None:
    step = str(saved / "step-000000004")
    code, out, err = _run("inspect", step, "--keys", "nomatch*")
    assert code == 1
    assert err.strip() == (
        "no keys match 'nomatch*' (a glob over the full keys); its top-level keys: 'model.*', 'param_groups'"
    )
    code, out, err = _run("inspect", step, "--keys", "nomatch*", "--json")
    assert code == 1 and json.loads(out)["tensors"] == []
    assert _run("inspect", step, "--keys", "model.*")[0] == 0


def test_inspect_cuts_long_values_short_and_json_shows_them_whole(saved: Path) -> None:
    step = str(saved / "step-000000004")
    code, out, _ = _run("inspect", step)
    assert code == 0
    row = next(line for line in out.splitlines() if line.lstrip().startswith("param_groups"))
    shown = row.split("param_groups", 1)[1].strip()
    assert len(shown) == MAX_VALUE_CHARS and shown.endswith("…")
    assert (
        shown[:-1]
        == repr([{"lr": 0.001, "betas": [0.9, 0.999], "params": list(range(40))}])[: MAX_VALUE_CHARS - 1]
    )
    assert max(len(line) for line in out.splitlines()) < 100
    doc = json.loads(_run("inspect", step, "--json")[1])
    (value,) = [v["value"] for v in doc["values"] if v["key"] == "param_groups"]
    assert value == repr([{"lr": 0.001, "betas": [0.9, 0.999], "params": list(range(40))}])


# --- case 15 ---------------------------------------------------------------------------------------


def test_every_subcommand_help_is_whole_in_the_group_help() -> None:
    code, out, _ = _run("--help")
    assert code == 0
    commands = out.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in commands] == [
        "consolidate",
        "diff",
        "export-hf",
        "import-dcp",
        "inspect",
        "ls",
        "verify",
    ]
    assert not any(line.rstrip().endswith("...") for line in commands), out
    assert "  ls           List the steps of a run, oldest first." in commands
