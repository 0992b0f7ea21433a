"""One node's local steps as its run sees them: tags, reuse of a step directory, retention, leftovers.

Every local step directory holds a tag (`checkpoint.run.identity.RUN_FILE`: the run record as of the
save, and the durable root it belongs to), written by the node's local rank 0 before any file of
the save. What may be deleted follows `checkpoint.run.retention`: only steps whose tag names this
run; among them, those of an abandoned timeline, those retention no longer keeps, and leftovers of
interrupted saves. Steps of another run, or without a readable tag, are never deleted (another job
may be using them; there is no evidence they are garbage); they are warned about once and never
used. A step directory of this run is emptied before a new save of that step reuses it, so a
truncated file of a killed save is never replicated or counted.
"""

from __future__ import annotations

import logging
import os
import shutil

from checkpoint.run.identity import RUN_FILE, LocalTag, RunRecord, parse_tag
from checkpoint.run.retention import LocalStep, local_steps_to_delete
from checkpoint.run.steps import step_dir_name
from checkpoint.tiers.tier_files import TEMP_MARK, list_holdings
from planners.metadata import METADATA_FILE

logger = logging.getLogger(__name__)

# A tag is small; anything larger is not one.
MAX_TAG_BYTES = 1024 * 1024
# `<prefix><job nonce>-<node>`: each node's marker in its local_root while its job runs.
NODE_MARKER_PREFIX = ".shardsafe-node-"


def read_tag(directory: str) -> LocalTag | None:
    """The tag of a local step directory; None when it has none or it cannot be read or parsed."""
    path = os.path.join(directory, RUN_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_TAG_BYTES + 1)
        return parse_tag(data, where=path)
    except (OSError, ValueError):
        return None


def write_tag(directory: str, tag: LocalTag) -> None:
    """Write the tag through a temporary name, so a reader never sees half of one."""
    temp = os.path.join(directory, f"{RUN_FILE}{TEMP_MARK}tag")
    with open(temp, "wb") as f:
        f.write(tag.to_bytes())
    os.replace(temp, os.path.join(directory, RUN_FILE))


def list_tags(root: str, steps: list[int]) -> dict[int, LocalTag | None]:
    return {step: read_tag(os.path.join(root, step_dir_name(step))) for step in steps}


def local_steps(root: str) -> list[LocalStep]:
    """This node's step directories, with what their tags say (oldest first)."""
    held = list_holdings(root)
    tags = list_tags(root, sorted(held))
    return [
        LocalStep(
            step=step,
            committed=held[step].committed,
            run_id=None if tags[step] is None else tags[step].record.run_id,
            timeline=None if tags[step] is None else tags[step].record.timeline,
        )
        for step in sorted(held)
    ]


def prepare_step_dir(root: str, step: int, tag: LocalTag) -> str | None:
    """Make `root/step-N` ready for this run's save of `step`; None (and a warning) when it is not ours.

    A directory of this run (its tag says so) or an empty one is emptied, commit marker first, and
    tagged; one of another run, or holding files without a tag, is left as it is and the save skipped.
    """
    os.makedirs(root, exist_ok=True)
    directory = os.path.join(root, step_dir_name(step))
    if os.path.islink(directory):
        logger.warning(
            "local tier: %s is a symbolic link; the local save of step %d is skipped", directory, step
        )
        return None
    os.makedirs(directory, exist_ok=True)
    found = read_tag(directory)
    entries = os.listdir(directory)
    if entries and (found is None or found.record.run_id != tag.record.run_id):
        owner = "no readable tag" if found is None else f"run {found.record.run_id}"
        logger.warning(
            "local tier: %s holds files of %s, not of this run (%s); it is kept, and the local save of "
            "step %d is skipped",
            directory,
            owner,
            tag.record.run_id,
            step,
        )
        return None
    _empty(directory, entries)
    write_tag(directory, tag)
    return directory


def _empty(directory: str, entries: list[str]) -> None:
    """Remove a step directory's files: the commit marker first (see `remove_step_dir`).

    Evidence: the caller read the directory's tag and found it this run's, or the directory empty.
    """
    for name in sorted(entries, key=lambda n: n != METADATA_FILE):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def prune(
    root: str, record: RunRecord, keep_last: int, keep: set[int] | frozenset[int] = frozenset()
) -> None:
    """Delete what `local_steps_to_delete` picks among this node's steps (this run's only).

    Evidence: each step's tag, read successfully, names this run, and the policy drops it; a step
    without a readable tag is another run's for this purpose and stays.
    """
    for found, reason in local_steps_to_delete(local_steps(root), record, keep_last, keep=keep):
        remove_step_dir(os.path.join(root, step_dir_name(found.step)))
        logger.info("local tier: deleted %s step %d from %s", reason, found.step, root)


def clean_leftovers(root: str, record: RunRecord | None) -> None:
    """At start: temporary names of interrupted receipts in this run's step directories, this run's
    abandoned steps, and its incomplete steps older than its newest committed one (they can never
    be loaded). Newer incomplete ones may hold verified copies a recovery can still use; committed
    ones stay until retention after this job's first local commit."""
    os.makedirs(root, exist_ok=True)
    if record is None:
        return
    found = local_steps(root)
    for step in found:
        if step.run_id != record.run_id:
            continue
        directory = os.path.join(root, step_dir_name(step.step))
        for entry in os.listdir(directory):
            if TEMP_MARK in entry:
                os.unlink(os.path.join(directory, entry))
    for step, reason in local_steps_to_delete(found, record, keep_last=len(found) + 1):
        remove_step_dir(os.path.join(root, step_dir_name(step.step)))
        logger.info("local tier: removed leftover %s step %d from %s", reason, step.step, root)


def warn_foreign(root: str, record: RunRecord) -> None:
    """One warning naming the steps of other runs (or without a tag) this node keeps and never uses."""
    foreign = [s.step for s in local_steps(root) if s.run_id != record.run_id]
    if foreign:
        logger.warning(
            "local tier: %s holds %d step(s) of another run or without a tag (%s); they are never used "
            "by this run (%s) and never deleted by it; delete them by hand when their run is over",
            root,
            len(foreign),
            foreign[:8],
            record.run_id,
        )


def remove_step_dir(directory: str) -> None:
    """The commit marker first, so a deletion cut short leaves an incomplete step, never a false one.

    Deletes without checking: callers reach it only through `prune` or `clean_leftovers`, which hold
    the evidence (this run's tag, read successfully, and the policy's verdict).
    """
    try:
        os.unlink(os.path.join(directory, METADATA_FILE))
    except FileNotFoundError:
        pass
    shutil.rmtree(directory, ignore_errors=True)


def write_node_marker(root: str, nonce: str, node: int) -> str:
    """Mark `root` as node `node`'s for the job `nonce` (see `other_nodes`); returns the marker's path."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f"{NODE_MARKER_PREFIX}{nonce}-{node}")
    with open(path, "w") as f:
        f.write(f"{node}\n")
    return path


def other_nodes(root: str, nonce: str, node: int) -> list[int]:
    """The other nodes of job `nonce` whose marker is in `root`: non-empty when nodes share the directory."""
    prefix = f"{NODE_MARKER_PREFIX}{nonce}-"
    found = []
    for name in os.listdir(root):
        if name.startswith(prefix) and name[len(prefix) :].isdigit() and int(name[len(prefix) :]) != node:
            found.append(int(name[len(prefix) :]))
    return sorted(found)
