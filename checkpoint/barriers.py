"""Barriers: a point every rank reaches before any goes on.

`DistBarrier` uses the training job's process group; `TCPStoreBarrier` uses
its own TCPStore, so it can run in the writer processes without touching
the job's collectives. Both time out rather than hang.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from planners.errors import CheckpointTimeoutError

_REGISTRY: dict[str, type[Barrier]] = {}


@dataclass(frozen=True, kw_only=True)
class BarrierConfig:
    """Which barrier the writer runs after a commit: a registered name and its arguments (None: none)."""

    barrier_type: str | None = None
    barrier_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.barrier_type is not None and self.barrier_type not in _REGISTRY:
            raise ValueError(f"unknown barrier_type {self.barrier_type!r}; known: {sorted(_REGISTRY)}")


def register_barrier(cls: type[Barrier]) -> type[Barrier]:
    """Class decorator that makes a barrier available by its `barrier_type` name."""
    _REGISTRY[cls.barrier_type] = cls
    return cls


def create_barrier_from_config(config: BarrierConfig) -> Barrier | None:
    if config.barrier_type is None:
        return None
    return _REGISTRY[config.barrier_type](**config.barrier_args)


class Barrier(abc.ABC):
    """Blocks until every rank has called `execute_barrier`, or raises on timeout."""

    barrier_type: str = ""

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        """Wait for every rank."""


@register_barrier
class DistBarrier(Barrier):
    """A barrier over a torch.distributed process group (default: the world)."""

    barrier_type = "dist_barrier"

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def execute_barrier(self) -> None:
        dist.barrier(group=self.group)


@register_barrier
class TCPStoreBarrier(Barrier):
    """A barrier through a TCPStore, with its own timeout, outside the training collectives.

    Each call uses a fresh generation of keys, so the same barrier can be
    executed any number of times.
    """

    barrier_type = "tcp_store"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        timeout_secs: float = 600.0,
        prefix: str = "shardsafe-barrier",
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timedelta(seconds=timeout_secs)
        self.prefix = prefix
        self.store = dist.TCPStore(
            host, port, world_size, is_master=rank == 0, timeout=self.timeout, wait_for_workers=False
        )
        self._generation = 0

    def execute_barrier(self) -> None:
        self._generation += 1
        key = f"{self.prefix}/{self._generation}"
        self.store.add(key, 1)
        done = f"{key}/done"
        if self.store.add(key, 0) >= self.world_size:
            self.store.set(done, b"1")
        try:
            self.store.wait([done], self.timeout)
        except Exception as e:
            arrived = self.store.add(key, 0)
            raise CheckpointTimeoutError(
                f"barrier {key}: only {arrived} of {self.world_size} ranks arrived within {self.timeout.total_seconds():.0f}s"
            ) from e
