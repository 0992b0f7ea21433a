"""The store that the async writer processes commit through, outside the training job's process group.

Rank 0's trainer hosts a TCPStore (the trainer, not a writer process, so the
store outlives writer restarts); its address reaches every rank once, over the
trainers' exchange (the job's process group), when the async checkpointer is
built. Writer processes (and a trainer taking a dead writer's part) connect as
clients and run the commit's exchanges there, each wait bounded by the barrier
timeout, so the commit can never interleave with training collectives.

Keys live under one namespace per save (save ids are unique). Each process
deletes the keys it set for a save when its next save starts: by then every
rank has read them, because the trainers agree on the next plan (a collective
of the training job) only after each rank's previous save ended. The store's
size therefore stays flat over any number of saves.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist

from checkpoint.collectives import Exchange, StoreExchange
from checkpoint.save import PreparedSave
from checkpoint.types import RankInfo


def host_commit_store(
    rank_info: RankInfo, exchange: Exchange, *, timeout_secs: float
) -> tuple[dist.TCPStore | None, tuple[str, int] | None]:
    """Rank 0's trainer hosts the commit store; every rank learns its address through `exchange`.

    Collective (a broadcast over the trainers' exchange) when there is more than
    one rank. The host is `MASTER_ADDR` (as the job's own rendezvous uses) or this
    host's name; the port is a free one.

    Returns:
        The store on rank 0 (None elsewhere; keep it alive) and its `(host, port)`
        (None for a single rank, which commits without a store).
    """
    if rank_info.global_world_size == 1:
        return None, None
    store, address = None, None
    if rank_info.global_rank == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        timeout = timedelta(seconds=timeout_secs)
        store = dist.TCPStore(host, 0, None, True, timeout=timeout, wait_for_workers=False)
        address = (host, store.port)
    return store, exchange.broadcast(address)


def connect_commit_store(address: tuple[str, int], *, timeout_secs: float) -> dist.TCPStore:
    """A client of the commit store at `address`."""
    host, port = address
    return dist.TCPStore(
        host, port, None, False, timeout=timedelta(seconds=timeout_secs), wait_for_workers=False
    )


def commit_exchange(
    store: dist.Store | RecordingStore, prepared: PreparedSave, *, timeout_secs: float
) -> StoreExchange:
    """The exchange of one save's commit, in that save's own key namespace."""
    return StoreExchange(
        store,
        rank=prepared.rank,
        world_size=prepared.world_size,
        prefix=f"shardsafe/commit/{prepared.save_id}",
        timeout_secs=timeout_secs,
    )


class RecordingStore:
    """A store client that remembers the keys this process set, so it can delete them later."""

    def __init__(self, store: dist.Store) -> None:
        self.store = store
        self.keys: list[str] = []
        self._counted: set[str] = set()

    def set(self, key: str, value: bytes) -> None:
        self.keys.append(key)
        self.store.set(key, value)

    def add(self, key: str, amount: int) -> int:
        if amount and key not in self._counted:  # a counter this process bumps (a heartbeat)
            self._counted.add(key)
            self.keys.append(key)
        return self.store.add(key, amount)

    def get(self, key: str) -> bytes:
        return self.store.get(key)

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        self.store.wait(keys, timeout)

    def check(self, keys: list[str]) -> bool:
        return self.store.check(keys)

    def delete_own_keys(self) -> None:
        """Delete the keys set so far (call when every rank is known to have read them)."""
        for key in self.keys:
            self.store.delete_key(key)
        self.keys.clear()
        self._counted.clear()
