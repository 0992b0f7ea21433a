"""Issue 25, "the first hour, round two": a new user's scripts, run as the user ran them.

Each case runs a small training-style script in a fresh interpreter, in its own directory (the
script's directory comes first on sys.path, as for `python train.py`), and checks what the user
reads: the warning, the traceback's last line, the exit status. Multi-rank cases are in
tests/test_first_hour2_ranks.py; the command line in tests/test_first_hour2_cli.py.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import checkpoint
from planners.errors import MismatchError, MissingKeysError

ROOT = Path(__file__).resolve().parent.parent
_TIMEOUT_SECS = 120


def _run(
    tmp_path: Path, script: str, *args: str, warnings_as_errors: bool = False
) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in `tmp_path`, with this tree's packages importable (as if installed)."""
    (tmp_path / "train.py").write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, *(["-W", "error::UserWarning"] if warnings_as_errors else []), "train.py", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=_TIMEOUT_SECS)


def _warnings(stderr: str) -> list[str]:
    """The text of each `UserWarning` line Python printed."""
    return [line.split("UserWarning: ", 1)[1] for line in stderr.splitlines() if "UserWarning: " in line]


# --- item 1: a partial mismatch loads part of the target; the default says what stayed ---------------

_NESTED = """
    import sys, torch, checkpoint
    from torch import nn
    torch.manual_seed(0)
    model, fresh = nn.Linear(3, 2), nn.Linear(3, 2)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"train": {"model": model.state_dict(), "optim": optim.state_dict()}, "step": 7}, "ckpt")
    before = fresh.weight.detach().clone()
    kwargs = {} if sys.argv[1] == "default" else {"strict": sys.argv[1] == "True"}
    try:
        out = ckpt.load("ckpt", {"model": fresh.state_dict(), "step": 0}, **kwargs)
    except checkpoint.MissingKeysError as e:
        print("raised", e.missing)
        raise
    assert out["step"] == 7 and torch.equal(fresh.weight, before), "the model is untouched"
    print("loaded step", out["step"])
    ckpt.close()
"""


def test_a_target_nested_differently_warns_naming_where_its_keys_were_saved(tmp_path: Path) -> None:
    done = _run(tmp_path, _NESTED, "default")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "loaded step 7\n"
    assert _warnings(done.stderr) == [
        f"load from {tmp_path}/ckpt left 2 of the target's 3 key(s) unloaded; they keep the values they had: "
        "'model.bias' (saved as 'train.model.bias'), 'model.weight' (saved as 'train.model.weight'). "
        "The checkpoint holds these keys under 'train.': nest the target the same way (e.g. "
        "{'train': {'model': ...}}). Pass strict=True to raise instead, or strict=False to load what "
        "matches without this warning"
    ]
    assert (
        f"{tmp_path}/train.py:12: UserWarning" in done.stderr
    )  # the warning points at the user's load() call


def test_an_explicit_strict_false_load_of_the_same_target_is_silent(tmp_path: Path) -> None:
    done = _run(tmp_path, _NESTED, "False", warnings_as_errors=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "loaded step 7\n" and _warnings(done.stderr) == []


def test_a_strict_load_names_the_nearest_saved_keys_and_the_nesting(tmp_path: Path) -> None:
    """Item 9: the strict error gives the same saved keys and nesting hint as the warning."""
    done = _run(tmp_path, _NESTED, "True")
    assert done.returncode == 1
    assert done.stdout == "raised ['model.bias', 'model.weight']\n"
    assert done.stderr.strip().splitlines()[-1] == (
        f"checkpoint.MissingKeysError: checkpoint at {tmp_path}/ckpt lacks 2 key(s) the target asks for: 'model.bias', "
        "'model.weight'. Nearest saved keys: 'model.bias' (saved as 'train.model.bias'), 'model.weight' "
        "(saved as 'train.model.weight'). The checkpoint holds these keys under 'train.': nest the target "
        "the same way (e.g. {'train': {'model': ...}}). Fix the target's keys, or load with strict=False "
        "to fill only what matches"
    )


_GROWN = """
    import torch, checkpoint
    from torch import nn
    torch.manual_seed(0)
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).state_dict(), "ckpt")
    grown = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    before = grown[2].weight.detach().clone()
    grown.load_state_dict(ckpt.load("ckpt", grown.state_dict()))
    assert torch.equal(grown[2].weight, before)  # the new layer keeps its initialisation
    ckpt.close()
"""


def test_a_model_with_an_extra_layer_warns_naming_it_and_the_nearest_saved_layer(tmp_path: Path) -> None:
    done = _run(tmp_path, _GROWN)
    assert done.returncode == 0, done.stderr
    assert _warnings(done.stderr) == [
        f"load from {tmp_path}/ckpt left 2 of the target's 6 key(s) unloaded; they keep the values they had: "
        "'2.bias' (nearest saved key: '1.bias'), '2.weight' (nearest saved key: '1.weight'). Pass "
        "strict=True to raise instead, or strict=False to load what matches without this warning"
    ]


def test_the_warning_names_five_keys_and_counts_the_rest(tmp_path: Path) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    path = str(tmp_path / "c")
    ckpt.save({"w": torch.ones(1)}, path)
    target = {"w": torch.zeros(1), **{f"new{i}": torch.zeros(1) for i in range(7)}}
    with pytest.warns(UserWarning) as record:
        ckpt.load(path, target)
    ckpt.close()
    (message,) = [str(r.message) for r in record]
    assert message.startswith(f"load from {path} left 7 of the target's 8 key(s) unloaded; they keep")
    assert "'new0' (nearest saved key: 'w')" not in message  # too unlike to be offered
    assert "'new0' (no similar saved key), 'new1' (no similar saved key)" in message
    assert "'new4' (no similar saved key), ... (7 in all). Pass strict=True" in message
    assert "'new5'" not in message
    assert torch.equal(target["w"], torch.ones(1))


# --- item 4: a project file named like one of shardsafe's packages ------------------------------------

_IMPORTS = """
    import checkpoint
    print(checkpoint.make_sync_checkpointer)
"""


@pytest.mark.parametrize(
    ("shadow", "name", "kind"),
    [
        ("storage.py", "storage", "file"),
        ("planners.py", "planners", "file"),
        ("storage/__init__.py", "storage", "folder"),
    ],
)
def test_a_project_file_shadowing_a_package_is_named_with_the_fix(
    tmp_path: Path, shadow: str, name: str, kind: str
) -> None:
    (tmp_path / shadow).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / shadow).write_text("BUCKET = 'my-bucket'  # the project's own module\n")
    done = _run(tmp_path, _IMPORTS)
    assert done.returncode == 1
    shown = tmp_path / (name if kind == "folder" else shadow)
    assert done.stderr.strip().splitlines()[-1] == (
        f"ImportError: shardsafe cannot import its package {name!r}: the {kind} {shown} is imported under "
        "that name instead, because its directory comes first on sys.path (the script's directory or the "
        f"current one). Rename that {kind} (e.g. to my_{name}) or run from a directory that does not hold "
        "it; shardsafe's top-level packages are checkpoint, planners, storage"
    )


