"""Small shared types of the user API."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from planners.errors import CheckpointStateError

STATE_DICT = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RankInfo:
    """Which rank this process is, out of how many (the default process group's view).

    Positional as in the seed API: `RankInfo(0, 1)` or `RankInfo(global_rank=0, global_world_size=1)`.
    """

    global_rank: int
    global_world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.global_rank < self.global_world_size:
            raise ValueError(f"global_rank {self.global_rank} is not in [0, {self.global_world_size})")

    @classmethod
    def detect(cls) -> RankInfo:
        """From the default process group when one is initialised, else a single rank.

        Raises:
            CheckpointStateError: no process group is initialised but the launcher's environment
                (`WORLD_SIZE` > 1, as torchrun sets it) says this process is one of several ranks:
                each would otherwise save as rank 0 of 1, and the last writer would win.
        """
        if dist.is_available() and dist.is_initialized():
            return cls(global_rank=dist.get_rank(), global_world_size=dist.get_world_size())
        world = os.environ.get("WORLD_SIZE", "").strip()
        if world.isdigit() and int(world) > 1:
            rank = os.environ.get("RANK", "?")
            raise CheckpointStateError(
                f"WORLD_SIZE={world} (RANK={rank}) says this process is one of {world} ranks, but no "
                "torch.distributed process group is initialised; call "
                "torch.distributed.init_process_group() (e.g. backend='gloo' or 'nccl') on every rank "
                "before creating the checkpointer, or unset WORLD_SIZE for a single-process run"
            )
        return cls(global_rank=0, global_world_size=1)


def checkpoint_path(path: Any, *, what: str = "path") -> str:
    """`path` as a str: a `str` or any `os.PathLike` (e.g. `pathlib.Path`); fsspec URLs stay as given.

    Raises:
        TypeError: the path is empty, or neither a str nor path-like (an empty path stays a
            `TypeError`, the error it always was).
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, bytes) or not isinstance(path, str):
        raise TypeError(f"{what} must be a str or os.PathLike (e.g. pathlib.Path), got {type(path).__name__}")
    if not path:
        raise TypeError(f"{what} is an empty path; pass the checkpoint directory (a str or os.PathLike)")
    return path
