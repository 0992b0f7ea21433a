"""Recovery from the local tier: the newest step every rank can rebuild, read from its nearest holders.

`recover` is what `CheckpointManager.load` runs when the manager has a local
tier; every rank calls it at the same point:

1. Rank 0 asks every node's server of this job what it holds and shares the
   answer (an unreachable node holds nothing). The steps the job can rebuild
   are those whose every file has a copy on some node
   (`planners.tier_placement.rebuildable_steps`); a step with missing copies is
   never tried.
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
from checkpoint.manager.attempt import DAMAGED, FAILED, LOADED
from checkpoint.manager.signals import max_over_ranks
from checkpoint.manager.steps import step_dir_name
from checkpoint.options import LoadOptions
from checkpoint.tiers import client
from checkpoint.tiers.holders import Holder, HolderStorage
from checkpoint.tiers.local_tier import LocalTier
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


def gather_listings(tier: LocalTier) -> Listings:
    """Every reachable node's holdings, as rank 0 saw them, on every rank."""
    listings: Listings | None = None
    if tier.layout.rank == 0:
        listings = {}
        for node, url in sorted(tier.layout.servers.items()):
            try:
                listings[node] = client.list_node(url, tier.token, node=node)
            except (OSError, InvalidCheckpointError) as e:
                logger.warning("local tier: node %d cannot be listed, counting it as empty: %s", node, e)
    if tier.group is None:
        return listings or {}
    box = [listings]
    dist.broadcast_object_list(box, src=0, group=tier.group)
    return box[0]


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
    for step in sorted(set(local) | set(durable_steps), reverse=True):
        if step in local and _try_local(tier, state, step, listings, strict):
            tier.loaded(step)
            return step
        if step in durable_steps and try_durable(step):
            tier.loaded(step)
            logger.info("resumed step %d from the durable tier", step)
            return step
    return None


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
