"""Builders: a ready checkpointer from a config, with rank info detected."""

from __future__ import annotations

from checkpoint.async_writer.async_checkpointer import AsyncCheckpointer
from checkpoint.async_writer.client import CheckpointProcess
from checkpoint.async_writer.staging import DefaultStager
from checkpoint.checkpointer import SyncCheckpointer
from checkpoint.config import CheckpointerConfig
from checkpoint.load.reader import CheckpointReader
from checkpoint.save.barriers import DistBarrier, create_barrier_from_config
from checkpoint.save.hooks import CommitHook
from checkpoint.save.writer import CheckpointWriter
from checkpoint.types import RankInfo
from storage.spec import StorageAccess


def make_sync_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: CommitHook | None = None,
) -> SyncCheckpointer:
    """A synchronous checkpointer for this rank.

    Args:
        config: tunables; defaults are fine for most jobs.
        rank_info: defaults to the default process group's rank and size (one rank without one).
        commit_hook: runs around each commit, on every rank.

    Example:
        >>> ckpt = make_sync_checkpointer()
        >>> ckpt.save({"w": torch.ones(2)}, "/tmp/run/step-100")
        >>> ckpt.close()
    """
    config = config or CheckpointerConfig()
    rank_info = rank_info or RankInfo.detect()
    writer = CheckpointWriter(
        config.writer_config,
        rank_info,
        create_barrier_from_config(config.barrier_config),
        commit_hook,
        storage=_storage_access(config),
    )
    reader = _make_reader(config, rank_info)
    return SyncCheckpointer(writer, reader)


def make_async_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: CommitHook | None = None,
) -> AsyncCheckpointer:
    """An async checkpointer for this rank: staging into a reused shared buffer, a writer process per rank.

    Collective when the world has more than one rank (rank 0 hosts the store the writer processes
    commit through). The writer process is spawned: the script needs `if __name__ == "__main__":`.

    Args:
        config: tunables; defaults are fine for most jobs. Staging must use shared memory.
        rank_info: defaults to the default process group's rank and size (one rank without one).
        commit_hook: runs around each commit in the writer process, on every rank (pickled
            once to reach it, so it must be picklable).

    Raises:
        ValueError: the config asks for something an async save cannot do (private staging
            buffers, a barrier over the training process group, CUDA-only options without CUDA).

    Example:
        >>> ckpt = make_async_checkpointer()
        >>> stage_future, write_future = ckpt.save({"w": torch.ones(2)}, "/tmp/run/step-100")
        >>> write_future.result()
        >>> ckpt.close()
    """
    config = config or CheckpointerConfig()
    rank_info = rank_info or RankInfo.detect()
    _check_async_config(config)
    process = CheckpointProcess(
        rank_info,
        config.process_config,
        writer_config=config.writer_config,
        barrier_config=config.barrier_config,
        commit_hook=commit_hook,
        storage=_storage_access(config),
    )
    return AsyncCheckpointer(DefaultStager(config.staging_config), process, _make_reader(config, rank_info))


def _check_async_config(config: CheckpointerConfig) -> None:
    """Refuse what the writer process cannot do: private staging buffers, the job's process group."""
    if not config.staging_config.use_shared_memory:
        raise ValueError(
            "the async writer process reads staged tensors from shared memory; "
            "CheckpointStagerConfig(use_shared_memory=False) works only with a stager used on its own"
        )
    if config.barrier_config.barrier_type == DistBarrier.barrier_type:
        raise ValueError(
            f"barrier_type {DistBarrier.barrier_type!r} needs the training process group, which the writer "
            "process does not join; use 'tcp_store' or no barrier (the commit already waits for every rank)"
        )


def _storage_access(config: CheckpointerConfig) -> StorageAccess:
    """The one value through which the writer, the reader and the writer process reach storage."""
    return StorageAccess(storage_options=config.storage_options, transfer=config.transfer_config)


def _make_reader(config: CheckpointerConfig, rank_info: RankInfo) -> CheckpointReader:
    """Loading is the same for both checkpointers."""
    return CheckpointReader(
        rank_info,
        config=config.reader_config,
        storage=_storage_access(config),
    )
