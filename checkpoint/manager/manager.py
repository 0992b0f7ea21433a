"""CheckpointManager: the training-loop glue around a checkpointer (steps, resume, retention, preemption).

A run is a root directory with one checkpoint per step (`ROOT/step-000000100/`,
see `checkpoint.manager.steps`). Every rank calls the manager at the same
points, as it calls `save`:

- `load(state)` on start-up: rank 0 lists the run and shares the list; the
  ranks try the newest complete step and agree on the outcome, so a step that
  is damaged (bad metadata, a missing or corrupt shard file) is skipped by all
  of them together, with a warning naming it, and the next older one is tried.
  Rank 0 then quarantines the damaged step (renames it aside, where a rename is
  cheap), so that neither retention nor a later restart takes it for a good one.
  Incomplete steps (no commit marker) are never tried.
- `save(step, state)` every step: a save happens when `step` is a multiple of
  `interval_steps`, when forced, or after a preemption signal. With an async
  checkpointer it returns once the state is staged.
- Retention (`checkpoint.manager.retention`) runs on rank 0 only, in the calling thread,
  and only once the save that makes old steps redundant is committed: right
  after a sync save; for an async save by whichever call first learns that its
  write committed: a `save()` that finds it finished, the next save (which waits
  for it before starting), or `wait_until_finished()` / `close()`. Because a load
  and a purge both run in the trainer thread, a purge never deletes a step a load
  is reading. It never deletes the newest complete step, the step just committed,
  a step whose metadata could not be read (unknown), or the step this manager
  resumed from until `keep_last` newer steps have committed in this run
  (`checkpoint.run.retention`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from checkpoint.checkpointer import Checkpointer
from checkpoint.manager.attempt import FAILED, LOADED, attempt_load
from checkpoint.manager.incremental import incremental_saves
from checkpoint.manager.listing import INCOMPLETE, load_step, shared_listing
from checkpoint.manager.retention import RetentionPolicy, prune, quarantine, resume_protected
from checkpoint.manager.signals import PreemptionNotice, agreement_group
from checkpoint.run.retention import check_count
from checkpoint.run.steps import StepRecord, check_run_root, join, scan_steps, step_dir_name
from checkpoint.save.plan_exchange import comparable_path
from checkpoint.tiers.manager_tier import (
    abandoned_steps,
    build_local_tier,
    durable_or_none,
    load_named,
    merge_records,
    recover_tiers,
)
from checkpoint.types import STATE_DICT, RankInfo, checkpoint_path
from planners.errors import CheckpointStateError, DistributedCheckpointError
from storage.redact import display_url
from storage.spec import StorageSpec

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Saves a training run's state every `interval_steps` steps under `root`, resumes it, prunes old steps.

    Args:
        root: the run's directory: local path (str or `os.PathLike`) or fsspec URL (`s3://bucket/run`).
        checkpointer: a sync or async checkpointer (`make_sync_checkpointer`, `make_async_checkpointer`);
            the manager does not close it.
        keep_last: keep the newest `keep_last` complete steps (None: keep every step).
        keep_every: also keep every step that is a multiple of `keep_every` (None: none extra).
        interval_steps: `save(step, ...)` saves when `step % interval_steps == 0`.
        save_on_signals: signals (e.g. `(signal.SIGTERM,)`) after which the next `save()` saves
            whatever the interval and waits until the step is durable. Empty: no handler installed.
        preemption_check_steps: in a multi-rank job, ranks agree on a received signal with one small
            all-reduce at steps that are multiples of this (1: at every `save()` call).
        storage_options: fsspec options for `root`; default: the checkpointer's.
        local_root, local_interval_steps, local_keep_last, replicas, local_address: the node-local
            tier (`checkpoint.tiers.manager_tier.build_local_tier`); None: no local tier.

    Raises:
        ValueError: an option is out of range, or signals are asked for outside the main thread.

    Example:
        >>> ckpt = checkpoint.make_async_checkpointer()
        >>> mgr = checkpoint.CheckpointManager("/ckpts/run", checkpointer=ckpt, keep_last=3, interval_steps=100)
        >>> start = mgr.load(state)  # None on a fresh start
        >>> for step in range(0 if start is None else start + 1, 1000):
        ...     train_step()
        ...     mgr.save(step, state)
        >>> mgr.close()
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        checkpointer: Checkpointer,
        keep_last: int | None = None,
        keep_every: int | None = None,
        interval_steps: int = 1,
        save_on_signals: Sequence[int] = (),
        preemption_check_steps: int = 1,
        storage_options: Mapping[str, Any] | None = None,
        local_root: str | None = None,
        local_interval_steps: int | None = None,
        local_keep_last: int = 2,
        replicas: int = 1,
        local_address: str | None = None,
        incremental: bool = False,
        full_every: int = 10,  # checkpoint.manager.incremental
    ) -> None:
        root = checkpoint_path(root, what="root")
        check_count("keep_last", keep_last, optional=True)
        check_count("keep_every", keep_every, optional=True)
        check_count("interval_steps", interval_steps)
        check_count("preemption_check_steps", preemption_check_steps)
        self.root = root.rstrip("/")
        self.keep_last, self.keep_every = keep_last, keep_every
        self._policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
        self.interval_steps, self.preemption_check_steps = interval_steps, preemption_check_steps
        self._ckpt = incremental_saves(checkpointer, root, incremental, full_every, local_root)
        self._storage_options = (
            storage_options if storage_options is not None else checkpointer.storage_options
        )
        self._root_spec: StorageSpec | None = None  # resolved at first use, then every step derives from it
        self._rank = RankInfo.detect().global_rank
        self._group = agreement_group()  # collective when distributed: every rank builds the manager
        self._notice = PreemptionNotice(tuple(save_on_signals), self._group)
        self._pending: tuple[int, Future[None]] | None = None  # async save in flight: (step, write future)
        self._newest: int | None = None  # newest step saved or loaded by this manager
        self._damaged: set[int] = set()  # complete steps a load found unreadable (re-saving overwrites)
        self._unloadable: set[int] = set()  # damaged steps still in place: retention leaves them alone
        self._resumed: int | None = None  # the step this manager loaded: protected (resume_protected)
        self._committed: set[int] = set()  # steps this manager saved and saw committed
        self._from: str | None = None  # the tier the last load read from (`resumed_from`)
        self._warned: set[str] = set()  # listing problems already logged (one warning each)
        self._preempted = False
        self._closed = False
        self._local = build_local_tier(
            local_root,
            local_interval_steps,
            local_keep_last,
            replicas,
            local_address,
            self._group,
            durable=self._root,
            durable_root=comparable_path(self.root),
        )

    # --- queries (any rank, no collective) --------------------------------------------------------

    def steps(self) -> list[StepRecord]:
        """Every step of the run, oldest first (complete or not); `tiers`: durable and/or this node's local."""
        durable = [record for _, record in self._durable_listing()]
        return durable if self._local is None else merge_records(durable, self._local.records())

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none."""
        complete = [r.step for r in self.steps() if r.complete]
        return max(complete) if complete else None

    @property
    def resumed_from(self) -> str | None:
        """Where the last `load()` read its step from: "local" (the node-local tier), "durable", or None."""
        return self._from

    @property
    def preempted(self) -> bool:
        """True once a preemption signal was agreed on (the training loop should stop after `save()`)."""
        return self._preempted

    # --- save -------------------------------------------------------------------------------------

    def save(self, step: int, state: STATE_DICT, *, force: bool = False) -> bool:
        """Save `state` as `step` if the interval, `force` or a preemption signal says so (every rank calls it).

        Returns:
            Whether a save was started (sync: committed; async: staged, written in the background).
            A step not newer than the newest one this manager saved or loaded is never saved again.

        Raises:
            The checkpointer's errors, e.g. `WriterProcessError` when the previous async save failed.
        """
        self._check_open()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TypeError(f"step must be an int >= 0, got {step!r}")
        self._purge_if_committed()
        preempted = self._check_preemption(step)
        local, retry = (False, False) if self._local is None else self._local.on_save(step, state)
        if not (force or preempted or retry or step % self.interval_steps == 0):
            return local
        if self._newest is not None and step <= self._newest:
            logger.warning("not saving step %d: step %d is already saved or loaded", step, self._newest)
            return False
        self._start_save(step, state, upload=local and not (preempted or retry or step in self._damaged))
        if preempted:
            self.wait_until_finished()  # durable before the scheduler's SIGKILL
            self._notice.clear()
            self._preempted = True
            where = display_url(join(self.root, step_dir_name(step)))
            logger.warning("preemption signal: step %d saved and durable at %s", step, where)
        return True

    def _check_preemption(self, step: int) -> bool:
        return (self._group is None or step % self.preemption_check_steps == 0) and self._notice.agree()

    def _start_save(self, step: int, state: STATE_DICT, upload: bool = False) -> None:
        self._root()  # every rank checks the root once (not a checkpoint itself) before its first save
        path = join(self.root, step_dir_name(step))
        start = time.perf_counter()
        previous, self._pending = self._pending, None
        # The checkpointer's save() waits for the previous write anyway: waiting here costs nothing
        # and lets retention run as soon as it committed, however slow writes are. A failed
        # previous write is not raised here: the checkpointer's save() below raises it.
        if previous is not None and previous[1].exception() is None:
            self._purge(committed=previous[0])
        replace = step in self._damaged or step in abandoned_steps(self._local)  # never a good step's place
        uploading = upload and self._local is not None and not replace
        saver = self._local.uploading(self._ckpt, step) if uploading and self._local else self._ckpt
        result = saver.save(state, path, overwrite=replace)
        self._newest = step
        if result is None:
            logger.info("step %d saved to %s in %.3fs", step, display_url(path), time.perf_counter() - start)
            self._purge(committed=step)
            return
        stage_future, write_future = result
        stage_future.result()  # from here on the training may change its tensors
        self._pending = (step, write_future)
        logger.info(
            "step %d staged for %s in %.3fs; writing in the background",
            step,
            display_url(path),
            time.perf_counter() - start,
        )

    def wait_until_finished(self) -> None:
        """Wait for the async save in flight (if any), raise its failure, then prune (rank 0)."""
        if self._local is not None:
            self._local.wait()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending[1].result()
        self._purge(committed=pending[0])

    def _purge_if_committed(self) -> None:
        """Prune once the async save in flight has committed; a failed one is the checkpointer's to raise."""
        if self._pending is None or not self._pending[1].done():
            return
        step, future = self._pending
        if future.exception() is None:
            self._pending = None
            self._purge(committed=step)

    # --- retention (rank 0) -----------------------------------------------------------------------

    def _purge(self, *, committed: int) -> None:
        """Delete what retention no longer keeps, once step `committed` is; a failure is logged, never raised.

        Only rank 0 runs this, so an exception here would leave the other ranks waiting in
        the next collective; a step that could not be deleted is retried at the next purge.
        """
        if self._rank != 0:
            return
        self._committed.add(committed)
        protected = {committed} | resume_protected(self._resumed, self._committed, self._policy)
        try:
            prune(self._root(), self._policy, protected, unloadable=self._unloadable, warned=self._warned)
        except Exception as e:
            logger.warning(
                "pruning old steps under %s failed (retried after the next save): %s",
                display_url(self.root),
                e,
            )

    # --- load -------------------------------------------------------------------------------------

    def load(self, state: STATE_DICT, step: int | None = None, strict: bool = True) -> int | None:
        """Load a step into `state` (every rank calls it); resharding as the checkpointer's `load`.

        Args:
            state: the target state dict; filled in place.
            step: the step to load; None: the newest complete step whose checkpoint loads.
            strict: every key of `state` must be in the checkpoint (`MissingKeysError` otherwise).

        Returns:
            The step loaded, or None when the run has no complete step (a fresh start).

        Raises:
            FileNotFoundError: `step` was given and the run has no such step;
                `IncompleteCheckpointError` (a subclass) when it was never committed.
            MismatchError, MissingKeysError: the target does not fit the checkpoint.
            CheckpointPathError: the root is itself a checkpoint, or the ranks' roots differ.
            DistributedCheckpointError: another rank's load failed that way.
        """
        self._check_open()
        self.wait_until_finished()
        self._root()  # every rank checks the root (not a checkpoint itself) before any collective
        found = self._shared_listing()
        if step is not None and self._local is not None:
            load = lambda: self._load_named(state, step, found, strict)  # noqa: E731
            self._newest = load_named(self._local, state, step, found, strict, load, self._durable_listing)
            self._from = self._local.resumed_from
            return self._newest
        if step is not None:
            return self._load_named(state, step, found, strict)
        if self._local is not None:  # the local tier first, the durable steps as fallback
            self._newest = recover_tiers(self._local, state, found, strict, self._try_load)
            self._from = self._local.resumed_from
            return self._newest
        complete = [(path, r) for path, r in found if r.complete]
        # An incomplete step (its marker definitely absent) is replaced by a save of its step; an
        # unknown one (its marker could not be read) is tried like a complete one, never replaced.
        self._damaged |= {r.step for _, r in found if not r.complete and r.known}
        for _, record in found if self._rank == 0 else ():  # one warning per job, not per rank
            if not record.complete and record.known and (not complete or record.step > complete[0][1].step):
                logger.warning("skipping step %d at %s: %s", record.step, record.path, INCOMPLETE)
        candidates = [(path, r) for path, r in found if r.complete or not r.known]
        for path, record in reversed(candidates):
            if self._try_load(state, path, record, strict):
                return record.step
        logger.info("no loadable step under %s: starting fresh", display_url(self.root))
        return None

    def _load_named(
        self, state: STATE_DICT, step: int, found: list[tuple[str, StepRecord]], strict: bool
    ) -> int:
        return load_step(self._try_load, state, step, found, strict, self.root)

    def _durable_listing(self) -> list[tuple[StorageSpec, StepRecord]]:
        """The durable steps; with a local tier, an unreachable root holds none (recovery goes on)."""
        if self._local is None:
            return scan_steps(self._root(), warned=self._warned)
        return durable_or_none(lambda: scan_steps(self._root(), warned=self._warned), self.root, self._local)

    def _shared_listing(self) -> list[tuple[str, StepRecord]]:
        """Rank 0's listing of the run, the same on every rank (one listing instead of one per rank)."""
        return shared_listing(self._durable_listing if self._rank == 0 else None, self.root, self._group)

    def _try_load(
        self, state: STATE_DICT, path: str, record: StepRecord, strict: bool, *, skip_damaged: bool = True
    ) -> bool:
        """Load one step on every rank; True when all loaded, False when it is damaged on some rank."""
        attempt = attempt_load(self._ckpt, path, state, strict, self._group)
        error = attempt.error
        if attempt.worst == LOADED:
            self._newest, self._resumed, self._from = record.step, record.step, "durable"
            logger.info("loaded step %d from %s in %.3fs", record.step, record.path, attempt.seconds)
            return True
        if attempt.worst == FAILED or not skip_damaged:
            if error is not None:
                raise error
            raise DistributedCheckpointError(
                f"loading step {record.step} from {record.path} failed on another rank (see its error)", {}
            )
        self._damaged.add(record.step)
        self._unloadable.add(record.step)
        if error is None and self._rank != 0:
            return False  # rank 0 names the step; the rank that failed gives its reason
        reason = f"{type(error).__name__}: {error}" if error is not None else "unreadable on another rank"
        logger.warning("skipping step %d at %s: it cannot be loaded (%s)", record.step, record.path, reason)
        if self._rank == 0 and quarantine(self._root(), path, record.step):
            self._unloadable.discard(record.step)  # renamed aside: no longer in the run
        return False

    # --- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the save in flight, prune, and put back the signal handlers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
        finally:
            self._notice.close()
            if self._local is not None:
                self._local.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointStateError("CheckpointManager is closed")

    def _root(self) -> StorageSpec:
        """The run root's spec, resolved once (at first use, as a listing or a purge needs it)."""
        if self._root_spec is None:
            spec = StorageSpec.resolve(self.root, storage_options=self._storage_options)
            check_run_root(spec)
            self._root_spec = spec
        return self._root_spec


__all__ = ["CheckpointManager", "StepRecord"]
