"""One node's local tier on disk: which names it holds, and checking a file a peer sent.

The layout is a run root like the durable tier's: `LOCAL_ROOT/step-000000007/`
holding the same safetensors shard files and `metadata.json`. Only those
names are ever served or accepted: a request names a step directory and a
file, each checked against the format's patterns, so `..`, absolute paths and
any other name are refused before a path is built; symbolic links are refused
when opened (`O_NOFOLLOW`, and the step directory itself must not be a link).

A received file is written under a temporary name in its step directory and
checked before it is renamed into place: a shard file against the block
checksums it carries in its own checksum table, `metadata.json` by parsing it
(its digest covers every field). Copies are therefore verified by their own
bytes, never by trusting the sender.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from checkpoint.run.steps import STEP_DIGITS, StepRecord, modified_at, parse_step_dir, step_dir_name
from planners.checksums import bad_blocks
from planners.errors import InvalidCheckpointError, TierPathError
from planners.grid import CHECKSUM_ENTRY
from planners.metadata import CHECKSUM_BLOCK_BYTES, METADATA_FILE, SHARD_FILE_RE
from planners.metadata_parse import parse_metadata
from planners.tier_placement import MAX_LISTED_FILES, MAX_LISTED_STEPS, StepHolding
from storage.checksummed_shard import checksum_slices, parse_checksum_table
from storage.local import LocalStorage
from storage.safetensors_io import read_header

# Received files are checked this many bytes at a time (whole checksum blocks): one buffer per request.
VERIFY_READ_BYTES = 16 * 1024 * 1024
# A metadata file larger than this is refused on receipt (the loader's own cap is the same order).
MAX_METADATA_BYTES = 256 * 1024 * 1024
# Suffix of a quarantined copy: no pattern of the format matches it, so it is never served or listed.
QUARANTINE_MARK = ".quarantined-"
TEMP_MARK = ".receiving-"


def checked_names(step_dir: str, name: str) -> tuple[int, str, str]:
    """(step, step directory, file name) of a request, or `TierPathError` naming what is wrong."""
    step = parse_step_dir(step_dir)
    if step is None or step_dir != step_dir_name(step):  # `step-1` would make a directory never listed
        raise TierPathError(
            f"{step_dir!r} is not a step directory (step-<{STEP_DIGITS} digits>); only those are served"
        )
    if name != METADATA_FILE and SHARD_FILE_RE.fullmatch(name) is None:
        raise TierPathError(
            f"{name!r} is not a shard file or {METADATA_FILE}; the local tier serves nothing else"
        )
    return step, step_dir, name


def step_directory(root: str, step_dir: str, *, create: bool = False) -> str:
    """The real directory of a step under `root`; refuses a step directory that is a symbolic link."""
    path = os.path.join(root, step_dir)
    if create:
        os.makedirs(path, exist_ok=True)
    info = os.lstat(path)  # FileNotFoundError when absent
    if not stat.S_ISDIR(info.st_mode):
        raise TierPathError(f"{path}: is not a directory (a symbolic link?)")
    return path


def open_regular(path: str) -> tuple[int, int]:
    """A read descriptor and the size of a regular file, never through a symbolic link."""
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        if os.path.islink(path):
            raise TierPathError(f"{path}: is a symbolic link") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise TierPathError(f"{path}: is not a regular file")
    return fd, info.st_size


def verify_received(directory: str, temp_name: str, name: str) -> None:
    """Check a received copy by its own bytes; `InvalidCheckpointError` naming the file when it fails.

    The body's SHA-256 was already checked against the sender's while it streamed in; this checks
    the bytes against the checksums the file itself carries (a shard file holding only plain or
    rank-local values has none: its checksums live in the metadata, checked by every load).
    """
    storage = LocalStorage(directory)
    where = f"{directory}/{name}"
    if name == METADATA_FILE:
        parse_metadata(storage.read_bytes(temp_name, max_bytes=MAX_METADATA_BYTES), where=where)
        return
    header = read_header(storage, temp_name, where=where)
    if CHECKSUM_ENTRY not in header.tensors:
        return  # a file of plain or rank-local values only: its checksums are in the metadata
    block = CHECKSUM_BLOCK_BYTES
    slices = checksum_slices(header, block_bytes=block, where=where)
    table_entry = header.tensors[CHECKSUM_ENTRY]
    (raw,) = storage.read_ranges(temp_name, [(table_entry.offset_bytes, table_entry.nbytes)])
    table = parse_checksum_table(raw)
    step = max(block, VERIFY_READ_BYTES // block * block)
    for key, (first, count) in slices.items():
        entry = header.tensors[key]
        expected = table[first : first + count]
        for start in range(0, entry.nbytes, step):
            n = min(step, entry.nbytes - start)
            (data,) = storage.read_ranges(temp_name, [(entry.offset_bytes + start, n)])
            if bad_blocks(data, expected, block, first_block=start // block):
                raise InvalidCheckpointError(
                    f"{where}: key {key!r}: received bytes fail the file's own checksums; the copy is refused"
                )


def list_holdings(root: str) -> dict[int, StepHolding]:
    """What this node holds: every step directory under `root`, committed or not (bounded)."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return {}
    steps = [(s, n) for n in names if (s := parse_step_dir(n)) is not None and n == step_dir_name(s)]
    if len(steps) > MAX_LISTED_STEPS:
        raise InvalidCheckpointError(f"{root}: {len(steps)} step directories, over {MAX_LISTED_STEPS}")
    out = {}
    for step, name in steps:
        held = _holding(os.path.join(root, name), step)
        if held is not None:
            out[step] = held
    return out


