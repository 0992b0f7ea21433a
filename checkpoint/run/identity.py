"""A run's identity and its timeline: which steps belong to this run, and which of them are its history.

A step number is not an identity: two runs sharing a `local_root` both have a step 3, and after a
rollback (`CheckpointManager.load(state, step=5)` past a loss spike) the steps 6..9 saved before it
are no longer the run's history, while the 6 and 7 saved after it are. So a run carries a
`RunRecord`:

- `run_id`: random, made when the run has none; stored in the durable root (`RUN_FILE`) at the first
  save of a manager with a local tier, and copied into every local step (`LocalTag`);
- `timelines`: the chain of timelines, oldest first. A rollback to step N appends a new timeline
  branched at N (-1: a restart that found nothing to load): the older timelines' steps after N are
  *abandoned*. A resume below the newest step of the history (a newer step was damaged) is a
  rollback too. The durable steps a rollback
  abandons are recorded by their save id (`abandoned`), since durable steps carry no tag.

A local step is usable only when its tag names this run and its (timeline, step) is on the record's
history (`RunRecord.on_history`). Every tag holds the whole record as of its save, so a job whose
durable root cannot be read still knows the newest history its local steps saw (`newest_record`).

The files are small JSON documents, validated on reading (they are input like any other file); a
document that does not parse is treated as absent for a tag (the step is unusable, and not deleted)
and raised for the durable record (the run's identity must not be guessed).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from planners.errors import InvalidCheckpointError

# The run record in the durable root, and each local step's tag (same name, in the step directory).
RUN_FILE = "shardsafe-run.json"
RUN_FORMAT = "shardsafe-run"
RUN_VERSION = 1
# Bounds on what a record may declare (it is read from storage: hostile input).
MAX_RECORD_BYTES = 1024 * 1024
MAX_TIMELINES = 10_000
MAX_ABANDONED = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    """One timeline of a run: its id, and the step it branched from (None: the run's first)."""

    id: str
    branched_at: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AbandonedStep:
    """A durable step a rollback abandoned, by its save id (a later save of that number is another save)."""

    step: int
    save_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """A run's id and its chain of timelines (see the module docstring)."""

    run_id: str
    timelines: tuple[Timeline, ...]
    abandoned: tuple[AbandonedStep, ...] = field(default=())

    @staticmethod
    def new() -> RunRecord:
        return RunRecord(run_id=secrets.token_hex(16), timelines=(Timeline(id=secrets.token_hex(8)),))

    @property
    def timeline(self) -> str:
        """The current timeline's id."""
        return self.timelines[-1].id

    def on_history(self, timeline: str, step: int) -> bool:
        """Whether a step saved as `step` on `timeline` is part of the current timeline's history."""
        ids = [t.id for t in self.timelines]
        if timeline not in ids:
            return False
        later = [
            t.branched_at for t in self.timelines[ids.index(timeline) + 1 :] if t.branched_at is not None
        ]
        return not later or step <= min(later)

    def rolled_back(self, step: int, abandoned: Iterable[AbandonedStep] = ()) -> RunRecord:
        """The record after a rollback to `step`: a new timeline branched there."""
        return replace(
            self,
            timelines=(*self.timelines, Timeline(id=secrets.token_hex(8), branched_at=step)),
            abandoned=(*self.abandoned, *abandoned),
        )

    def abandoned_save(self, step: int, save_id: str | None) -> bool:
        """Whether the durable step `step` with `save_id` is one a rollback abandoned."""
        return save_id is not None and AbandonedStep(step=step, save_id=save_id) in self.abandoned

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "run_id": self.run_id,
            "timelines": [{"id": t.id, "branched_at": t.branched_at} for t in self.timelines],
            "abandoned": [{"step": a.step, "save_id": a.save_id} for a in self.abandoned],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalTag:
    """What a local step records about its run: the record as of its save, and the durable root's path."""

    record: RunRecord
    durable_root: str

    def to_bytes(self) -> bytes:
        return json.dumps({"run": self.record.to_json(), "durable_root": self.durable_root}).encode()


def record_to_bytes(record: RunRecord) -> bytes:
    return json.dumps(record.to_json()).encode()


def parse_record(data: bytes, *, where: str) -> RunRecord:
    """A run record from its JSON bytes; `InvalidCheckpointError` naming `where` when it is not one."""
    try:
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"{len(data)} bytes, over {MAX_RECORD_BYTES}")
        return _record(json.loads(data))
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise InvalidCheckpointError(f"{where}: not a shardsafe run record ({type(e).__name__}: {e})") from e


