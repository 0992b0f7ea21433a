"""torch-checkpointing 0.1.1, the peer a user would pick today besides DCP, as a benchmark system.

`torch-checkpointing` (the `bench` extra) descends from the same experimental `Checkpointer` that
shardsafe follows and is the library torchtitan plans to move to. It runs here in the one
configuration that works on this kind of machine, which the report names:

- `CheckpointManager` with `LocalFileSystemStorageConfig(use_direct_io=False)`: its default O_DIRECT
  writer opens files on ext4 but the kernel refuses its unaligned writes;
- no resharder: its resharding loads need a `DefaultMetadataManager`, whose multi-rank metadata
  gather allocates its buffers with `device="cuda"` (`metadata_manager.py`), so on CPU-only ranks it
  loads only into the layout that saved (`load_missing` says so for the other world sizes);
- it never fsyncs what it writes, so a returned save is not durable. It is measured twice: as it is
  (`torch-checkpointing`), and with every file it wrote fsync'd before the save counts as done
  (`torch-checkpointing+fsync`), the guarantee shardsafe's and DCP's saves give.

Blocking time of an async save is measured until its staging future is done (the manager's
`_staging_future`: its public `lock()` guards the same staging).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import torch.distributed as dist

TCKPT = "torch-checkpointing"
TCKPT_FSYNC = "torch-checkpointing+fsync"
# Its per-rank files are named `<item>_<rank>.pt`; anything else is rank 0's to sync.
_RANK_SUFFIX = re.compile(r"_(\d+)$")


def import_error() -> str | None:
    """Why torch-checkpointing cannot run here, or None."""
    try:
        import torch_checkpointing  # noqa: F401
    except ImportError as e:
        return f"torch-checkpointing is not installed (pip install '.[bench]'): {e}"
    return None


def _fsync_tree(path: str, rank: int) -> None:
    """fsync the files this rank wrote (names ending in `_<rank>`), then, on rank 0, the rest and the folders."""
    for folder, _, names in os.walk(path):
        for name in names:
            owner = _RANK_SUFFIX.search(os.path.splitext(name)[0])
            if (int(owner[1]) if owner else 0) == rank:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if rank == 0:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class TorchCheckpointingSystem:
    """torch-checkpointing's `CheckpointManager`, sync and async, with or without an fsync of its files."""

    def __init__(self, device: str, *, fsync: bool) -> None:
        from torch_checkpointing import CheckpointManager
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

        self.name = TCKPT_FSYNC if fsync else TCKPT
        self._fsync = fsync
        self._storage = LocalFileSystemStorageConfig(use_direct_io=False)
        self._manager_cls = CheckpointManager
        self._sync: Any = None
        self._async: Any = None
        self.async_missing = None
        self._rank = dist.get_rank() if dist.is_initialized() else 0

    def _manager(self, *, asynchronous: bool) -> Any:
        from torch_checkpointing import AsyncCheckpointSaverConfig, SyncCheckpointSaverConfig

        save = AsyncCheckpointSaverConfig() if asynchronous else SyncCheckpointSaverConfig()
        return self._manager_cls(self._manager_cls.Config(save=save, storage_config=self._storage))

    def describe(self) -> str:
        how = "then every file it wrote fsync'd (and its folders)" if self._fsync else "no fsync (as shipped)"
        return (
            "torch-checkpointing 0.1.1 CheckpointManager, sync and async savers, "
            f"LocalFileSystemStorageConfig(use_direct_io=False), no resharder; {how}"
        )

    @staticmethod
    def load_missing(saved_world_size: int, load_world_size: int) -> str | None:
        if saved_world_size == load_world_size:
            return None
        return (
            "torch-checkpointing 0.1.1 reshards only through DefaultMetadataManager, whose metadata "
            "all_gather allocates on device='cuda': no resharding load on CPU ranks"
        )

    def save(self, state: dict, path: str) -> None:
        if self._sync is None:
            self._sync = self._manager(asynchronous=False)
        self._sync.save(path, state)
        if self._fsync:
            _fsync_tree(path, self._rank)

    def async_save(self, state: dict, path: str) -> tuple[float, float]:
        if self._async is None:
            self._async = self._manager(asynchronous=True)
        start = time.perf_counter()
        write = self._async.save(path, state)
        self._async._staging_future.result()
        blocked = time.perf_counter() - start
        write.result()
        if self._fsync:
            _fsync_tree(path, self._rank)
        return blocked, time.perf_counter() - start

    def load(self, path: str, target: dict, *, verify: bool = True) -> None:
        if self._sync is None:
            self._sync = self._manager(asynchronous=False)
        loaded = self._sync.load(path, target)
        target.update(loaded)  # tensors are filled in place; plain values come back in the result

    def first_save(self, state: dict, path: str) -> None:
        manager = self._manager(asynchronous=False)
        try:
            manager.save(path, state)
            if self._fsync:
                _fsync_tree(path, self._rank)
        finally:
            manager.close()

    def repeat_save(self, state: dict, path: str) -> None:
        self.save(state, path)

    def close(self) -> None:
        for manager in (self._sync, self._async):
            if manager is not None:
                manager.close()
