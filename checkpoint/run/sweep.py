"""Retention with incremental checkpoints: delete metadata first, sweep files no retained step needs.

An incremental step (`planners.references`) reads some of its bytes from files of earlier steps
of the run. Deleting an earlier step whole would leave those references dangling, so retention
(`checkpoint.manager.retention.prune`, rank 0, in the trainer thread; the sweep lives with the
run's other retention rules) becomes a mark and sweep:

1. mark (`referenced_files`): read the metadata of every step retention keeps and collect, per
   step directory, the files they reference. Evidence first: if any kept step's metadata cannot
   be read, nothing is deleted this time (an unread step may reference anything);
2. sweep (`sweep_step`), per dropped step: its `metadata.json` goes first (the step stops being a
   checkpoint: nothing loads it, nothing new references it), then each file that no kept step
   references, one by one, then the directory once it is empty. The files still referenced stay,
   in a directory without metadata, until a later sweep finds no retained step needs them.

Crash safety: a crash (SIGKILL) at any point of the sweep leaves a superset of what the kept
steps need: a step without metadata is an incomplete step to the listing, older than the newest
complete one, so the next prune sweeps it again with a fresh mark; referenced files are never
among the deleted. What a crash can leak is the rest of the interrupted step, until then.

A save in flight references only what its base holds or references. The manager's base is the
newest committed step, which retention keeps; for any other saver (a base named by hand), the
grace is the save's own in-progress marker: while a run that saves incrementally has a save in
flight (a live marker in a step directory), retention deletes nothing and waits for the next purge
(`checkpoint.manager.retention.prune`), however long the save takes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence

from planners.metadata import METADATA_FILE
from planners.metadata_parse import parse_metadata
from storage.metadata_file import read_metadata_bytes
from storage.spec import StorageSpec

logger = logging.getLogger(__name__)

# The key of `referenced_files`' answer that says the run saves incrementally (never a step name:
# step directories never contain a slash).
INCREMENTAL_RUN = "/incremental"


def referenced_files(kept: Sequence[StorageSpec]) -> dict[str, set[str]] | None:
    """Per step directory name, the files that the kept complete steps `kept` reference.

    Returns None when the metadata of a kept step cannot be read or parsed: the caller then
    deletes nothing (an error while gathering the evidence means keep). A run whose kept steps
    record chunk hashes (incremental saves) gets an entry under `INCREMENTAL_RUN`, even if empty.
    """
    marked: dict[str, set[str]] = {}
    for spec in kept:
        storage = spec.open()
        try:
            metadata = parse_metadata(read_metadata_bytes(storage), where=storage.url)
        except Exception as e:  # noqa: BLE001 - any failure is a reason to keep everything
            logger.warning(
                "retention deletes nothing this time: cannot read %s (%s: %s)", spec.url, type(e).__name__, e
            )
            return None
        finally:
            storage.close()
        refs = metadata.references
        if refs is not None:
            marked.setdefault(INCREMENTAL_RUN, set())
        for name, f in ({} if refs is None else refs.files).items():
            marked.setdefault(f.checkpoint, set()).add(name)
    return marked


def sweep_step(step: StorageSpec, keep: set[str], *, on_remove: Callable[[str], None] | None = None) -> bool:
    """Delete a step retention dropped, except the files `keep` (retained steps reference them).

    Deletes, in this order: `metadata.json`, each other file not in `keep`, then the directory once
    it is empty. Evidence: `keep` is the mark of `referenced_files`, taken before this call from
    every retained step. `on_remove(name)` runs after each deletion (tests kill the process there).

    Returns:
        True when the directory is gone, False when referenced files keep it.
    """
    storage = step.open()
    try:
        storage.remove([METADATA_FILE])
        if on_remove is not None:
            on_remove(METADATA_FILE)
        names = sorted(storage.list_names())
        for name in names:
            if name in keep:
                continue
            storage.remove([name])
            if on_remove is not None:
                on_remove(name)
        left = [n for n in names if n in keep]
        if left:
            logger.info("swept %s: %d file(s) stay, referenced by retained steps", step.url, len(left))
            return False
        with contextlib.suppress(OSError):  # something else was put there, or the store has no directories
            if step.protocol == "file":
                os.rmdir(step.root)
        return True
    finally:
        storage.close()
