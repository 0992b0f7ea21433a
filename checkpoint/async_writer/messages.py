"""The records a trainer rank and its async writer process exchange (both sides import this).

The trainer side (`checkpoint.async_writer.client`, `checkpoint.async_writer.supervisor`)
sends `WriterInit` once, at spawn, then one request at a time over the pipe;
the writer process (`checkpoint.async_writer.child`) answers each with exactly one
`WriterResponse`. Everything here is pickled, so it holds plain data only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from checkpoint.async_writer.staging import StagingLayout
from checkpoint.config import CheckpointWriterConfig
from checkpoint.save.barriers import BarrierConfig
from checkpoint.save.hooks import CommitHook
from checkpoint.save.protocol import PreparedSave
from storage.spec import StorageSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterInit:
    """Everything a writer process is started with (pickled once, at spawn)."""

    rank: int
    world_size: int
    store_address: tuple[str, int] | None  # rank 0's commit store; None for a single rank
    writer_config: CheckpointWriterConfig
    barrier_config: BarrierConfig
    commit_hook: CommitHook | None
    log_level: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WriteRequest:
    """Write and commit one save from staging buffer `buffer_id` (its descriptor follows if `fd_follows`)."""

    path: str
    storage: StorageSpec  # resolved once by the trainer's plan step
    prepared: PreparedSave
    layout: StagingLayout
    buffer_id: int
    buffer_nbytes: int
    fd_follows: bool
    staging_error: str | None  # the staging failed: only report it through the commit


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    """Unmap the staging buffer (the trainer is about to allocate another)."""


@dataclass(frozen=True, slots=True)
class StopRequest:
    """Answer, then exit."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterResponse:
    """The outcome of one request; `error` is the original exception, `traceback` its text in the writer."""

    error: BaseException | None = None
    traceback: str | None = None
    bytes_written: int = 0
    files_written: int = 0
    phase_secs: dict[str, float] = field(default_factory=dict)
