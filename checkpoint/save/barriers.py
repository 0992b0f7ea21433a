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
    def execute_barrier(self, key: str | None = None) -> None:
        """Wait for every rank.

        Args:
            key: names this use of the barrier the same on every rank (the save id), so a
                process that restarted meets the others at the right generation.
        """


@register_barrier
class DistBarrier(Barrier):
    """A barrier over a torch.distributed process group (default: the world)."""

    barrier_type = "dist_barrier"

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def execute_barrier(self, key: str | None = None) -> None:
        dist.barrier(group=self.group)


@register_barrier
class TCPStoreBarrier(Barrier):
    """A barrier through a TCPStore, with its own timeout, outside the training collectives.

    Rank 0 hosts the store at `host:port`; the others connect to it. Each use
    is keyed by the save it follows (`key`, the save id, which every rank
    knows), never by a count kept in the process: a writer process that
    restarted (and so forgot its count) meets the others at the right keys.
    When rank 0's process restarts it hosts a new store on the same port, and
    a client whose connection broke reconnects once before giving up.
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
        self._address = (host, port)
        self.store = self._connect()
        self._uses = 0  # only for calls without a key (a process that never restarts)

    def _connect(self) -> dist.TCPStore:
        host, port = self._address
        return dist.TCPStore(
            host,
            port,
            self.world_size,
            is_master=self.rank == 0,
            timeout=self.timeout,
            wait_for_workers=False,
        )

    def execute_barrier(self, key: str | None = None) -> None:
        if key is None:
            self._uses += 1
            key = f"call-{self._uses}"
        name = f"{self.prefix}/{key}"
        try:
            self._arrive(name)
        except CheckpointTimeoutError:
            raise
        except Exception:  # the store's host restarted: connect to the new one and arrive there
            if self.rank == 0:
                raise
            self.store = self._connect()
            self._arrive(name)

    def _arrive(self, name: str) -> None:
        done = f"{name}/done"
        if self.store.add(name, 1) >= self.world_size:
            self.store.set(done, b"1")
        try:
            self.store.wait([done], self.timeout)
        except Exception as e:
            arrived = self.store.add(name, 0)
            raise CheckpointTimeoutError(
                f"barrier {name}: only {arrived} of {self.world_size} ranks arrived within "
                f"{self.timeout.total_seconds():.0f}s"
            ) from e
