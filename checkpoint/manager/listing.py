"""The run listing every rank of the manager shares, and loading one named step from it.

Rank 0 lists the run (one listing instead of one per rank) and shares it; every rank checks that
all ranks gave the manager the same root first, so they raise together rather than load different
runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from checkpoint.run.steps import StepRecord
from checkpoint.save.plan_exchange import comparable_path, path_mismatch
from planners.errors import IncompleteCheckpointError
from storage.redact import display_url

# Why a step without a commit marker is never loaded (named in warnings and errors).
INCOMPLETE = "it has no readable metadata.json (the save was interrupted, or the file is damaged)"


def shared_listing(
    listing: Callable[[], list[tuple[Any, StepRecord]]] | None, root: str, group: dist.ProcessGroup | None
) -> list[tuple[str, StepRecord]]:
    """Rank 0's listing (`listing`, None on the other ranks) on every rank; collective over `group`."""
    # Paths, not specs, are shared: a spec would carry the storage options (credentials) over the wire.
    records = [(s.path, r) for s, r in listing()] if listing is not None else None
    if group is None:
        assert records is not None
        return records
    roots: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(roots, comparable_path(root), group=group)
    mismatch = path_mismatch(roots, call="CheckpointManager (its root)")
    if mismatch is not None:  # every rank sees every root, so all raise here together
        raise mismatch
    box = [records]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def load_step(
    try_load: Callable[..., bool],
    state: Any,
    step: int,
    found: list[tuple[str, StepRecord]],
    strict: bool,
    root: str,
) -> int:
    """Load the named `step` of `found` (every rank); raises unless it loaded.

    Raises:
        FileNotFoundError: the run has no such step; `IncompleteCheckpointError` when it was never
            committed (its metadata cannot be read).
    """
    match = [(path, r) for path, r in found if r.step == step]
    if not match:
        raise FileNotFoundError(f"no step {step} under {display_url(root)}")
    path, record = match[0]
    try:  # an incomplete step too: the load names why its metadata cannot be read (e.g. too large)
        try_load(state, path, record, strict, skip_damaged=False)  # raises unless loaded
    except FileNotFoundError as e:  # IncompleteCheckpointError is one too
        if record.complete:
            raise
        raise IncompleteCheckpointError(f"step {step} at {record.path}: {INCOMPLETE}") from e
    return step
