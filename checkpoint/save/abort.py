"""The end of a save that failed after ranks wrote shard files: each rank takes back what it wrote.

Runs in the process that writes (the trainer rank for a sync save, the rank's writer process for an
async one), inside the commit (`checkpoint.save.commit.commit_save`), on every rank that learnt from
the coordinator's verdict that the save was refused and that its metadata was never published.
Order, and why:

1. every rank deletes the shard files of its own part of the plan for this save: their names carry
   the save id, so no other save's file and no file of another rank is ever touched (names it never
   got to write are simply absent);
2. one more gather over the commit's exchange: the coordinator waits (bounded by the exchange's
   timeouts) until every rank has deleted its files, since a directory can only go once it is empty;
3. the coordinator deletes the save's in-progress marker, then removes the directories its
   `prepare()` created for this save, deepest first and each only while empty: a directory that
   held anything before the save (an earlier checkpoint, a user's file) is never removed.

A rank that died leaves its files, and its directory stays; the next save at that path deletes them
as leftovers, as after any crash. Nothing here raises: the save's own error is what the caller sees.

The evidence each delete needs: a verdict from the coordinator saying this save's metadata never went
out (`clean_failed_save`), or, for a rank interrupted while it wrote (`take_back_interrupted`), that its
write result was never handed to the coordinator, so no metadata can name its files; each name deleted
carries this save's id, and a directory goes only when it was created by this save and is empty.
"""

from __future__ import annotations

import logging

from checkpoint.save import lease
from checkpoint.save.collectives import COORDINATOR, Exchange
from checkpoint.save.protocol import PreparedSave
from planners.metadata import shard_file_name
from storage.backend import CheckpointStorage

logger = logging.getLogger(__name__)


def own_file_names(prepared: PreparedSave) -> list[str]:
    """The shard files this rank's part of the plan names for this save (each carries the save id)."""
    return [shard_file_name(prepared.save_id, fp.stem) for fp in prepared.files]


def clean_failed_save(storage: CheckpointStorage | None, exchange: Exchange, prepared: PreparedSave) -> None:
    """Delete this rank's shard files of the failed save; the coordinator then its marker and new dirs.

    Collective over the commit's exchange: every rank that got the refusal calls it. Never raises.
    Evidence required (checked by the caller, `checkpoint.save.commit.exchange_verdict`): the
    coordinator's verdict says this save's metadata never went out; every name deleted carries
    this save's id; directories go only when created by this save and listed empty.
    """
    removed = _remove_own_files(storage, prepared)
    try:
        reports = exchange.gather(removed)
    except Exception:  # a rank died or the exchange broke: its files stay for the next save's cleanup
        logger.warning(
            "rank %d: could not learn whether every rank deleted its files of failed save %s at %s",
            prepared.rank,
            prepared.save_id,
            prepared.url,
            exc_info=True,
        )
        reports = None
    if exchange.rank != COORDINATOR or storage is None:
        return
    lease.release_quietly(storage, prepared.save_id)
    if reports is None or not all(r is True for r in reports):
        logger.info("failed save %s: some rank kept its files; %s stays", prepared.save_id, prepared.url)
        return
    try:
        storage.remove_created_dirs(prepared.created_dirs)
    except Exception:  # an empty directory costs nothing; never hide the save's own error
        logger.warning("could not remove the directories of failed save %s", prepared.save_id, exc_info=True)


def take_back_interrupted(storage: CheckpointStorage | None, prepared: PreparedSave) -> None:
    """A rank interrupted (Ctrl-C) while writing its files: delete them; the coordinator its marker and dirs.

    Runs before this rank handed its write result to the commit, so the coordinator can never publish
    metadata naming its files (and the coordinator itself publishes only after its own write), which
    is the evidence the deletes need. Local to this rank: an interrupted process cannot count on the
    others for an exchange. The coordinator removes the directories the save created only where a
    listing shows them empty (another rank still writing keeps them). Never raises.
    """
    _remove_own_files(storage, prepared)
    if prepared.rank != COORDINATOR or storage is None:
        return
    lease.release_quietly(storage, prepared.save_id)
    try:
        storage.remove_created_dirs(prepared.created_dirs)
    except Exception:
        logger.warning(
            "could not remove the directories of interrupted save %s", prepared.save_id, exc_info=True
        )


def _remove_own_files(storage: CheckpointStorage | None, prepared: PreparedSave) -> bool:
    """Delete this rank's files of the save; True when none is left (a rank without storage wrote none).

    Only names this rank's part of the plan gives this save (each carries the save id); the caller
    holds the evidence that the save's metadata does not name them.
    """
    names = own_file_names(prepared)
    if storage is None or not names:  # a rank whose storage did not open wrote nothing
        return True
    try:
        storage.remove(names)
    except Exception:
        logger.warning(
            "rank %d: could not delete its shard files of failed save %s at %s; the next save there removes them",
            prepared.rank,
            prepared.save_id,
            prepared.url,
            exc_info=True,
        )
        return False
    logger.info(
        "rank %d: deleted its %d shard file(s) of failed save %s at %s",
        prepared.rank,
        len(names),
        prepared.save_id,
        prepared.url,
    )
    return True
