"""The step directories of a run, as the manager and `shardsafe ls` name them: see `checkpoint.run.steps`.

The run's vocabulary moved below both tiers (`checkpoint.run`); this module keeps the names importable
from where they were.
"""

from __future__ import annotations

from checkpoint.run.steps import (
    QUARANTINE_SUFFIX,
    STEP_DIGITS,
    STEP_DIR_RE,
    StepRecord,
    check_run_root,
    join,
    list_step_dirs,
    modified_at,
    not_a_directory,
    parse_step_dir,
    quarantine_step,
    remove_step,
    scan_steps,
    step_dir_name,
    step_dirs,
)

__all__ = [
    "QUARANTINE_SUFFIX",
    "STEP_DIGITS",
    "STEP_DIR_RE",
    "StepRecord",
    "check_run_root",
    "join",
    "list_step_dirs",
    "modified_at",
    "not_a_directory",
    "parse_step_dir",
    "quarantine_step",
    "remove_step",
    "scan_steps",
    "step_dir_name",
    "step_dirs",
]