def test_a_namespace_folder_or_a_renamed_file_does_not_shadow(tmp_path: Path) -> None:
    (tmp_path / "storage").mkdir()  # data directory without __init__.py: Python prefers the real package
    (tmp_path / "storage" / "data.bin").write_bytes(b"\0")
    (tmp_path / "my_storage.py").write_text("BUCKET = 'my-bucket'\n")  # the fix the error suggests
    done = _run(tmp_path, _IMPORTS)
    assert done.returncode == 0 and done.stdout.startswith("<function make_sync_checkpointer"), done.stderr


# --- item 7: a DCP directory given to load ---------------------------------------------------------

_DCP = """
    import torch, checkpoint
    import torch.distributed.checkpoint as dcp
    dcp.save({"w": torch.arange(4.0)}, checkpoint_id="dcp_ckpt")
    checkpoint.make_sync_checkpointer().load("dcp_ckpt")
"""


def test_loading_a_dcp_directory_says_it_is_one_and_how_to_convert_it(tmp_path: Path) -> None:
    done = _run(tmp_path, _DCP)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"FileNotFoundError: {tmp_path}/dcp_ckpt is a torch.distributed.checkpoint (DCP) checkpoint (.metadata, "
        f"no metadata.json): convert it once with `shardsafe import-dcp {tmp_path}/dcp_ckpt NEW_DIR` (checkpoint.import_dcp "
        "in Python) and load NEW_DIR; code that calls dcp.load can then read NEW_DIR with "
        "storage_reader=checkpoint.integrations.dcp.ShardsafeStorageReader(NEW_DIR)"
    )


# --- item 8: load's arguments swapped --------------------------------------------------------------

_SWAPPED = """
    import torch, checkpoint
    ckpt = checkpoint.make_sync_checkpointer()
    state = {"w": torch.ones(2)}
    ckpt.save(state, "ckpt")
    ckpt.load(state, "ckpt")
"""


def test_load_with_swapped_arguments_says_so(tmp_path: Path) -> None:
    done = _run(tmp_path, _SWAPPED)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == "TypeError: load() takes (path, state_dict): the arguments are swapped"


def test_swapped_arguments_are_refused_for_every_state_kind(tmp_path: Path) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    for state in ({"w": torch.zeros(2)}, [torch.zeros(2)], torch.nn.Linear(2, 2)):
        for path in (str(tmp_path / "c"), tmp_path / "c"):
            with pytest.raises(
                TypeError, match=r"^load\(\) takes \(path, state_dict\): the arguments are swapped$"
            ):
                ckpt.load(state, path)
    ckpt.close()


# --- item 17: tracebacks print the public names ------------------------------------------------------

_MISMATCH = """
    import torch, checkpoint
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save({"w": torch.ones(2)}, "ckpt")
    try:
        ckpt.load("ckpt", {"w": torch.zeros(3)})
    except checkpoint.MismatchError as e:
        print("caught", type(e).__module__, type(e).__qualname__)
    ckpt.load("ckpt", {"w": torch.zeros(3)})
"""


def test_tracebacks_name_errors_as_users_catch_them(tmp_path: Path) -> None:
    done = _run(tmp_path, _MISMATCH)
    assert done.returncode == 1
    assert done.stdout == "caught checkpoint MismatchError\n"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"checkpoint.MismatchError: {tmp_path}/ckpt: key 'w'"), last
    assert "planners.errors" not in done.stderr


@pytest.mark.parametrize("name", checkpoint.errors.__all__)
def test_every_public_error_is_named_and_pickled_as_checkpoint_name(name: str) -> None:
    cls = getattr(checkpoint, name)
    assert (cls.__module__, cls.__qualname__) == ("checkpoint", name)
    if cls is MissingKeysError:
        error = cls("m", ["a"])
    elif cls is checkpoint.DistributedCheckpointError:
        error = cls("m", {1: "x"})
    else:
        error = cls("m")
    back = pickle.loads(pickle.dumps(error))  # errors travel between ranks and the writer process
    assert type(back) is cls and str(back) == str(error)


def test_the_class_is_the_one_planners_defines() -> None:
    from planners import errors

    assert checkpoint.MismatchError is errors.MismatchError is MismatchError
