"""Small shared types of the user API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

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
        """From the default process group when one is initialised, else a single rank."""
        if dist.is_available() and dist.is_initialized():
            return cls(global_rank=dist.get_rank(), global_world_size=dist.get_world_size())
        return cls(global_rank=0, global_world_size=1)
