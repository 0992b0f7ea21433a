"""Retention: which steps of a run to delete, and on what evidence (pure: records in, records out).

One policy for both tiers. `steps_to_delete` answers for the durable root, `local_steps_to_delete`
for one node's local tier; the callers list, apply the answer and delete. The evidence rules:

- a step is deleted only when its listing was read successfully and says what the policy needs: a
  complete step the policy no longer keeps, or an incomplete one (its commit marker definitely not
  found) older than the newest complete step; an *unknown* step (its marker could not be read,
  `StepRecord.known` False) is never deleted and never counts as complete;
- never delete a *protected* step: the step whose commit triggered the purge, and the step this run
  resumed from until `keep_last` newer steps have committed in this run (`resume_protected`), so a
  resumed step is neither deleted before the run has replacements nor kept forever;
- a step a load found damaged (`unloadable`) neither takes a good step's place among the newest
  `keep_last` nor is deleted as one; it stays for inspection;
- keep the newest `keep_last` complete steps, every multiple of `keep_every`, and the newest complete
  step (the one a restart loads).

In the local tier the same rules hold among the steps *of this run on its current timeline*
(`checkpoint.run.identity`): a step of another run is never deleted (there is no evidence it is
garbage: another job may be using it), and a step of an abandoned timeline of this run is deleted.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from checkpoint.run.identity import RunRecord
from checkpoint.run.steps import StepRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPolicy:
    """How many steps to keep: the newest `keep_last` (None: all) and multiples of `keep_every`."""

    keep_last: int | None = None
    keep_every: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Deletion:
    """One step retention deletes, and why ("old": superseded; "incomplete": a failed save's leftover;
    "abandoned": a local step of a timeline a rollback ended)."""

    record: StepRecord
    reason: str


def check_count(name: str, value: Any, *, optional: bool = False) -> None:
    """`ValueError` naming the option unless `value` is an int >= 1 (or None when `optional`)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if optional else ''}, got {value!r}")


def resume_protected(
    resumed: int | None, committed_since: Collection[int], policy: RetentionPolicy
) -> set[int]:
    """The resumed step while it still needs protecting: until `keep_last` newer steps committed in this run."""
    if resumed is None:
        return set()
    newer = sum(1 for s in committed_since if s > resumed)
    if policy.keep_last is not None and newer >= policy.keep_last:
        return set()
    return {resumed}


def steps_to_delete(
    records: Sequence[StepRecord],
    policy: RetentionPolicy,
    *,
    protected: Collection[int] = (),
    unloadable: Collection[int] = (),
) -> list[Deletion]:
    """The steps of `records` (oldest first) that retention deletes, in that order.

    Args:
        records: the run's steps, oldest first (as `scan_steps` lists them).
        policy: how many complete steps to keep.
        protected: steps never deleted (the one resumed from, the one just committed).
        unloadable: complete steps a load found damaged: neither counted as complete nor deleted.
    """
    complete = [r.step for r in records if r.complete and r.known and r.step not in unloadable]
    if not complete:
        return []
    keep = set(complete if policy.keep_last is None else complete[-policy.keep_last :])
    if policy.keep_every is not None:
        keep |= {s for s in complete if s % policy.keep_every == 0}
    keep |= {complete[-1], *protected}
    deletions = []
    for record in records:
        if record.step in keep or record.step in unloadable or not record.known:
            continue
        if record.complete:
            deletions.append(Deletion(record=record, reason="old"))
        elif record.step < complete[-1]:
            deletions.append(Deletion(record=record, reason="incomplete"))
    return deletions


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalStep:
    """One step directory of a node's local tier: its step, whether committed, and its tag's run/timeline."""

    step: int
    committed: bool
    run_id: str | None  # None: no readable tag
    timeline: str | None


def local_steps_to_delete(
    steps: Sequence[LocalStep], record: RunRecord, keep_last: int, *, keep: Collection[int] = ()
) -> list[tuple[LocalStep, str]]:
    """The local steps (oldest first) retention deletes on one node, each with why.

    Only steps of `record`'s run are considered. Among them: a step of an abandoned timeline is
    deleted ("abandoned"); on the current history, the newest `keep_last` committed steps and `keep`
    (a step being uploaded) stay, and older committed steps ("old") and incomplete ones older than
    the newest committed ("incomplete") are deleted. A newer incomplete step may be a save in flight.
    """
    own = [s for s in steps if s.run_id == record.run_id and s.timeline is not None]
    current = [s for s in own if record.on_history(s.timeline, s.step)]  # type: ignore[arg-type]
    good = sorted(s.step for s in current if s.committed)
    kept = set(good[-keep_last:]) | set(keep)
    deletions = [(s, "abandoned") for s in own if s not in current and s.step not in keep]
    for s in current:
        if s.step in kept or not good or s.step >= good[-1]:
            continue
        deletions.append((s, "old" if s.committed else "incomplete"))
    return sorted(deletions, key=lambda d: d[0].step)
