"""Configuration: kw-only dataclasses, validated when built, with units in the names.

Every tunable of the library lives here. `CheckpointerConfig` groups the
others and is what `make_sync_checkpointer` / `make_async_checkpointer` take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from checkpoint.options import DEFAULT_MAX_METADATA_BYTES
from checkpoint.save.barriers import BarrierConfig
from storage.remote import TransferConfig

GiB = 1024**3


def _positive(owner: object, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{type(owner).__name__}.{name} must be positive, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CheckpointWriterConfig:
    """How shard files are written.

    Attributes:
        write_barrier_timeout_secs: longest wait without progress for the other ranks during a save's
            exchanges: the async commit waits as long as the ranks still writing keep sending
            heartbeats, and fails once none has come for this long.
        max_file_bytes: a rank's chunks are split into shard files of at most this size (a
            larger single chunk gets a file of its own), so uploads and downloads parallelise.
        io_threads: shard files a rank writes at the same time.
        save_lease_secs: a save's in-progress marker counts as live for this long after its last
            heartbeat (renewed every quarter of it); cleanup after another save's commit never deletes
            the files of a save with a live marker.
    """

    write_barrier_timeout_secs: float = 600.0
    max_file_bytes: int = 2 * GiB
    io_threads: int = 4
    save_lease_secs: float = 300.0

    def __post_init__(self) -> None:
        _positive(
            self,
            write_barrier_timeout_secs=self.write_barrier_timeout_secs,
            max_file_bytes=self.max_file_bytes,
            io_threads=self.io_threads,
            save_lease_secs=self.save_lease_secs,
        )


@dataclass(frozen=True, kw_only=True)
class CheckpointReaderConfig:
    """How checkpoints are read.

    Attributes:
        verify_checksums: check every byte read against its crc32c (a load may pass verify=False).
        io_threads: shard files read at the same time.
        max_metadata_bytes: a larger metadata file is refused before it is read, so a hostile or
            damaged one (or one linked to a device) cannot exhaust memory. Real metadata needs a few
            hundred bytes per chunk: the default fits millions of chunks.
    """

    verify_checksums: bool = True
    io_threads: int = 8
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES

    def __post_init__(self) -> None:
        _positive(self, io_threads=self.io_threads, max_metadata_bytes=self.max_metadata_bytes)


@dataclass(frozen=True, kw_only=True)
class CheckpointStagerConfig:
    """How an async save copies tensors off the training tensors.

    Attributes:
        use_pinned_memory: page-lock the staging buffers for fast device-to-host copies. None (the
            default): where CUDA is available; True without CUDA is an error.
        use_shared_memory: put the buffers in shared memory, so the writer process reads them without a copy
            (the async checkpointer needs it).
        use_async_staging: return from save() once copies are issued; the stage future says when they finish.
        use_non_blocking_copy: issue device-to-host copies non-blocking on a dedicated CUDA stream. None (the
            default): where CUDA is available; True without CUDA is an error.
    """

    use_pinned_memory: bool | None = None
    use_shared_memory: bool = True
    use_async_staging: bool = True
    use_non_blocking_copy: bool | None = None


@dataclass(frozen=True, kw_only=True)
class CheckpointProcessConfig:
    """The async writer process.

    Attributes:
        subprocess_init_timeout_secs: longest wait for the writer process to start.
        subprocess_shutdown_timeout_secs: longest wait for a graceful stop before it is killed.
        write_timeout_secs: longest a save's write and commit may take in the writer process; past it
            the save fails and the process is killed (the next save starts a new one).
    """

    subprocess_init_timeout_secs: float = 60.0
    subprocess_shutdown_timeout_secs: float = 60.0
    write_timeout_secs: float = 3600.0

    def __post_init__(self) -> None:
        _positive(
            self,
            subprocess_init_timeout_secs=self.subprocess_init_timeout_secs,
            subprocess_shutdown_timeout_secs=self.subprocess_shutdown_timeout_secs,
            write_timeout_secs=self.write_timeout_secs,
        )


@dataclass(frozen=True, kw_only=True)
class CheckpointerConfig:
    """Everything a checkpointer is built from.

    Attributes:
        storage_options: passed to fsspec for remote paths (endpoint, credentials, ...). Never
            logged, never written to a checkpoint, hidden from repr(). For S3, e.g.
            `{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ..., "region_name": ...}}`.
        transfer_config: part sizes, parallelism and retries of object-store transfers.
    """

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    reader_config: CheckpointReaderConfig = field(default_factory=CheckpointReaderConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    transfer_config: TransferConfig = field(default_factory=TransferConfig)
