"""The store that the async writer processes commit through, outside the training job's process group.

Rank 0's trainer hosts a TCPStore (the trainer, not a writer process, so the
store outlives writer restarts); its address reaches every rank once, over the
trainers' exchange (the job's process group), when the async checkpointer is
built. Writer processes (and a trainer taking a dead writer's part) connect as
clients and run the commit's exchanges there, each wait bounded by the barrier
timeout, so the commit can never interleave with training collectives.

The store has no authentication: any process that reaches its port may set
or list keys, so each save's values are JSON sealed with that save's secret
(`checkpoint.save.collectives.StoreExchange`) and the commit checks the results
against the plan (`planners.commit_check`); where it listens is then a matter of
reach, not of integrity. The host is `MASTER_ADDR` (else the host name), as for
the job's rendezvous. Where it resolves here to a routable address, or is a
loopback address itself (`127.0.0.1`, `localhost`: a single-host job), the
store listens there only (torch binds a TCPStore server to every interface
whatever host it is given, but takes a socket already bound:
`master_listen_fd`). A *name* that resolves to loopback says nothing about where
the other ranks are: stock Debian/Ubuntu map the host's own name to 127.0.1.1,
and torchrun's c10d rendezvous sets `MASTER_ADDR` to that name on multi-node
jobs too. Then the store listens on every interface, as torch's own store does,
and advertises the name itself, which each rank resolves as it did for the
rendezvous (`listen_rule`).

Keys live under one namespace per save (save ids are unique). Each process
deletes the keys it set for a save when its next save starts: by then every
rank has read them, because the trainers agree on the next plan (a collective
of the training job) only after each rank's previous save ended. The store's
size therefore stays flat over any number of saves.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from datetime import timedelta

import torch.distributed as dist

from checkpoint.save.collectives import Exchange, StoreExchange
from checkpoint.save.protocol import PreparedSave
from checkpoint.types import RankInfo

logger = logging.getLogger(__name__)

# Pending connections the store's listening socket queues (one per writer process and stand-in trainer).
LISTEN_BACKLOG = 4096
# Names that say loopback on purpose (a single-host job), unlike a host name that resolves to it.
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def host_commit_store(
    rank_info: RankInfo, exchange: Exchange, *, timeout_secs: float
) -> tuple[dist.TCPStore | None, tuple[str, int] | None]:
    """Rank 0's trainer hosts the commit store; every rank learns its address through `exchange`.

    Collective (a broadcast over the trainers' exchange) when there is more than one rank.
    Where it listens: `listen_rule`.

    Returns:
        The store on rank 0 (None elsewhere; keep it alive) and its `(host, port)`
        (None for a single rank, which commits without a store).
    """
    if rank_info.global_world_size == 1:
        return None, None
    store, address = None, None
    if rank_info.global_rank == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        store, address = _listen(host, timedelta(seconds=timeout_secs))
    return store, exchange.broadcast(address)


def listen_rule(host: str, resolved: str) -> tuple[str | None, str]:
    """Where the store listens and the host it advertises, for `MASTER_ADDR=host` resolving here to `resolved`.

    Returns `(address to bind, advertised host)`; a bind address of None means every interface.
    A routable address is bound and advertised as resolved, and so is loopback named as such (a
    loopback address, or `localhost`). A name that only resolves to loopback here (127.0.1.1 for
    the host's own name on Debian) may be what ranks on other hosts resolve to this host's real
    address: the store listens everywhere and advertises the name.
    """
    if not ipaddress.ip_address(resolved.split("%", 1)[0]).is_loopback:
        return resolved, resolved
    try:
        named_loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        named_loopback = host.lower().rstrip(".") in LOOPBACK_NAMES
    return (resolved, resolved) if named_loopback else (None, host)


def _listen(host: str, timeout: timedelta) -> tuple[dist.TCPStore, tuple[str, int]]:
    """A store server listening as `listen_rule` says; the address clients connect to.

    Where the address cannot be bound here (a name that resolves elsewhere), torch's own listener,
    on every interface, is the fallback, with a warning.
    """
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        bind, advertised = listen_rule(host, str(sockaddr[0]))
        if bind is None:
            logger.info(
                "MASTER_ADDR %s resolves to loopback here; the commit store listens on every interface so "
                "that ranks on other hosts reach it",
                host,
            )
            # torch listens on every interface whatever host it is given; its own client connects there.
            store = dist.TCPStore(str(sockaddr[0]), 0, None, True, timeout=timeout, wait_for_workers=False)
            return store, (advertised, store.port)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
    except OSError as e:
        logger.warning(
            "cannot listen on %s (%s); the commit store listens on every interface instead", host, e
        )
        store = dist.TCPStore(host, 0, None, True, timeout=timeout, wait_for_workers=False)
        return store, (host, store.port)
    bound_host, port = sock.getsockname()[:2]
    # The store's listener takes the descriptor over (and closes it with the store).
    store = dist.TCPStore(
        bound_host, port, None, True, timeout=timeout, wait_for_workers=False, master_listen_fd=sock.detach()
    )
    return store, (bound_host, port)


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
        secret=bytes.fromhex(prepared.commit_secret),
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