def parse_tag(data: bytes, *, where: str) -> LocalTag:
    """A local step's tag; `InvalidCheckpointError` naming `where` when it is not one."""
    try:
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"{len(data)} bytes, over {MAX_RECORD_BYTES}")
        doc = json.loads(data)
        root = doc["durable_root"]
        if not isinstance(root, str):
            raise TypeError("durable_root is not a string")
        return LocalTag(record=_record(doc["run"]), durable_root=root)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise InvalidCheckpointError(f"{where}: not a local step tag ({type(e).__name__}: {e})") from e


def newest_record(tags: Iterable[LocalTag], durable_root: str) -> RunRecord | None:
    """The longest history among the tags that name `durable_root` (for a job that cannot read it)."""
    own = [t.record for t in tags if t.durable_root == durable_root]
    return max(own, key=lambda r: len(r.timelines) + len(r.abandoned), default=None)


def _record(doc: Any) -> RunRecord:
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT or doc.get("version") != RUN_VERSION:
        raise ValueError(f"not a {RUN_FORMAT} document of version {RUN_VERSION}")
    timelines, abandoned = doc["timelines"], doc.get("abandoned", [])
    if not isinstance(timelines, list) or not 1 <= len(timelines) <= MAX_TIMELINES:
        raise ValueError(f"timelines must be a list of 1 to {MAX_TIMELINES}")
    if not isinstance(abandoned, list) or len(abandoned) > MAX_ABANDONED:
        raise ValueError(f"abandoned must be a list of at most {MAX_ABANDONED}")
    return RunRecord(
        run_id=_hex(doc["run_id"]),
        timelines=tuple(
            Timeline(
                id=_hex(t["id"]),
                branched_at=None if t["branched_at"] is None else _step(t["branched_at"], -1),
            )
            for t in timelines
        ),
        abandoned=tuple(AbandonedStep(step=_step(a["step"]), save_id=_hex(a["save_id"])) for a in abandoned),
    )


def _hex(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 64
        or any(c not in "0123456789abcdef" for c in value)
    ):
        raise ValueError(f"{value!r} is not a hex id")
    return value


def _step(value: Any, lowest: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        raise ValueError(f"{value!r} is not a step")
    return value


def read_run_record(storage: Any) -> RunRecord | None:
    """The run record in a durable root (an open `CheckpointStorage`); None when definitely absent.

    Raises:
        OSError: it could not be read (the run's identity is then unknown, never assumed new).
        InvalidCheckpointError: it was read and is not a run record.
    """
    try:
        data = storage.read_bytes(RUN_FILE, max_bytes=MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    return parse_record(data, where=f"{storage.url}/{RUN_FILE}")


def write_run_record(storage: Any, record: RunRecord, *, first: bool) -> RunRecord:
    """Store `record` in a durable root; with `first`, only where none is stored yet.

    Returns the record the root holds afterwards: `record`, or (with `first`) the one another job
    stored in the meantime, which is the run's identity from then on.
    """
    storage.prepare()
    try:
        storage.publish(RUN_FILE, record_to_bytes(record), overwrite=not first)
    except FileExistsError:
        stored = read_run_record(storage)
        if stored is None:
            raise
        return stored
    return record
