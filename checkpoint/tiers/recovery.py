"""Recovery from the local tier: the newest step every rank can rebuild, read from its nearest holders.

`recover` is what `CheckpointManager.load` runs when the manager has a local
tier; every rank calls it at the same point:

1. Rank 0 asks every node's server of this job what it holds, with each
   step's tag, and shares the answer (an unreachable node holds nothing). Only
   copies whose node tagged the step with this run, on the current timeline's
   history (`checkpoint.run.identity`), count: another run's step 3 is never
   this run's step 3, and a step a rollback abandoned is never resumed. The
   steps the job can rebuild are those whose every file has such a copy on
   some node (`planners.tier_placement.rebuildable_steps`); a step with
   missing copies is never tried.
2. The candidates are these steps and the durable ones, newest first; at one
   step the local tier is tried before the durable one.
3. A local candidate: each rank reads the metadata and then only its byte
   ranges, each file from its nearest holder (own node, then peers in ring
   order; `checkpoint.tiers.holders`), resharding like any load. A copy that
   fails its checksum is quarantined on its node (renamed aside, with a
   warning naming node, file and step) and the next holder serves the file;
   a copy that is gone is skipped the same way. The ranks then agree (one
   all-reduce): all loaded, or the step is damaged for someone and every rank
   moves to the next candidate. A target that does not fit raises on every
   rank, as the manager's own loads do.
4. A resume below the newest step of the history (newer steps were damaged or
   could not be rebuilt, or the caller asked for an older step) starts a new
   timeline there (`LocalTier.roll_back`), so the newer steps are abandoned in
   both tiers and retention keeps the new steps instead of them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from checkpoint.load.loader import load_checkpoint
from checkpoint.options import LoadOptions
from checkpoint.run.agreement import DAMAGED, FAILED, LOADED, max_over_ranks
from checkpoint.run.identity import LocalTag
from checkpoint.run.steps import step_dir_name
from checkpoint.tiers import client
from checkpoint.tiers.holders import Holder, HolderStorage
from checkpoint.tiers.local_tier import LocalTier, usable
from planners.errors import CorruptCheckpointError, DistributedCheckpointError, InvalidCheckpointError
from planners.metadata import METADATA_FILE
from planners.metadata_parse import parse_metadata
from planners.tier_placement import StepHolding, holder_order, holders_of, rebuildable_steps
from storage.local import LocalStorage

logger = logging.getLogger(__name__)

_FILE_RE = re.compile(r"shard-[0-9a-f]{8,32}-r\d{5,}-\d{3,}\.safetensors|metadata\.json")
# What makes one copy unusable (the next holder is tried), as opposed to a target that does not fit.
_COPY_FAILURES = (InvalidCheckpointError, FileNotFoundError, OSError)
Listings = dict[int, dict[int, StepHolding]]
Tags = dict[int, dict[int, LocalTag | None]]


def gather_listings(tier: LocalTier) -> Listings:
    """Every reachable node's holdings of this run's current history, as rank 0 saw them, on every rank.

    Settles the tier's run record first when the durable one could not be read (collective).
    """
    found: tuple[Listings, Tags] | None = None
    if tier.layout.rank == 0:
        found = ({}, {})
        for node, url in sorted(tier.layout.servers.items()):
            try:
                found[0][node], found[1][node] = client.list_node_tags(url, tier.token, node=node)
            except (OSError, InvalidCheckpointError) as e:
                logger.warning("local tier: node %d cannot be listed, counting it as empty: %s", node, e)
    if tier.group is not None:
        box = [found]
        dist.broadcast_object_list(box, src=0, group=tier.group)
        found = box[0]
    assert found is not None
    listings, tags = found
    record = tier.settle_record([t for node in tags.values() for t in node.values() if t is not None])
    return {
        node: {s: h for s, h in held.items() if usable(tags[node].get(s), record, s)}
        for node, held in listings.items()
    }


def head_of(listings: Listings) -> int | None:
    """The newest step some node holds committed on the current history."""
    return max((s for held in listings.values() for s, h in held.items() if h.committed), default=None)


def recover(
    tier: LocalTier,
    state: Any,
    *,
    strict: bool,
    durable_steps: list[int],
    try_durable: Callable[[int], bool],
) -> int | None:
    """Load the newest step the job can rebuild (local tier first at each step); None: nothing to load."""
    listings = gather_listings(tier)
    local = rebuildable_steps(listings)
    if tier.layout.rank == 0:
        logger.info("local tier: rebuildable steps %s; durable steps %s", local[:8], durable_steps[-8:][::-1])
    head = max([s for s in (head_of(listings), *durable_steps) if s is not None], default=None)
    for step in sorted(set(local) | set(durable_steps), reverse=True):
        if step in local and _try_local(tier, state, step, listings, strict):
            return _resumed(tier, step, head, "local")
        if step in durable_steps and try_durable(step):
            return _resumed(tier, step, head, "durable")
    tier.resumed_from = None
    if head is not None:
        tier.roll_back(None)
    return None


def load_local_step(tier: LocalTier, state: Any, step: int, *, strict: bool) -> bool:
    """Load `step` from the local tier (every rank; `load(step=N)` of a step only the local tier holds)."""
    listings = gather_listings(tier)
    if step not in rebuildable_steps(listings):
        return False
    return _try_local(tier, state, step, listings, strict)


def after_named_load(tier: LocalTier, step: int, durable_steps: list[int], abandoned: Any) -> None:
    """After `load(step=N)`: a rollback when the history holds newer steps (collective)."""
    head = max([s for s in (head_of(gather_listings(tier)), *durable_steps) if s is not None], default=None)
    tier.loaded(step)
    if head is not None and step < head:
        tier.roll_back(step, abandoned)


def _resumed(tier: LocalTier, step: int, head: int | None, where: str) -> int:
    tier.loaded(step)
    tier.resumed_from = where
    if where == "durable" and tier.layout.rank == 0:
        logger.info("resumed step %d from the durable tier", step)
    if head is not None and step < head:
        tier.roll_back(step)
    return step


def _try_local(tier: LocalTier, state: Any, step: int, listings: Listings, strict: bool) -> bool:
    start = time.perf_counter()
    storage = _holder_storage(tier, step, listings)
    error: BaseException | None = None
    outcome = DAMAGED
    try:
        outcome = _load_with_fallback(tier, storage, state, step, strict)
    except Exception as e:  # every rank must learn of it before any raises, or the others hang
        error, outcome = e, FAILED
    finally:
        storage.close()
    worst = max_over_ranks(outcome, tier.group)
    if worst == LOADED:
        if tier.layout.rank == 0:
            logger.info("resumed step %d from the local tier in %.3fs", step, time.perf_counter() - start)
        return True
    if worst == FAILED:
        if error is not None:
            raise error
        raise DistributedCheckpointError(
            f"loading local step {step} failed on another rank (see its error)", {}
        )
    if tier.layout.rank == 0:
        logger.warning("local tier: step %d cannot be rebuilt from verified copies; trying older steps", step)
    return False


def _load_with_fallback(tier: LocalTier, storage: HolderStorage, state: Any, step: int, strict: bool) -> int:
    """Load through `storage`, dropping failed copies one at a time; `DAMAGED` once a file has none."""
    layout = tier.layout
    world = dist.get_world_size() if tier.group is not None else 1
    for _ in range(storage.copies_left() + 1):
        try:
            _check_metadata(tier, storage, step)
            load_checkpoint(
                storage, state, rank=layout.rank, world_size=world, options=LoadOptions(strict=strict)
            )
            return LOADED
        except _COPY_FAILURES as e:  # a target that does not fit (MismatchError...) is raised as is
            match = _FILE_RE.search(str(e))
            if match is None or not storage.exists(match[0]):
                logger.warning("rank %d: local step %d: %s", layout.rank, step, e)
                return DAMAGED
            _drop(tier, storage, step, match[0], e)
    return DAMAGED


def _check_metadata(tier: LocalTier, storage: HolderStorage, step: int) -> None:
    """The metadata of the holder in use must parse (its digest covers it), else that copy is dropped."""
    while True:
        holder = storage.current(METADATA_FILE)
        try:
            parse_metadata(
                storage.read_bytes(METADATA_FILE, max_bytes=LoadOptions().max_metadata_bytes),
                where=f"node {holder.node}: {step_dir_name(step)}/{METADATA_FILE}",
            )
            return
        except InvalidCheckpointError as e:
            _drop(tier, storage, step, METADATA_FILE, CorruptCheckpointError(str(e)))


def _drop(tier: LocalTier, storage: HolderStorage, step: int, name: str, error: BaseException) -> None:
    holder = storage.drop(name)
    if isinstance(error, CorruptCheckpointError):
        done = client.quarantine(holder.url, tier.token, step_dir_name(step), name, node=holder.node)
        logger.warning(
            "rank %d: node %d's copy of %s of step %d failed its checksum; %s; trying the next holder",
            tier.layout.rank,
            holder.node,
            name,
            step,
            "quarantined" if done else "could not quarantine it",
        )
    else:
        logger.warning(
            "rank %d: node %d's copy of %s of step %d is unusable (%s); trying the next holder",
            tier.layout.rank,
            holder.node,
            name,
            step,
            error,
        )


def _holder_storage(tier: LocalTier, step: int, listings: Listings) -> HolderStorage:
    layout = tier.layout
    step_dir = step_dir_name(step)
    required = next(h[step].required for h in listings.values() if step in h and h[step].committed)
    opened: dict[int, Any] = {}

    def storage_of(node: int) -> Any:
        if node not in opened:
            own = node == layout.node
            opened[node] = (
                LocalStorage(os.path.join(tier.root, step_dir))
                if own
                else client.peer_storage(layout.servers[node], tier.token, step_dir)
            )
        return opened[node]

    holders = {
        name: [
            Holder(node=n, url=layout.servers[n], storage=storage_of(n))
            for n in holder_order(layout.node, holders_of(step, name, size, listings), layout.num_nodes)
        ]
        for name, size in required.items()
    }
    return HolderStorage(f"local tier {step_dir} (node {layout.node}'s view)", holders)
