"""The one way to read a checkpoint's `metadata.json` bytes: capped, so a hostile file costs no memory.

Several places read the commit marker: a load (then parsed whole by `planners.metadata_parse`), the
run listing behind `CheckpointManager.steps()`, `load()`, retention and `shardsafe ls` (only a few
top-level fields), and the commit's own re-read before it deletes another save's leftovers (only the
save id). Every one of them goes through `read_metadata_bytes`, which asks the storage for at most
`max_bytes` (checked against the stored size before a byte is read, so an 8 GiB sparse file is refused
at once) and turns a directory at that name into `InvalidCheckpointError`. A missing file stays
`FileNotFoundError`: each caller decides what an absent commit marker means.
"""

from __future__ import annotations

import json
from typing import Any

from planners.errors import InvalidCheckpointError
from planners.metadata import DEFAULT_MAX_METADATA_BYTES, METADATA_FILE
from storage.backend import CheckpointStorage


def read_metadata_bytes(storage: CheckpointStorage, *, max_bytes: int = DEFAULT_MAX_METADATA_BYTES) -> bytes:
    """The bytes of `metadata.json` under `storage`, refusing a file over `max_bytes` before reading it.

    Raises:
        FileNotFoundError: there is no metadata file.
        InvalidCheckpointError: the file is larger than `max_bytes` (the message names the file and
            the cap), is a directory, or (local disk) a symbolic link or not a regular file.
    """
    try:
        return storage.read_bytes(METADATA_FILE, max_bytes=max_bytes)
    except IsADirectoryError as e:
        raise InvalidCheckpointError(f"{storage.url}: {METADATA_FILE} is a directory") from e


def read_metadata_document(
    storage: CheckpointStorage, *, max_bytes: int = DEFAULT_MAX_METADATA_BYTES
) -> dict[str, Any]:
    """`metadata.json` as a JSON object, unvalidated (for readers that need only a field or two).

    Raises:
        FileNotFoundError: there is no metadata file.
        InvalidCheckpointError: as `read_metadata_bytes`, or the file is not a JSON object.
    """
    data = read_metadata_bytes(storage, max_bytes=max_bytes)
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise InvalidCheckpointError(f"{storage.url}/{METADATA_FILE}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidCheckpointError(f"{storage.url}/{METADATA_FILE}: not a JSON object")
    return doc
