"""The few cross-rank exchanges a save needs, over a process group or a store.

A save exchanges small Python objects (plan digests, plans, write results)
between ranks and the coordinator (rank 0). A synchronous save uses the
training job's process group; the async writer processes use a TCPStore,
so their traffic never interleaves with training collectives. Both give
the same three operations, each of which every rank must call, in the same
order: that is what keeps a failing rank from leaving the others hanging.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any, Protocol

import torch.distributed as dist

from planners.errors import CheckpointTimeoutError

COORDINATOR = 0


class Exchange(Protocol):
    """Collective object exchange; every rank calls each method in the same order."""

    rank: int
    world_size: int

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on the coordinator (rank order); None elsewhere."""

    def scatter(self, objs: list[Any] | None) -> Any:
        """The coordinator's `objs[rank]` on each rank."""

    def broadcast(self, obj: Any) -> Any:
        """The coordinator's `obj` on every rank."""


class SingleRankExchange:
    """The exchange of a job with one rank: everything stays local."""

    rank = 0
    world_size = 1

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def scatter(self, objs: list[Any] | None) -> Any:
        assert objs is not None
        return objs[0]

    def broadcast(self, obj: Any) -> Any:
        return obj


class ProcessGroupExchange:
    """Object collectives over a torch.distributed process group (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == COORDINATOR else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self.group, COORDINATOR) if self.group else COORDINATOR, group=self.group)
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        out: list[Any] = [None]
        src = dist.get_global_rank(self.group, COORDINATOR) if self.group else COORDINATOR
        dist.scatter_object_list(out, objs if self.rank == COORDINATOR else None, src=src, group=self.group)
        return out[0]

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.rank == COORDINATOR else None]
        src = dist.get_global_rank(self.group, COORDINATOR) if self.group else COORDINATOR
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


class StoreExchange:
    """Object exchange through a `torch.distributed.Store`, with a timeout on every wait.

    Keys are namespaced by `prefix` (one per save) and a call counter, so two
    saves never read each other's entries. Payloads are pickled: they only
    travel between this job's own processes, never through a checkpoint.
    """

    def __init__(self, store: dist.Store, *, rank: int, world_size: int, prefix: str, timeout_s: float) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix
        self.timeout = timedelta(seconds=timeout_s)
        self._calls = 0

    def _key(self, op: str, rank: int | str) -> str:
        return f"{self.prefix}/{self._calls}/{op}/{rank}"

    def _wait(self, keys: list[str], what: str) -> None:
        try:
            self.store.wait(keys, self.timeout)
        except Exception as e:  # the store raises a bare RuntimeError/DistStoreError on timeout
            missing = [k.rsplit("/", 1)[-1] for k in keys if not self.store.check([k])]
            raise CheckpointTimeoutError(
                f"{what}: timed out after {self.timeout.total_seconds():.0f}s waiting for rank(s) {', '.join(missing)} "
                f"(a rank or its writer process died or is stuck): {e}"
            ) from e

    def gather(self, obj: Any) -> list[Any] | None:
        self._calls += 1
        self.store.set(self._key("gather", self.rank), pickle.dumps(obj))
        if self.rank != COORDINATOR:
            return None
        keys = [self._key("gather", r) for r in range(self.world_size)]
        self._wait(keys, "gathering write results")
        return [pickle.loads(self.store.get(k)) for k in keys]  # allow_pickle: our own processes, never a file

    def scatter(self, objs: list[Any] | None) -> Any:
        self._calls += 1
        if self.rank == COORDINATOR:
            assert objs is not None
            for r, o in enumerate(objs):
                self.store.set(self._key("scatter", r), pickle.dumps(o))
        key = self._key("scatter", self.rank)
        self._wait([key], "waiting for the coordinator")
        return pickle.loads(self.store.get(key))  # allow_pickle: our own processes, never a file

    def broadcast(self, obj: Any) -> Any:
        return self.scatter([obj] * self.world_size if self.rank == COORDINATOR else None)
