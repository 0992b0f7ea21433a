"""What `CheckpointManager` calls of the local tier: construction, listings, recovery, durable uploads.

Kept apart from `checkpoint.manager.manager` so the manager stays about the durable
tier: each of its hooks is one call into this module, and without a
`local_root` none of them changes what the manager does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from checkpoint.run.identity import AbandonedStep
from checkpoint.run.steps import StepRecord
from planners.errors import CheckpointError
from storage.metadata_file import read_metadata_document
from storage.redact import display_url

if TYPE_CHECKING:  # the tier (and aiohttp, its server's dependency) is imported only when used
    from checkpoint.tiers.local_tier import LocalTier

logger = logging.getLogger(__name__)


def build_local_tier(
    local_root: str | None,
    interval: int | None,
    keep_last: int,
    replicas: int,
    address: str | None,
    group: dist.ProcessGroup | None,
    durable: Callable[[], Any] | None = None,
    durable_root: str = "",
) -> LocalTier | None:
    """The manager's local tier (collective), or None without a `local_root`.

    Args:
        local_root: a node-local directory (a `/dev/shm` path, local NVMe); None: no local tier.
        interval: local saves happen when `step % interval == 0` (None: every step).
        keep_last: committed local steps each node keeps.
        replicas: other nodes holding a verified copy of each local file (ring placement).
        address: where this node's tier server listens and peers reach it (default:
            `$SHARDSAFE_NODE_ADDR`, else the address of the interface that routes to the job's
            master; see `checkpoint.tiers.node.node_address`).
        durable: the durable root's spec (a callable, resolved at first use): the run record lives there.
        durable_root: the durable root's path as every rank compares it (tags name it).

    Raises:
        ValueError: an option is out of range.
    """
    for name, value, optional in (
        ("local_interval_steps", interval, True),
        ("local_keep_last", keep_last, False),
    ):
        if not (optional and value is None) and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"{name} must be an int >= 1{' or None' if optional else ''}, got {value!r}")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise ValueError(f"replicas must be an int >= 0, got {replicas!r}")
    if local_root is None:
        return None
    if not isinstance(local_root, str) or not local_root or "://" in local_root:
        raise ValueError(f"local_root must be a local directory path, got {local_root!r}")
    from checkpoint.tiers.local_tier import LocalTier

    return LocalTier(
        local_root,
        interval_steps=interval or 1,
        keep_last=keep_last,
        replicas=replicas,
        group=group,
        address=address,
        durable=durable,
        durable_root=durable_root,
    )


def durable_or_none(
    listing: Callable[[], list[tuple[Any, StepRecord]]], root: str, tier: LocalTier | None = None
) -> list[tuple[Any, StepRecord]]:
    """The durable root's steps, or none when it cannot be listed (recovery then uses the local tier).

    Steps a rollback abandoned (`RunRecord.abandoned`, matched by save id) are left out: they are
    never loaded, and retention never sees them (they stay until a save of that step replaces them).
    """
    try:
        found = listing()
    except (OSError, CheckpointError) as e:
        logger.warning(
            "durable root %s cannot be listed, counting no durable steps: %s", display_url(root), e
        )
        return []
    record = None if tier is None else tier.record
    if record is None or not record.abandoned:
        return found
    numbers = {a.step for a in record.abandoned}  # only those steps' save ids are read
    return [
        (spec, r)
        for spec, r in found
        if r.step not in numbers or not record.abandoned_save(r.step, _save_id(spec))
    ]


def abandoned_steps(tier: LocalTier | None) -> set[int]:
    """Durable step numbers a rollback abandoned: a save of one replaces what is there."""
    return set() if tier is None or tier.record is None else {a.step for a in tier.record.abandoned}


def _save_id(spec: Any) -> str | None:
    try:
        storage = spec.open()
        try:
            value = read_metadata_document(storage).get("save_id")
        finally:
            storage.close()
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def load_named(
    tier: LocalTier,
    state: Any,
    step: int,
    found: list[tuple[str, StepRecord]],
    strict: bool,
    load_durable: Callable[[], int],
    durable_specs: Callable[[], list[tuple[Any, StepRecord]]],
) -> int:
    """`load(step=N)` with a local tier: the durable step if the run has it, else the local one;
    then a rollback when the run's history holds newer steps (collective; `durable_specs` on rank 0)."""
    from checkpoint.tiers.recovery import after_named_load, load_local_step

    complete = sorted(r.step for _, r in found if r.complete)
    tier.resumed_from = "local"
    if step in complete or not load_local_step(tier, state, step, strict=strict):
        tier.resumed_from = "durable"
        load_durable()  # raises FileNotFoundError naming the step when neither tier has it
    abandoned = []
    if tier.layout.rank == 0:
        for spec, r in durable_specs():
            if r.complete and r.step > step and (save_id := _save_id(spec)) is not None:
                abandoned.append(AbandonedStep(step=r.step, save_id=save_id))
    after_named_load(tier, step, complete, abandoned)
    return step


def recover_tiers(
    tier: LocalTier,
    state: Any,
    found: list[tuple[str, StepRecord]],
    strict: bool,
    try_load: Callable[..., bool],
) -> int | None:
    """`checkpoint.tiers.recovery.recover` with the manager's durable steps as the fallback."""
    from checkpoint.tiers.recovery import recover

    complete = {r.step: (path, r) for path, r in found if r.complete}
    step = recover(
        tier,
        state,
        strict=strict,
        durable_steps=sorted(complete),
        try_durable=lambda s: try_load(state, *complete[s], strict),
    )
    if step is None and tier.layout.rank == 0:
        logger.info("no loadable step in either tier: starting fresh")
    return step


def merge_records(durable: list[StepRecord], local: list[StepRecord]) -> list[StepRecord]:
    """One record per step, oldest first; a step in both tiers keeps the durable record, tiers both."""
    by_step = {r.step: r for r in local}
    for record in durable:
        both = record.complete and record.step in by_step
        by_step[record.step] = dataclasses.replace(record, tiers=("durable", "local")) if both else record
    return [by_step[s] for s in sorted(by_step)]
