"""The step directories of a run: naming, listing, and deleting them (both tiers and `shardsafe ls`).

A run is a root directory (local or any fsspec URL) holding one checkpoint per
step in `step-<step>`; the manager writes the step zero-padded to
`STEP_DIGITS` digits so that a plain listing sorts in step order, and reads
unpadded names too (a run started by hand, or by torchtitan's `step-N`
convention). A step is complete exactly when its commit marker
(`metadata.json`, written last by every save) exists and parses; it is read
capped (`storage.metadata_file`), so a huge one makes the step incomplete
instead of exhausting memory. Only a marker that is definitely absent (not
found) or that was read and is not a commit marker makes a step incomplete;
an error while reading it (EIO, ESTALE on NFS, an object store's error after
its retries) makes the step *unknown* (`StepRecord.known` False): listed with
a warning, never loaded as complete and never deleted, since the evidence a
delete needs was not obtained. Everything else in the root is ignored, so a
run directory can hold other files; an entry with a step's name that is not a
directory (a plain file, a symbolic link that loops or dangles) is skipped with
a warning.

Deleting a step removes `metadata.json` first: from that moment the step no
longer counts as complete, so a deletion interrupted half-way leaves an
incomplete step (which the manager cleans up later), never a "complete" one
with missing shard files. A step directory that is a symbolic link (a base
checkpoint linked into the run) is listed and loaded like any other, but
deleting it removes only the link: nothing is ever deleted through a link.
A step that a load found damaged can be renamed aside (`quarantine_step`) to
a name the listing ignores, where a rename is cheap (local disk).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from planners.errors import CheckpointPathError
from planners.metadata import FORMAT_NAME, METADATA_FILE
from storage.backend import CheckpointStorage
from storage.metadata_file import read_metadata_document
from storage.spec import StorageSpec

logger = logging.getLogger(__name__)

# Nine digits sort a billion steps in order in a plain `ls`; longer steps still work (just unpadded).
STEP_DIGITS = 9
STEP_DIR_RE = re.compile(r"^step-(?P<step>\d+)$")
# A quarantined step is renamed to `<its name>.damaged-<UTC time>`, which STEP_DIR_RE never matches.
QUARANTINE_SUFFIX = ".damaged-"


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
        known: False when its metadata could not be read (an I/O error, not "not found"): then
            `complete` is False too, and retention never deletes it (see the module docstring).
    """

    step: int
    path: str
    complete: bool
    nbytes: int
    world_size: int | None
    saved_at: dt.datetime | None
    tiers: tuple[str, ...] = ("durable",)
    known: bool = True

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
            "known": self.known,
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


def check_run_root(root: StorageSpec) -> None:
    """Refuse a run root that is itself a checkpoint (a step folder given instead of the run's root).

    The manager would find no step under it and start fresh, and its saves could then replace a run.

    Raises:
        CheckpointPathError: `root` holds `metadata.json`; the message names the parent to pass.
    """
    storage = root.open()
    try:
        is_checkpoint = storage.exists(METADATA_FILE)
    finally:
        storage.close()
    if is_checkpoint:
        shown = root.url.rstrip("/")
        parent = shown.rsplit("/", 1)[0] if "/" in shown else "."
        raise CheckpointPathError(
            f"CheckpointManager root {shown} is itself a checkpoint (it holds {METADATA_FILE}); pass the "
            f"run's root, the directory that holds the step-... folders, e.g. {parent}"
        )


def list_step_dirs(root: StorageSpec) -> dict[int, str]:
    """Step -> directory name of every `step-N` entry under `root` (empty when `root` does not exist)."""
    storage = root.open()
    try:
        return step_dirs(storage.list_names())
    finally:
        storage.close()


def scan_steps(root: StorageSpec, *, warned: set[str] | None = None) -> list[tuple[StorageSpec, StepRecord]]:
    """Every step directory under `root`, oldest first: (its spec, what its metadata says).

    Each step's spec is derived from `root`'s (nothing is resolved again); its `path` is the one
    to open, the record's `path` the same without any credentials, for display. An entry with a
    step's name that is not a directory is skipped, and a step whose metadata cannot be read is
    reported incomplete, each with a warning; `warned` (the caller's, kept across listings) holds
    the paths already warned about, so that a listing repeated at every save warns once.
    """
    warned = set() if warned is None else warned
    found = []
    for step, name in sorted(list_step_dirs(root).items()):
        spec = root.child(name)
        problem = not_a_directory(spec)
        if problem is not None:
            _warn_once(warned, spec.url, f"skipping {spec.url}: {problem}; it is not a step directory")
            continue
        storage = spec.open()
        try:
            record = _record(step, storage, warned)
        finally:
            storage.close()
        if record is not None:
            found.append((spec, record))
    return found


