"""Builders: a ready checkpointer from a config, with rank info detected."""

from __future__ import annotations

from checkpoint.barriers import create_barrier_from_config
from checkpoint.checkpointer import SyncCheckpointer
from checkpoint.config import CheckpointerConfig
from checkpoint.hooks import WriterHook
from checkpoint.reader import CheckpointReader
from checkpoint.types import RankInfo
from checkpoint.writer import CheckpointWriter


def make_sync_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
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
        config.writer_config, rank_info, create_barrier_from_config(config.barrier_config), commit_hook,
        storage_options=config.storage_options,
    )
    reader = CheckpointReader(rank_info, config=config.reader_config, storage_options=config.storage_options)
    return SyncCheckpointer(writer, reader)
