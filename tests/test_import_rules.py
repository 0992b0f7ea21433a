"""The library's layering, cycles and module sizes, checked statically (see `tests/import_rules.py`).

Each rule is also run against a small tree broken on purpose, so a rule that stopped firing fails here
instead of passing silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.import_rules import MAX_MODULE_LINES, Violation, check_tree

REPO = Path(__file__).resolve().parent.parent


def test_the_library_keeps_its_import_rules():
    assert check_tree(REPO) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A throwaway library tree: every package the rules know, plus `files` (path -> source)."""
    for package in ("checkpoint", "planners", "storage", "checkpoint/save", "checkpoint/load"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text('"""A package."""\n')
    for path, source in files.items():
        (tmp_path / path).write_text(source)
    return tmp_path


@pytest.mark.parametrize(
    ("path", "source", "detail"),
    [
        ("planners/plan.py", "from checkpoint.errors import CheckpointError\n", "imports checkpoint.errors"),
        ("planners/plan.py", "def f():\n    import storage.local\n", "imports storage.local"),
        ("planners/plan.py", "import torch.distributed as dist\n", "imports torch.distributed"),
        ("storage/disk.py", "from checkpoint import types\n", "imports checkpoint"),
        (
            "checkpoint/load/read.py",
            "from checkpoint.testing.ranks import run_ranks\n",
            "imports checkpoint.testing.ranks",
        ),
    ],
)
def test_a_layering_break_is_reported(tmp_path, path, source, detail):
    found = check_tree(_tree(tmp_path, {path: source}))
    name = path.removesuffix(".py").replace("/", ".")
    assert Violation(rule="layering", module=name, detail=detail) in found


def test_a_subpackage_importing_a_part_it_may_not_is_reported(tmp_path):
    found = check_tree(
        _tree(
            tmp_path,
            {
                "checkpoint/load/read.py": "from checkpoint.save import commit\n",
                "checkpoint/save/commit.py": '"""Commit."""\n',
            },
        )
    )
    assert found == [
        Violation(
            rule="subpackage",
            module="checkpoint.load.read",
            detail="imports checkpoint.save.commit (checkpoint.save not allowed)",
        )
    ]


def test_a_cycle_through_a_function_level_import_is_reported(tmp_path):
    files = {
        "planners/a.py": "from planners.b import g\n\ndef f():\n    return g()\n",
        "planners/b.py": "def g():\n    from planners.c import h\n    return h()\n",
        "planners/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from planners.a import f\n",
    }
    found = check_tree(_tree(tmp_path, files))
    assert found == [
        Violation(rule="cycle", module="planners.a", detail="planners.a <-> planners.b <-> planners.c")
    ]


def test_a_module_over_the_size_limit_is_reported(tmp_path):
    found = check_tree(_tree(tmp_path, {"storage/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1)}))
    assert found == [
        Violation(rule="size", module="storage.big", detail=f"{MAX_MODULE_LINES + 1} lines > 400")
    ]
    assert check_tree(_tree(tmp_path, {"storage/big.py": "x = 1\n" * MAX_MODULE_LINES})) == []


def test_no_folder_of_the_library_holds_more_than_fifteen_modules():
    """A reader sees the parts from `ls checkpoint/`: a folder past 15 modules wants splitting."""
    crowded = {
        str(folder.relative_to(REPO)): n
        for package in ("checkpoint", "planners", "storage")
        for folder in [REPO / package, *(REPO / package).rglob("*/")]
        if folder.is_dir()
        and (n := len([p for p in folder.glob("*.py") if p.name != "__init__.py"])) > 15
        and package == "checkpoint"
    }
    assert crowded == {}


def test_the_tiers_importing_the_manager_is_reported_as_a_knot(tmp_path):
    """Issue 23 item 16: `checkpoint.tiers` imported `manager/steps.py` while `manager/` imported `tiers/`."""
    files = {
        "checkpoint/manager/__init__.py": '"""Manager."""\n',
        "checkpoint/manager/manager.py": "from checkpoint.tiers.local_tier import LocalTier\n",
        "checkpoint/manager/steps.py": '"""Steps."""\n',
        "checkpoint/tiers/__init__.py": '"""Tiers."""\n',
        "checkpoint/tiers/local_tier.py": "from checkpoint.manager.steps import StepRecord\nLocalTier = 1\n",
    }
    for package in ("checkpoint/manager", "checkpoint/tiers"):
        (tmp_path / package).mkdir(parents=True)
    found = check_tree(_tree(tmp_path, files))
    assert (
        Violation(rule="knot", module="checkpoint.manager", detail="checkpoint.manager <-> checkpoint.tiers")
        in found
    )
    assert (
        Violation(
            rule="subpackage",
            module="checkpoint.tiers.local_tier",
            detail="imports checkpoint.manager.steps (checkpoint.manager not allowed)",
        )
        in found
    )


def test_the_run_vocabulary_imports_neither_tier(tmp_path):
    files = {
        "checkpoint/run/__init__.py": '"""Run."""\n',
        "checkpoint/run/steps.py": "from checkpoint.manager import manager\n",
        "checkpoint/manager/__init__.py": '"""Manager."""\n',
        "checkpoint/manager/manager.py": '"""Manager."""\n',
    }
    for package in ("checkpoint/run", "checkpoint/manager"):
        (tmp_path / package).mkdir(parents=True)
    found = check_tree(_tree(tmp_path, files))
    assert found == [
        Violation(
            rule="subpackage",
            module="checkpoint.run.steps",
            detail="imports checkpoint.manager.manager (checkpoint.manager not allowed)",
        )
    ]