def not_a_directory(spec: StorageSpec) -> str | None:
    """Why the local entry at `spec` is not a directory to list (None: it is one, is gone, or is remote).

    Object stores have no links, and a plain object with a step's name lists as nothing there.
    """
    if spec.protocol != "file":
        return None
    try:
        mode = os.stat(spec.root).st_mode  # follows a link: a linked-in step directory is fine
    except FileNotFoundError:
        return "a symbolic link to nothing" if os.path.islink(spec.root) else None  # deleted since
    except OSError as e:  # ELOOP: a link that loops
        return f"cannot be opened ({e.strerror or e})"
    return None if stat.S_ISDIR(mode) else "a plain file, not a directory"


def _warn_once(warned: set[str], key: str, message: str) -> None:
    if key not in warned:
        warned.add(key)
        logger.warning("%s", message)


def _record(step: int, storage: CheckpointStorage, warned: set[str]) -> StepRecord | None:
    """None for an empty directory: object stores with directories (SeaweedFS's filer) may keep an
    empty prefix after its objects were deleted, and an empty step holds nothing to list or delete."""
    summary = _metadata_summary(storage, warned)
    if summary is _UNKNOWN:
        return StepRecord(
            step=step, path=storage.url, complete=False, nbytes=0, world_size=None, saved_at=None, known=False
        )
    if summary is None:
        own = storage.url.rstrip("/").rsplit("/", 1)[-1]
        names = [n for n in storage.list_names() if n != own]  # some stores list an empty prefix as itself
        if not names:
            if _is_object(storage):  # an object store's plain object with a step's name
                _warn_once(
                    warned, storage.url, f"skipping {storage.url}: a plain object; it is not a step directory"
                )
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


def _is_object(storage: CheckpointStorage) -> bool:
    """Whether a remote step "directory" is in fact one object (asked only of steps that list as empty)."""
    fs, root = getattr(storage, "fs", None), getattr(storage, "root", None)
    try:
        return fs is not None and root is not None and bool(fs.isfile(root))
    except Exception:  # a listing never fails on an odd entry
        return False


# `_metadata_summary`'s answer when the metadata could not be read: the step is neither complete nor not.
_UNKNOWN: Any = object()


def _metadata_summary(storage: CheckpointStorage, warned: set[str]) -> Any:
    """(world size, shard bytes) from the committed metadata; None when absent or not a commit marker;
    `_UNKNOWN` when reading it failed.

    Only the few top-level fields are checked here (listing a run must stay cheap); a load
    validates the whole file before trusting any of it. A file read but not a commit marker (over
    the size cap, not JSON, not a file) makes the step incomplete; an I/O error while reading it
    makes it unknown. Each is reported once, naming the file and why.
    """
    where = f"{storage.url}/{METADATA_FILE}"
    try:
        doc = read_metadata_document(storage)
        files = doc["files"]
        if doc["format"] != FORMAT_NAME or not isinstance(doc["world_size"], int):
            return None
        return doc["world_size"], sum(int(f["nbytes"]) for f in files.values())
    except FileNotFoundError:  # IncompleteCheckpointError too: definitely absent
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # read, and not a commit marker
        _warn_once(warned, where, f"step at {storage.url} counts as incomplete: {type(e).__name__}: {e}")
        return None
    except OSError as e:  # EIO, ESTALE, a store's error after its retries: no evidence either way
        _warn_once(
            warned,
            where,
            f"step at {storage.url} is unknown: reading {METADATA_FILE} failed ({type(e).__name__}: {e}); "
            "it is neither loaded as complete nor deleted until it can be read",
        )
        return _UNKNOWN


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
    """Delete one step directory: the commit marker first, then the rest (see the module docstring).

    Deletes without checking: the caller holds the evidence (retention's verdict on a step whose
    metadata it read successfully, or a step it found definitely incomplete and older than a complete one).

    A step directory that is a symbolic link loses only the link: the files behind it belong to
    whoever linked them in, and may be outside the run.
    """
    if step.protocol == "file" and os.path.islink(step.root):
        os.unlink(step.root)
        return
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


def quarantine_step(step: StorageSpec) -> str | None:
    """Rename a damaged step directory aside, to a name the listing ignores; returns the new path.

    Only on local disk, where a rename is one atomic call (a linked step: the link is renamed, its
    target stays). On object stores a rename copies every byte, so nothing moves: None.
    """
    if step.protocol != "file":
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = f"{step.root}{QUARANTINE_SUFFIX}{stamp}"
    if os.path.lexists(target):  # os.rename would replace an empty directory there
        raise FileExistsError(f"cannot quarantine {step.root}: {target} exists")
    os.rename(step.root, target)
    return target
