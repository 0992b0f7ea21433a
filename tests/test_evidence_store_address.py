"""Issue 22 case 5: the async commit store is reachable from ranks on other hosts.

torchrun's c10d rendezvous sets `MASTER_ADDR` to the host's name, which stock Debian/Ubuntu map to
127.0.1.1: a store bound to what that name resolves to here listens on loopback alone, and ranks on
other hosts cannot connect. Tested two ways, without a second host: the rule itself
(`listen_rule`, pure), and a real store hosted for a job whose ranks report another network
namespace, which must then accept connections on an address other than the one the name resolves
to (127.0.0.2, and every non-loopback IPv4 address of this machine), as a peer host's would.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from checkpoint.async_writer.commit_store import host_commit_store, listen_rule, network_namespace
from checkpoint.types import RankInfo

SIOCGIFADDR = 0x8915


class RanksIn:
    """The trainers' exchange seen from rank 0 of a two-rank job whose rank 1 is in namespace `other`."""

    rank = 0
    world_size = 2

    def __init__(self, other: str | None) -> None:
        self.other = other

    def gather(self, obj: Any) -> list[Any]:
        return [obj, obj if self.other is None else self.other]

    def broadcast(self, obj: Any) -> Any:
        return obj


def _other_ipv4_addresses() -> list[str]:
    """Every non-loopback IPv4 address of this machine's interfaces."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address on it
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not ipaddress.ip_address(address).is_loopback:
            found.append(address)
    return found


def _reaches(address: str, port: int, store: dist.TCPStore, timeout_secs: float = 10.0) -> bool:
    try:
        timeout = timedelta(seconds=timeout_secs)
        client = dist.TCPStore(address, port, None, False, timeout=timeout, wait_for_workers=False)
        client.set(f"from/{address}", b"hello")
    except Exception:
        return False
    return store.get(f"from/{address}") == b"hello"


def test_the_rule_keeps_loopback_only_when_every_rank_shares_it() -> None:
    assert listen_rule("node0.cluster", "127.0.1.1", ranks_share_loopback=False) == (None, "node0.cluster")
    assert listen_rule("node0.cluster", "127.0.1.1", ranks_share_loopback=True) == ("127.0.1.1", "127.0.1.1")
    assert listen_rule("node0.cluster", "10.1.2.3", ranks_share_loopback=False) == ("10.1.2.3", "10.1.2.3")
    assert listen_rule("node0", "::1", ranks_share_loopback=False) == (None, "node0")
    assert network_namespace() == network_namespace() is not None


def test_a_store_for_ranks_on_other_hosts_is_reachable_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what the host's name resolves to, as on Debian
    store, address = host_commit_store(RankInfo(0, 2), RanksIn("another-host/4026531840"), timeout_secs=30)
    assert store is not None and address == (
        "127.0.0.1",
        store.port,
    )  # the name as given, for peers to resolve
    for peer in ("127.0.0.2", *_other_ipv4_addresses()):
        assert _reaches(peer, store.port, store), f"the commit store is unreachable at {peer}:{store.port}"


def test_a_store_for_ranks_sharing_this_namespace_stays_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    store, address = host_commit_store(RankInfo(0, 2), RanksIn(None), timeout_secs=30)
    assert store is not None and address == ("127.0.0.1", store.port)
    assert _reaches("127.0.0.1", store.port, store)
    assert not _reaches(
        "127.0.0.2", store.port, store, timeout_secs=1.0
    )  # bound to the one address the ranks use