def _holding(directory: str, step: int) -> StepHolding | None:
    try:
        if os.path.islink(directory):
            return None
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return None
    present = {}
    for name in entries[:MAX_LISTED_FILES]:
        if name == METADATA_FILE or SHARD_FILE_RE.fullmatch(name):
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode):
                present[name] = info.st_size
    required = _required(directory) if METADATA_FILE in present else None
    return StepHolding(step=step, committed=required is not None, required=required or {}, present=present)


def _required(directory: str) -> dict[str, int] | None:
    """The files a committed step's metadata lists (with itself); None when unreadable."""
    try:
        data = LocalStorage(directory).read_bytes(METADATA_FILE, max_bytes=MAX_METADATA_BYTES)
        files = json.loads(data)["files"]
        if not isinstance(files, dict) or len(files) > MAX_LISTED_FILES:
            return None
        required = {str(n): int(f["nbytes"]) for n, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    required[METADATA_FILE] = len(data)
    return required


def holdings_to_json(held: dict[int, StepHolding]) -> list[dict[str, Any]]:
    return [
        {"step": h.step, "committed": h.committed, "required": dict(h.required), "present": dict(h.present)}
        for h in held.values()
    ]


def holdings_from_json(doc: Any, *, where: str) -> dict[int, StepHolding]:
    """A peer's listing, validated (it is untrusted input)."""
    if not isinstance(doc, list) or len(doc) > MAX_LISTED_STEPS:
        raise InvalidCheckpointError(f"{where}: the step listing is not a list of at most {MAX_LISTED_STEPS}")
    out = {}
    try:
        for item in doc:
            required, present = _name_sizes(item["required"]), _name_sizes(item["present"])
            step = int(item["step"])
            out[step] = StepHolding(
                step=step, committed=bool(item["committed"]), required=required, present=present
            )
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidCheckpointError(f"{where}: malformed step listing ({type(e).__name__}: {e})") from e
    return out


def _name_sizes(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > MAX_LISTED_FILES:
        raise ValueError("not a map of at most MAX_LISTED_FILES names")
    return {str(k): int(v) for k, v in value.items()}


def local_records(local_root: str) -> list[StepRecord]:
    """The committed steps of one node's local tier, oldest first, as records of the tier `local`."""
    out = []
    for step, held in sorted(list_holdings(local_root).items()):
        if held.committed:
            nbytes = sum(n for name, n in held.required.items() if name != METADATA_FILE)
            path = os.path.join(local_root, step_dir_name(step))
            storage = LocalStorage(path)
            out.append(
                StepRecord(
                    step=step,
                    path=path,
                    complete=True,
                    nbytes=nbytes,
                    world_size=_world_size(storage),
                    saved_at=modified_at(storage, METADATA_FILE),
                    tiers=("local",),
                )
            )
    return out


def _world_size(storage: LocalStorage) -> int | None:
    try:
        value = json.loads(storage.read_bytes(METADATA_FILE, max_bytes=MAX_METADATA_BYTES))["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
