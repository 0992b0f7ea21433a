"""Retention for `CheckpointManager`: deleting the durable steps the policy no longer keeps.

The choice is pure (`checkpoint.run.retention.steps_to_delete`: records in, records out) so every
rule is tested without storage; `prune` lists the run, applies it and deletes (rank 0 only, in the
trainer thread, after a commit). The rules, in order of precedence:

- never delete a *protected* step: the step this manager resumed from (the one step known to
  load) until `keep_last` newer steps committed in this run, and the step whose commit
  triggered this purge, whatever `keep_last` says;
- never delete an *unknown* step (its metadata could not be read): no evidence either way;
- never touch an *unloadable* step (complete on storage, but a load found it damaged and it could
  not be renamed aside): it does not count as complete, so it can neither take the place of a good
  step among the newest `keep_last` nor be deleted as one; it stays for inspection;
- keep the newest `keep_last` complete steps, every multiple of `keep_every`, and the newest
  complete step (the one a restart loads);
- delete the other complete steps, and incomplete steps older than the newest complete one
  (leftovers of failed saves; a newer incomplete step may be a save in flight).

A step directory that is a symbolic link loses only the link (`manager_steps.remove_step`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from checkpoint.run.retention import Deletion, RetentionPolicy, resume_protected, steps_to_delete
from checkpoint.run.steps import quarantine_step, remove_step, scan_steps
from checkpoint.run.sweep import INCREMENTAL_RUN, referenced_files, sweep_step
from checkpoint.save.lease import live_save_ids
from storage.redact import display_url
from storage.spec import StorageSpec

logger = logging.getLogger(__name__)

__all__ = ["Deletion", "RetentionPolicy", "prune", "quarantine", "resume_protected", "steps_to_delete"]


def prune(
    root: StorageSpec,
    policy: RetentionPolicy,
    protected: Collection[int],
    *,
    unloadable: Collection[int],
    warned: set[str],
) -> None:
    """List the run under `root` and delete what `steps_to_delete` picks (raises the first failure)."""
    found = scan_steps(root, warned=warned)
    specs = {record.step: spec for spec, record in found}
    chosen = steps_to_delete(
        [record for _, record in found], policy, protected=protected, unloadable=unloadable
    )
    if not chosen:
        return
    # Incremental steps (checkpoint.run.sweep): mark what the kept steps reference, first.
    # A kept step whose metadata could not be read (unknown) makes the mark fail: nothing is deleted.
    doomed = {d.record.step for d in chosen}
    kept = [s for s, r in found if r.step not in doomed and (r.complete or not r.known)]
    marked = referenced_files(kept)
    if marked is None or (
        INCREMENTAL_RUN in marked and _save_in_flight([s for s, r in found if not r.complete])
    ):
        return  # no evidence, or a save in flight may be about to reference a dropped step: next purge
    for deletion in chosen:
        spec = specs[deletion.record.step]
        keep = marked.get(spec.root.rstrip("/").rsplit("/", 1)[-1], set())
        if keep:
            sweep_step(spec, keep)
        else:
            remove_step(spec)
        logger.info("deleted %s step %d (%s)", deletion.reason, deletion.record.step, deletion.record.path)


def _save_in_flight(incomplete: list[StorageSpec]) -> bool:
    """Whether one of these step directories holds a live in-progress marker (an unreadable one counts)."""
    for spec in incomplete:
        storage = spec.open()
        try:
            if live_save_ids(storage, storage.list_names(), own="")[0]:
                logger.info("retention waits: a save is in flight at %s", spec.url)
                return True
        finally:
            storage.close()
    return False


def quarantine(root: StorageSpec, path: str, step: int) -> bool:
    """Rename the damaged step at `path` (a directory of `root`) aside; False when it stays in place.

    Called on rank 0 once every rank is done with the step. Where it stays (an object store, or the
    rename failed) the manager leaves it out of retention instead.
    """
    try:
        moved = quarantine_step(root.child(path.rstrip("/").rsplit("/", 1)[-1]))
    except OSError as e:
        logger.warning("could not rename damaged step %d aside (%s); it stays in place", step, e)
        return False
    if moved is None:
        where = display_url(path)
        logger.warning("damaged step %d stays in place at %s; retention will not delete it", step, where)
        return False
    logger.warning("damaged step %d renamed to %s for inspection; delete it when done", step, moved)
    return True
