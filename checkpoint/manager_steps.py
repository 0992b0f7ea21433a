"""The step directories of a run: naming, listing, and deleting them (used by `CheckpointManager`).

A run is a root directory (local or any fsspec URL) holding one checkpoint per
step in `step-<step>`; the manager writes the step zero-padded to
`STEP_DIGITS` digits so that a plain listing sorts in step order, and reads
unpadded names too (a run started by hand, or by torchtitan's `step-N`
convention). A step is complete exactly when its commit marker
(`metadata.json`, written last by every save) exists and parses; everything
else in the root is ignored, so a run directory can hold other files.

Deleting a step removes `metadata.json` first: from that moment the step no
longer counts as complete, so a deletion interrupted half-way leaves an
incomplete step (which the manager cleans up later), never a "complete" one
with missing shard files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from planners.metadata import FORMAT_NAME, METADATA_FILE
from storage.backend import CheckpointStorage
from storage.spec import StorageSpec

# Nine digits sort a billion steps in order in a plain `ls`; longer steps still work (just unpadded).
STEP_DIGITS = 9
STEP_DIR_RE = re.compile(r"^step-(?P<step>\d+)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One step directory of a run, as found on storage.

    Attributes:
        step: the training step it was saved at.
        path: the checkpoint directory (local path or URL, without credentials).
        complete: its metadata was committed and parses; only complete steps are ever loaded.
        nbytes: bytes of its shard files (those the metadata lists when complete, else those present).
        world_size: how many ranks saved it (None when incomplete).
        saved_at: when it was committed (the metadata file's modification time, UTC; None when
            incomplete or when the backend does not report times).
        tiers: which tiers hold it: `("durable",)`, `("local",)` (this node's local tier, see
            `checkpoint.tiers`) or both.
    """

    step: int
    path: str
    complete: bool
    nbytes: int
    world_size: int | None
    saved_at: dt.datetime | None
    tiers: tuple[str, ...] = ("durable",)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (for `shardsafe ls --json`)."""
        return {
            "step": self.step,
            "path": self.path,
            "complete": self.complete,
            "nbytes": self.nbytes,
            "world_size": self.world_size,
            "saved_at": self.saved_at.isoformat() if self.saved_at else None,
            "tiers": list(self.tiers),
        }


def step_dir_name(step: int) -> str:
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a `step-N` directory name (padded or not), else None."""
    m = STEP_DIR_RE.fullmatch(name)
    return int(m["step"]) if m else None


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def step_dirs(names: Iterable[str]) -> dict[int, str]:
    """Step -> directory name of every `step-N` name in `names`.

    When a step appears twice (`step-7` and `step-000000007`), the manager's padded name wins.
    """
    found: dict[int, str] = {}
    for name in names:
        step = parse_step_dir(name)
        if step is not None and (step not in found or name == step_dir_name(step)):
            found[step] = name
    return found


def list_step_dirs(root: StorageSpec) -> dict[int, str]:
    """Step -> directory name of every `step-N` entry under `root` (empty when `root` does not exist)."""
    storage = root.open()
    try:
        return step_dirs(storage.list_names())
    finally:
        storage.close()


def scan_steps(root: StorageSpec) -> list[tuple[StorageSpec, StepRecord]]:
    """Every step directory under `root`, oldest first: (its spec, what its metadata says).

    Each step's spec is derived from `root`'s (nothing is resolved again); its `path` is the one
    to open, the record's `path` the same without any credentials, for display.
    """
    found = []
    for step, name in sorted(list_step_dirs(root).items()):
        spec = root.child(name)
        storage = spec.open()
        try:
            record = _record(step, storage)
        finally:
            storage.close()
        if record is not None:
            found.append((spec, record))
    return found


def _record(step: int, storage: CheckpointStorage) -> StepRecord | None:
    """None for an empty directory: object stores with directories (SeaweedFS's filer) may keep an
    empty prefix after its objects were deleted, and an empty step holds nothing to list or delete."""
    summary = _metadata_summary(storage)
    if summary is None:
        own = storage.url.rstrip("/").rsplit("/", 1)[-1]
        names = [n for n in storage.list_names() if n != own]  # some stores list an empty prefix as itself
        if not names:
            return None
        nbytes = sum(_size_or_zero(storage, n) for n in names if n.endswith(".safetensors"))
        return StepRecord(
            step=step, path=storage.url, complete=False, nbytes=nbytes, world_size=None, saved_at=None
        )
    world_size, nbytes = summary
    return StepRecord(
        step=step,
        path=storage.url,
        complete=True,
        nbytes=nbytes,
        world_size=world_size,
        saved_at=modified_at(storage, METADATA_FILE),
    )


def _metadata_summary(storage: CheckpointStorage) -> tuple[int, int] | None:
    """(world size, shard bytes) from the committed metadata; None when absent or unreadable.

    Only the few top-level fields are checked here (listing a run must stay cheap); a load
    validates the whole file before trusting any of it.
    """
    try:
        doc = json.loads(storage.read_bytes(METADATA_FILE))
        files = doc["files"]
        if doc["format"] != FORMAT_NAME or not isinstance(doc["world_size"], int):
            return None
        return doc["world_size"], sum(int(f["nbytes"]) for f in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _size_or_zero(storage: CheckpointStorage, name: str) -> int:
    try:
        return storage.size(name)
    except OSError:  # deleted between the listing and now
        return 0


def modified_at(storage: CheckpointStorage, name: str) -> dt.datetime | None:
    """A file's modification time in UTC, or None where the backend does not say.

    The storage protocol has no time field (a save never needs one); local files
    are stat'ed, fsspec backends report it under one of a few names.
    """
    root = getattr(storage, "root", None)
    fs = getattr(storage, "fs", None)
    try:
        if fs is None and root is not None:
            return dt.datetime.fromtimestamp(os.stat(os.path.join(root, name)).st_mtime, dt.timezone.utc)
        if fs is not None:
            info = fs.info(f"{root}/{name}")
            for field in ("LastModified", "last_modified", "mtime", "created"):
                value = info.get(field)
                if isinstance(value, dt.datetime):
                    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
                if isinstance(value, (int, float)):
                    return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    except (OSError, ValueError):
        return None
    return None


def remove_step(step: StorageSpec) -> None:
    """Delete one step directory: the commit marker first, then the rest (see the module docstring)."""
    storage = step.open()
    try:
        storage.remove([METADATA_FILE])
        storage.remove(storage.list_names())
        root, fs = getattr(storage, "root", None), getattr(storage, "fs", None)
        with contextlib.suppress(OSError):  # something else was put there, or the store has no directories
            if fs is None and root is not None:
                os.rmdir(root)
            elif fs is not None:
                fs.rm_file(root)  # the directory entry of stores that keep one (SeaweedFS's filer)
    finally:
        storage.close()
