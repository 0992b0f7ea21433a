"""The run record in the durable root, as the local tier reads and stores it (rank 0 only).

`checkpoint.run.identity` defines the record; this module is the tier's I/O around it, with the
tier's rule for failures: a record that cannot be read is *unknown* (never taken for a new run, nor
another's), and one that cannot be stored is retried at the next local save, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from checkpoint.run.identity import RunRecord, read_run_record, write_run_record

logger = logging.getLogger(__name__)
# Durable roots whose record could not be stored, already warned about (a local save retries every step).
_WARNED: set[str] = set()


def read_durable(durable: Callable[[], Any], where: str) -> tuple[RunRecord | None, bool]:
    """(record, stored): the root's record; a new one where it has none; (None, False) when unreadable."""
    try:
        storage = durable().open()
        try:
            found = read_run_record(storage)
        finally:
            storage.close()
    except Exception as e:  # unknown: never assumed to be a new run, nor another run's
        logger.warning(
            "local tier: the run record in %s cannot be read (%s); local steps tagged with this durable "
            "root are trusted only as far as their own tags say",
            where,
            e,
        )
        return None, False
    return (found, True) if found is not None else (RunRecord.new(), False)


def store_durable(
    durable: Callable[[], Any], record: RunRecord, *, first: bool, where: str
) -> RunRecord | None:
    """Store `record` (with `first`: only where none is); the record the root holds, None on failure."""
    try:
        storage = durable().open()
        try:
            stored = write_run_record(storage, record, first=first)
        finally:
            storage.close()
    except Exception as e:  # one warning per root and process; later failures at debug level
        log = logger.debug if where in _WARNED else logger.warning
        _WARNED.add(where)
        log("local tier: cannot store the run record in %s (retried at the next local save): %s", where, e)
        return None
    if stored != record:  # another job of this root stored its own first
        logger.warning("local tier: %s holds another run's record (%s); adopting it", where, stored.run_id)
    return stored
