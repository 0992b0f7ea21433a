"""The few cross-rank exchanges a save needs, over a process group or a store.

A save exchanges small Python objects (plan digests, plans, write results)
between ranks and the coordinator (rank 0). A synchronous save uses the
training job's process group; the async writer processes use a TCPStore,
so their traffic never interleaves with training collectives. Both give
the same three operations, each of which every rank must call, in the same
order: that is what keeps a failing rank from leaving the others hanging.
A rank whose process dies cannot take part, so every wait also ends: by a
timeout, or at once when the transport sees the dead peer's connection drop,
and the error names the rank that is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch.distributed as dist

from checkpoint.save import arrival
from planners.errors import CheckpointTimeoutError, DistributedCheckpointError

logger = logging.getLogger(__name__)

COORDINATOR = 0
# While a rank waits in an exchange over the process group, it logs a warning this often (seconds)
# naming the ranks that have not reached the exchange yet: a rank that never calls save() would
# otherwise leave the others silent until the group's timeout (30 minutes by default).
WAIT_WARNING_SECS = 60.0


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
    """Object collectives over a torch.distributed process group (default: the world).

    A collective whose peer died fails at once (gloo sees the connection
    drop) or after the group's timeout, with a transport error that does not
    say which rank is gone. So each rank also counts, in the job's store, the
    exchanges it has entered: a failed exchange becomes a
    `DistributedCheckpointError` naming the ranks that never reached it, or
    rank 0 when the store, which lives in rank 0's process unless a launcher
    hosts it, stops answering.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [
            dist.get_global_rank(group, r) if group is not None else r for r in range(self.world_size)
        ]
        self._store, self._prefix = _job_store(group)

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == COORDINATOR else None
        self._run(
            "gather", lambda: dist.gather_object(obj, out, dst=self._global[COORDINATOR], group=self.group)
        )
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        out: list[Any] = [None]
        mine = objs if self.rank == COORDINATOR else None
        self._run(
            "scatter",
            lambda: dist.scatter_object_list(out, mine, src=self._global[COORDINATOR], group=self.group),
        )
        return out[0]

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.rank == COORDINATOR else None]
        self._run(
            "broadcast",
            lambda: dist.broadcast_object_list(box, src=self._global[COORDINATOR], group=self.group),
        )
        return box[0]

    def meet(self) -> None:
        """Before a save's first exchange: wait in the store, not in a collective, for every rank (save/arrival.py)."""
        if self._store is not None:
            arrival.meet(
                self._store, self._prefix, rank=self.rank, ranks=self._global, warn_secs=WAIT_WARNING_SECS
            )

    def _run(self, op: str, collective: Callable[[], None]) -> None:
        step = self._arrive()
        try:
            with self._warn_while_waiting(op, step):
                collective()
        except RuntimeError as e:  # gloo and NCCL report a dead peer or a timeout as RuntimeError (DistError)
            text = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise DistributedCheckpointError(
                f"rank {self.rank}: the {op} exchange between ranks failed ({type(e).__name__}: {text}); "
                "a rank died, was killed or is stuck (checkpoint.verify() tells whether the save was committed)",
                self._absent_ranks(op, step) or {self.rank: f"{op} failed: {text}"},
            ) from e

    @contextlib.contextmanager
    def _warn_while_waiting(self, op: str, step: int | None) -> Iterator[None]:
        """Every `WAIT_WARNING_SECS` inside the collective, log which ranks have not reached it."""
        if step is None:  # no store to count arrivals in: nothing to name
            yield
            return
        done = threading.Event()
        start = time.monotonic()

        def watch() -> None:
            while not done.wait(WAIT_WARNING_SECS):
                absent = sorted(self._absent_ranks(op, step))
                if absent and not done.is_set():
                    logger.warning(
                        "rank %d: waiting %.0fs in the save's %s exchange for rank(s) %s, which have not "
                        "reached it yet (still writing, stuck, or not calling save() at all)",
                        self.rank,
                        time.monotonic() - start,
                        op,
                        ", ".join(map(str, absent)),
                    )

        thread = threading.Thread(target=watch, name=f"shardsafe-wait-r{self.rank}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()  # not joined: a store read in flight must not delay the save; the thread ends on its own

    def _arrive(self) -> int | None:
        """Count this rank into the next exchange; the count is how far the rank got."""
        if self._store is None:
            return None
        try:
            return int(self._store.add(f"{self._prefix}/{self._global[self.rank]}", 1))
        except Exception:  # the store only serves the diagnosis; the collective still decides
            logger.debug("could not record exchange arrival in the store", exc_info=True)
            return None

    def _absent_ranks(self, op: str, step: int | None) -> dict[int, str]:
        """The ranks that never reached exchange number `step`, by their counts in the store."""
        if self._store is None:
            return {}
        try:  # also when counting this rank in failed: a store that stopped answering says who died
            reached = {r: int(self._store.add(f"{self._prefix}/{g}", 0)) for r, g in enumerate(self._global)}
        except Exception:
            return {
                COORDINATOR: "unreachable: the job's store stopped answering, and it lives in rank 0's "
                "process unless a launcher hosts it, so rank 0 most likely died"
            }
        if step is None:
            return {}
        return {
            r: f"never reached this {op}: its process died, was killed or is stuck"
            for r, n in reached.items()
            if n < step
        }


def _job_store(group: dist.ProcessGroup | None) -> tuple[dist.Store | None, str]:
    """The default group's store (None where torch does not expose it) and this group's key prefix.

    Every rank calls a group's collectives in the same order, so counting
    them per (group, rank) gives numbers that agree across ranks.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        name = (group if group is not None else dist.group.WORLD).group_name
    except Exception:  # a private torch API: without it, errors just cannot name the dead rank
        return None, ""
    return store, f"shardsafe/exchange/{name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectedPayload:
    """What the coordinator of a `StoreExchange` gets in place of a value whose seal does not hold."""

    reason: str


SEAL_BYTES = 32  # an HMAC-SHA256 before each value in the commit store
MIN_SECRET_BYTES = 16

# Heartbeats of a rank in a store exchange: at most this far apart, and at least 4 per timeout.
MAX_HEARTBEAT_INTERVAL_SECS = 5.0


class StoreExchange:
    """Object exchange through a `torch.distributed.Store`, timing out on lack of progress.

    Keys are namespaced by `prefix` (one per save) and a call counter, so two
    saves never read each other's entries. The store has no authentication and
    any client may list its keys, so payloads are JSON (never unpickled) and
    sealed with an HMAC-SHA256 under `secret`, a random token of this save that
    travelled over the job's process group and is never stored: a value that a
    foreign client set (or moved from another key) fails the check. The
    coordinator gets such a value as `RejectedPayload`; another rank raises.

    A rank inside `heartbeat()` bumps its counter in the store every few
    seconds. A wait ends in `CheckpointTimeoutError` only when the ranks it
    waits for have sent no heartbeat for `timeout_secs`, so a rank that writes
    for an hour longer than the others does not fail a healthy save, while a
    rank that died or hangs without a heartbeat fails it after `timeout_secs`.
    """

    def __init__(
        self,
        store: dist.Store,
        *,
        rank: int,
        world_size: int,
        prefix: str,
        timeout_secs: float,
        secret: bytes,
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a store exchange needs a secret of at least {MIN_SECRET_BYTES} bytes")
        self.store = store
        self._secret = secret
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix
        self.timeout = timedelta(seconds=timeout_secs)
        self.interval_secs = min(MAX_HEARTBEAT_INTERVAL_SECS, timeout_secs / 4)
        self._calls = 0

    def _key(self, op: str, rank: int | str) -> str:
        return f"{self.prefix}/{self._calls}/{op}/{rank}"

    def _alive_key(self, rank: int) -> str:
        return f"{self.prefix}/alive/{rank}"

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Send heartbeats from a daemon thread while the body runs (this rank's write and commit)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.interval_secs):
                try:
                    self.store.add(self._alive_key(self.rank), 1)
                except Exception:  # the store is gone: the waits report it
                    logger.debug("heartbeat to the commit store failed", exc_info=True)
                    return

        self.store.add(self._alive_key(self.rank), 1)
        thread = threading.Thread(target=beat, name=f"shardsafe-heartbeat-r{self.rank}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _beats(self, ranks: list[int], what: str) -> list[int]:
        try:
            return [int(self.store.add(self._alive_key(r), 0)) for r in ranks]
        except Exception as e:
            raise CheckpointTimeoutError(
                f"{what}: the commit store stopped answering ({type(e).__name__}: {e}); it lives in rank 0's "
                "trainer, which most likely died"
            ) from e

    def _wait(self, keys: list[str], what: str) -> None:
        """Wait for `keys`; the deadline moves on whenever a rank that owes one of them sends a heartbeat."""
        last: list[int] | None = None
        idle_since = time.monotonic()
        while True:
            try:
                self.store.wait(keys, timedelta(seconds=self.interval_secs))
                return
            except Exception as e:  # the store raises a bare RuntimeError/DistStoreError on timeout
                error = e
            missing = [k for k in keys if not self.store.check([k])]
            if not missing:
                return
            owing = [
                int(k.rsplit("/", 1)[-1]) if k.rsplit("/", 1)[-1].isdigit() else COORDINATOR for k in missing
            ]
            beats = self._beats(owing if self.rank == COORDINATOR else [COORDINATOR], what)
            if beats != last:
                last, idle_since = beats, time.monotonic()
            elif time.monotonic() - idle_since >= self.timeout.total_seconds():
                ranks = ", ".join(k.rsplit("/", 1)[-1] for k in missing)
                raise CheckpointTimeoutError(
                    f"{what}: no progress for {self.timeout.total_seconds():.0f}s waiting for rank(s) {ranks} "
                    f"(no heartbeat: a rank or its writer process died or is stuck): {error}"
                ) from error

    def _put(self, key: str, obj: Any) -> None:
        payload = json.dumps(obj, separators=(",", ":")).encode()
        self.store.set(key, _seal(self._secret, key, payload) + payload)

    def _take(self, key: str) -> Any:
        """The JSON value at `key`, or `RejectedPayload` if its seal does not hold."""
        data = self.store.get(key)
        seal, payload = data[:SEAL_BYTES], data[SEAL_BYTES:]
        if len(data) < SEAL_BYTES or not hmac.compare_digest(seal, _seal(self._secret, key, payload)):
            logger.error("commit store key %s holds a value this save's ranks did not seal", key)
            return RejectedPayload(
                reason=f"the value at commit store key {key} is not sealed with this save's secret: "
                "a process outside the job set it (or it was corrupted), so it was not read"
            )
        try:
            return json.loads(payload)
        except ValueError as e:  # sealed but unreadable: a bug, not a forgery; still never trusted
            return RejectedPayload(reason=f"the value at commit store key {key} is not JSON: {e}")

    def gather(self, obj: Any) -> list[Any] | None:
        self._calls += 1
        self._put(self._key("gather", self.rank), obj)
        if self.rank != COORDINATOR:
            return None
        keys = [self._key("gather", r) for r in range(self.world_size)]
        self._wait(keys, "gathering write results")
        return [self._take(k) for k in keys]

    def scatter(self, objs: list[Any] | None) -> Any:
        self._calls += 1
        if self.rank == COORDINATOR:
            assert objs is not None
            for r, o in enumerate(objs):
                self._put(self._key("scatter", r), o)
        key = self._key("scatter", self.rank)
        self._wait([key], "waiting for the coordinator")
        value = self._take(key)
        if isinstance(value, RejectedPayload):
            raise DistributedCheckpointError(
                f"rank {self.rank}: the coordinator's answer could not be trusted",
                {COORDINATOR: value.reason},
            )
        if self.rank == COORDINATOR:
            self._await_readers()
        else:
            self.store.set(self._key("read", self.rank), b"")
        return value

    def _await_readers(self) -> None:
        """Return once every other rank has read what the coordinator scattered.

        The store lives in rank 0's trainer. Once rank 0's part of a save has ended, its trainer may
        exit and take the store along, and a rank still about to read the commit's outcome would
        report a committed save as failed. A rank that died meanwhile is waited for until the
        heartbeat timeout, then logged, never raised: what was scattered stands.
        """
        keys = [self._key("read", r) for r in range(self.world_size) if r != COORDINATOR]
        if not keys:
            return
        try:
            self._wait(keys, "waiting for every rank to read the coordinator's answer")
        except CheckpointTimeoutError as e:
            logger.warning("%s", e)

    def broadcast(self, obj: Any) -> Any:
        return self.scatter([obj] * self.world_size if self.rank == COORDINATOR else None)


def _seal(secret: bytes, key: str, payload: bytes) -> bytes:
    """HMAC-SHA256 of `payload` bound to its store key, so a sealed value cannot move to another key."""
    return hmac.digest(secret, key.encode() + b"\0" + payload, hashlib.sha256)
