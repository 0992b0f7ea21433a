"""Every rank reaches a save before its first collective, checked through the job's store.

A save's first exchange is an object gather over the process group. When one
rank calls save() and another does not (only rank 0 saves, inside an FSDP
loop), the other rank's next training collective meets the save's gather:
gloo pairs the two and fails with `gloo::EnforceNotMet ... collective
mismatch`, which names neither shardsafe nor the missing call, and NCCL
hangs. So before that gather each rank counts itself in at a key of the
job's store and waits there, in no collective, until every rank has. A rank
that never comes leaves the others waiting in the store, which logs the
ranks still missing (the same warning as a slow exchange) and, at the
group's timeout (`DEADLINE_SHARE` of it), raises a `DistributedCheckpointError` saying that every
rank must call save().

Keys, in the default group's store under the exchange's prefix:
`meets/<global rank>` counts the saves each rank has entered (so the
numbering agrees across ranks and survives a new checkpointer on the same
group), `meet/<n>` counts the ranks in save number n, and `meet/<n>/all` is
set by the last of them, which wakes the rest. Rank 0 deletes save n-1's
keys once save n is met, when every rank is past them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist

from planners.errors import DistributedCheckpointError

logger = logging.getLogger(__name__)

# Share of the group's timeout a rank waits here for the others. The rank that skipped save() sits in
# a training collective that fails only at the full timeout with an error naming neither shardsafe nor
# save(); failing first here makes the clear error the first one the launcher reports.
DEADLINE_SHARE = 0.75


def meet(
    store: dist.Store,
    prefix: str,
    *,
    rank: int,
    ranks: Sequence[int],
    warn_secs: float,
) -> None:
    """Count this rank into the next save and return once every rank of the group is in it too.

    Args:
        store: the job's store (the default group's); its timeout (the group's, as
            `init_process_group` sets it) bounds the wait.
        prefix: this group's key prefix in it.
        rank: this rank, in the group.
        ranks: the global rank of each group rank (the per-rank keys use global ranks).
        warn_secs: how often to log the ranks that have not arrived yet (at least 4 times per timeout).

    Raises:
        DistributedCheckpointError: some rank did not enter the save in time; it names them.
    """
    global_ranks, timeout = ranks, store.timeout
    warn_every_secs = min(warn_secs, timeout.total_seconds() / 4)
    n = int(store.add(f"{prefix}/meets/{global_ranks[rank]}", 1))
    here = f"{prefix}/meet/{n}"
    done = f"{here}/all"
    if int(store.add(here, 1)) == len(global_ranks):
        store.set(done, b"1")
    start = time.monotonic()
    allowed_secs = timeout.total_seconds() * DEADLINE_SHARE
    deadline = start + allowed_secs
    while not _arrived(store, done, min(warn_every_secs, deadline - time.monotonic())):
        absent = _absent(store, prefix, global_ranks, n)
        waited = time.monotonic() - start
        if time.monotonic() >= deadline:
            raise DistributedCheckpointError(
                f"rank {rank}: save() is collective and rank(s) {absent} did not call it within "
                f"{allowed_secs:.0f}s: every rank must call save() with its own part of the state (inside an "
                "FSDP loop too: `if rank == 0: save(...)` leaves the others in their next collective)",
                {r: "never called save()" for r in absent},
            )
        logger.warning(
            "rank %d: waiting %.0fs at the start of a save for rank(s) %s, which have not called save() "
            "(still training, stuck, or not calling save() at all: every rank must call it)",
            rank,
            waited,
            ", ".join(map(str, absent)),
        )
    if rank == 0 and n > 1:
        _forget(store, f"{prefix}/meet/{n - 1}")


def _arrived(store: dist.Store, key: str, secs: float) -> bool:
    """Whether `key` is set within `secs` (the store logs each wait that times out, hence slices of minutes)."""
    try:
        store.wait([key], timedelta(seconds=max(0.001, secs)))
        return True
    except Exception:  # the store raises a bare RuntimeError/DistStoreError when the wait times out
        return store.check([key])


def _absent(store: dist.Store, prefix: str, global_ranks: Sequence[int], n: int) -> list[int]:
    """The group ranks that have not entered save number `n`."""
    try:
        return [r for r, g in enumerate(global_ranks) if int(store.add(f"{prefix}/meets/{g}", 0)) < n]
    except Exception:  # a store that stopped answering lives in rank 0's process, unless a launcher hosts it
        return [0]


def _forget(store: dist.Store, key: str) -> None:
    """Delete a finished save's meeting keys: every rank has passed them once the next save is met."""
    for k in (key, f"{key}/all"):
        try:
            store.delete_key(k)
        except Exception:  # stale keys only cost the store a few bytes
            logger.debug("could not delete store key %s", k, exc_info=True)
