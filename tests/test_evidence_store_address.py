"""Issue 22 case 5: the async commit store is reachable from ranks on other hosts.

torchrun's c10d rendezvous sets `MASTER_ADDR` to the host's name, which stock Debian/Ubuntu map to
127.0.1.1 in /etc/hosts: a store bound to what that name resolves to here listens on loopback alone,
and ranks on other hosts cannot connect. Tested without a second host or a network namespace: the
rule itself (`listen_rule`, pure), and a real store hosted under such a name, which must then accept
connections on addresses other than 127.0.1.1 (127.0.0.2, and every non-loopback IPv4 address of this
machine), as a peer host's connection would arrive. The name's mapping is the one thing simulated: a
test cannot edit /etc/hosts, so the module's `getaddrinfo` answers 127.0.1.1 for that one name.
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

from checkpoint.async_writer import commit_store
from checkpoint.async_writer.commit_store import host_commit_store, listen_rule
from checkpoint.save.collectives import SingleRankExchange
from checkpoint.types import RankInfo

SIOCGIFADDR = 0x8915
NAME = "node0.shardsafe-test"  # the host's own name, as torchrun's rendezvous sets MASTER_ADDR


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


def test_the_rule_listens_everywhere_for_a_name_that_only_resolves_to_loopback_here() -> None:
    assert listen_rule("node0.cluster", "127.0.1.1") == (None, "node0.cluster")
    assert listen_rule("node0", "::1") == (None, "node0")
    assert listen_rule("node0.cluster", "10.1.2.3") == ("10.1.2.3", "10.1.2.3")
    assert listen_rule("127.0.0.1", "127.0.0.1") == ("127.0.0.1", "127.0.0.1")  # loopback on purpose
    assert listen_rule("localhost", "127.0.0.1") == ("127.0.0.1", "127.0.0.1")
    assert listen_rule("::1", "::1") == ("::1", "::1")


class RankZeroOfTwo(SingleRankExchange):
    """The trainers' exchange as rank 0 of a two-rank job sees it for a broadcast: its own value."""

    world_size = 2


def test_a_store_under_the_hosts_own_name_is_reachable_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = socket.getaddrinfo

    def debian_hosts(host: str, *args: Any, **kwargs: Any) -> list:
        if host == NAME:  # /etc/hosts on Debian: "127.0.1.1 node0.shardsafe-test"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(commit_store.socket, "getaddrinfo", debian_hosts)
    monkeypatch.setenv("MASTER_ADDR", NAME)
    store, address = host_commit_store(RankInfo(0, 2), RankZeroOfTwo(), timeout_secs=30)
    assert store is not None and address == (NAME, store.port)  # the name, for each rank to resolve
    for peer in ("127.0.1.1", "127.0.0.2", *_other_ipv4_addresses()):
        assert _reaches(peer, store.port, store), f"the commit store is unreachable at {peer}:{store.port}"


def test_a_store_on_a_loopback_address_stays_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # a single-host job, said so
    store, address = host_commit_store(RankInfo(0, 2), RankZeroOfTwo(), timeout_secs=30)
    assert store is not None and address == ("127.0.0.1", store.port)
    assert _reaches("127.0.0.1", store.port, store)
    assert not _reaches("127.0.0.2", store.port, store, timeout_secs=1.0)  # bound to that one address
