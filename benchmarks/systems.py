"""One adapter per checkpoint system, so every scenario runs both the same way.

Each adapter saves (sync: returns once durable and committed), saves async
(timing how long the caller is blocked, then waiting until it is durable),
and loads into a target. Both systems get their documented, recommended
setup for the hardware: DCP's `async_save` with a persistent process
executor and a reused `DefaultStager` (shared memory; pinned memory and
non-blocking copies where CUDA exists), its `FileSystemWriter` defaults
(fsync on); shardsafe's checkpointers with their defaults (checksums
verified on load). Where a feature is missing from this tree or from the
installed torch, the adapter says why instead of measuring something else.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import checkpoint
from benchmarks import peers
from benchmarks.stats import DCP, OURS


class OursSystem:
    """shardsafe through its public API: `make_sync_checkpointer`, `make_async_checkpointer`."""

    name = OURS

    def __init__(self, device: str) -> None:
        self._sync = checkpoint.make_sync_checkpointer()
        self._async: Any = None
        self._planning: Any = None
        self.async_missing = (
            None
            if hasattr(checkpoint, "make_async_checkpointer")
            else "checkpoint.make_async_checkpointer does not exist in this tree yet"
        )

    def describe(self) -> str:
        return "make_sync_checkpointer() / make_async_checkpointer() with default configs (checksums verified on load)"

    def save(self, state: dict, path: str) -> None:
        self._sync.save(state, path)

    def async_save(self, state: dict, path: str) -> tuple[float, float]:
        """Seconds until the training tensors may change (stage done), and until committed."""
        if self._async is None:
            self._async = checkpoint.make_async_checkpointer()
        start = time.perf_counter()
        stage_future, write_future = self._async.save(state, path)
        stage_future.result()
        blocked = time.perf_counter() - start
        write_future.result()
        return blocked, time.perf_counter() - start

    def load(self, path: str, target: dict, *, verify: bool = True) -> None:
        self._sync.load(path, state_dict=target, verify=verify)

    @staticmethod
    def load_missing(saved_world_size: int, load_world_size: int) -> str | None:
        return None

    def first_save(self, state: dict, path: str) -> None:
        """A save by a new checkpointer: nothing cached, the plan is made from scratch."""
        fresh = checkpoint.make_sync_checkpointer()
        fresh.save(state, path)
        fresh.close()

    def repeat_save(self, state: dict, path: str) -> None:
        """A save by a checkpointer kept for this state dict alone, so its plan cache stays warm."""
        if self._planning is None:
            self._planning = checkpoint.make_sync_checkpointer()
        self._planning.save(state, path)

    def close(self) -> None:
        for ckpt in (self._sync, self._async, self._planning):
            if ckpt is not None:
                ckpt.close()


class DcpSystem:
    """torch.distributed.checkpoint with the async options of the installed torch."""

    name = DCP

    def __init__(self, device: str) -> None:
        cuda = device == "cuda"
        self._stager: Any = None
        self._async_kwargs: dict[str, Any] = {}
        params = inspect.signature(dcp.async_save).parameters
        options = []
        if "async_checkpointer_type" in params:
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

            self._async_kwargs["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
            options.append("async_checkpointer_type=PROCESS")
        try:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        except ImportError:
            DefaultStager = None  # noqa: N806  (older torch: the FileSystemWriter stages)
        if DefaultStager is not None and "async_stager" in params:
            # Reused for every save: DCP caches the staging storages in the stager, so the
            # second and later saves copy into the same (shared, pinned) buffers.
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda,
                    use_shared_memory=True,
                    use_async_staging=True,
                    use_non_blocking_copy=cuda,
                )
            )
            self._async_kwargs["async_stager"] = self._stager
            options.append(
                f"DefaultStager(pinned={cuda}, shared=True, async_staging=True, non_blocking={cuda})"
            )
        self._options = options
        self._first_planner_cls = dcp.DefaultSavePlanner
        self._cached_planner = (
            dcp.DefaultSavePlanner(enable_plan_caching=True)
            if "enable_plan_caching" in inspect.signature(dcp.DefaultSavePlanner).parameters
            else None
        )
        self.async_missing = None

    def describe(self) -> str:
        return f"torch {torch.__version__}: save/load/async_save({', '.join(self._options)}), FileSystemWriter defaults"

    def save(self, state: dict, path: str) -> None:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path))

    def async_save(self, state: dict, path: str) -> tuple[float, float]:
        start = time.perf_counter()
        response = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(path), **self._async_kwargs)
        staging = getattr(response, "staging_completion", None)
        if staging is not None:  # staging runs in a thread: tensors may change only once it is done
            staging.result()
        blocked = time.perf_counter() - start
        upload = getattr(response, "upload_completion", response)
        upload.result()
        return blocked, time.perf_counter() - start

    def load(self, path: str, target: dict) -> None:
        dcp.load(target, storage_reader=dcp.FileSystemReader(path))

    @staticmethod
    def load_missing(saved_world_size: int, load_world_size: int) -> str | None:
        return None

    def first_save(self, state: dict, path: str) -> None:
        """A save with plan caching off: the local and global plans are made from scratch, as on a first save."""
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path), planner=self._first_planner_cls())

    def repeat_save(self, state: dict, path: str) -> None:
        """A save through the one planner with plan caching on (when this torch has it)."""
        planner = self._cached_planner or self._first_planner_cls()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path), planner=planner)

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()


def make_systems(device: str) -> list[Any]:
    """shardsafe, DCP and, where the `bench` extra installed it, torch-checkpointing without and with fsync."""
    systems: list[Any] = [OursSystem(device), DcpSystem(device)]
    if peers.import_error() is None:
        systems += [
            peers.TorchCheckpointingSystem(device, fsync=False),
            peers.TorchCheckpointingSystem(device, fsync=True),
        ]
    return systems


def describe_systems(device: str) -> dict[str, str]:
    """How each system is set up in this run, for the JSON report."""
    systems = make_systems(device)
    try:
        return {s.name: s.describe() for s in systems}
    finally:
        for s in systems:
            s.close()
