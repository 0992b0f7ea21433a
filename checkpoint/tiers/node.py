"""Where a rank runs in a job of nodes: torchrun's layout, the node's address, and node-wide helpers.

- `node_env` / `NodeLayout`: the node (torchrun's GROUP_RANK), the rank on it, every node's server.
- `node_address`: the address a node's tier server listens on and peers use. By default the address
  of the interface that routes to the job's master (`MASTER_ADDR`), found with a UDP "connect" (no
  packet is sent), never the host name's address, which stock Debian/Ubuntu map to 127.0.1.1; a
  loopback address is refused when the master is on another host.
- `estimate_node_bytes`: what a local save needs on one node.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from checkpoint.state.flatten import RankLocal
from planners.errors import CheckpointError

# Where a node's server listens when `local_address` does not say (before the routing rule below).
ADDRESS_ENV = "SHARDSAFE_NODE_ADDR"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeLayout:
    """Where this rank runs: its node (torchrun's GROUP_RANK), rank on the node, and every node's server."""

    rank: int
    node: int
    local_rank: int
    local_world_size: int
    servers: Mapping[int, str]

    @property
    def num_nodes(self) -> int:
        return len(self.servers)


def node_address(address: str | None, master: str | None = None) -> str:
    """The address this node's server listens on: `address`, `$SHARDSAFE_NODE_ADDR`, else the routing rule.

    Raises:
        CheckpointError: the address found is loopback while the job's master is on another host, so
            peers on other hosts could not reach this node; the message says how to set it.
    """
    chosen = address or os.environ.get(ADDRESS_ENV)
    if chosen:
        return chosen
    master = master if master is not None else os.environ.get("MASTER_ADDR")
    if not master:
        return "127.0.0.1"  # one process, no job: nothing else needs to reach it
    found = route_to(master)
    refusal = loopback_refusal(found, master, _resolve(master))
    if refusal is not None:
        raise refusal
    return found


def loopback_refusal(found: str, master: str, master_address: str) -> CheckpointError | None:
    """The error for a loopback `found` address when the master (`master_address`) is not loopback."""
    if not _loopback(found) or _loopback(master_address):
        return None
    return CheckpointError(
        f"local tier: this node's address towards the job's master {master} is loopback ({found}); "
        f"peers on other hosts could not reach it; pass local_address= or set {ADDRESS_ENV}"
    )


def route_to(host: str) -> str:
    """The local address of the interface that routes to `host` (a UDP connect sends nothing)."""
    target = _resolve(host)
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((target, 9))
        return str(s.getsockname()[0])


def _resolve(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)[0][4][0]
    except OSError:
        return host


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def node_env() -> tuple[int, int, int]:
    """(node, local rank, ranks on this node) from torchrun's variables; one node without them."""
    if "GROUP_RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return (
            int(os.environ["GROUP_RANK"]),
            int(os.environ["LOCAL_RANK"]),
            int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
    if dist.is_available() and dist.is_initialized():
        return 0, dist.get_rank(), dist.get_world_size()
    return 0, 0, 1


def shared(value: Any, group: dist.ProcessGroup | None) -> Any:
    """Rank 0's `value` on every rank."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_gather(value: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if group is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def estimate_node_bytes(state: Any, local_world_size: int, replicas: int) -> int:
    """Bytes a local save needs on this node: this rank's tensors, times its node's ranks and copies."""
    return _tensor_bytes(state) * local_world_size * (1 + replicas)


def _tensor_bytes(value: Any, depth: int = 0) -> int:
    if depth > 64:
        return 0
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, depth + 1) for v in value)
    if isinstance(value, RankLocal):
        return _tensor_bytes(value.value, depth + 1)
    if callable(getattr(value, "state_dict", None)):
        return _tensor_bytes(value.state_dict(), depth + 1)
    return 0
