"""Where a node-local step's replicas go, and which steps a job can rebuild from its nodes (pure).

A node is a torchrun agent (`GROUP_RANK`), numbered 0..n-1. Each node's shard
files are copied to `replicas` other nodes: its ring successors `node + 1 ...
node + replicas` (mod n). Every node then sends and receives exactly `replicas`
nodes' worth of files, so the load is spread evenly, and a node never holds
its own replica. Gemini (SOSP'23) shows group placement is optimal when
replicas + 1 divides n; the ring is within one node of it and needs no
divisibility, which is why it is used for every `replicas`. A step survives
the loss of any `replicas` nodes at once, not more (two adjacent nodes lost
with `replicas=1` lose the files the first of them wrote).

`rebuildable_steps` is the recovery decision: given what each node of the new
job holds, the steps whose every file has a copy somewhere, newest first.
Nothing here touches a file, a socket or a process group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# A listing claiming more than this many steps or files per step is hostile, not a checkpoint tier.
MAX_LISTED_STEPS = 10_000
MAX_LISTED_FILES = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class StepHolding:
    """What one node holds of one step of its local tier.

    Attributes:
        step: the training step.
        committed: the node holds the step's metadata (the commit marker, written last).
        required: every file the metadata lists, with its size in bytes (empty when not committed).
        present: the files the node holds (shard files and metadata), with their sizes in bytes.
    """

    step: int
    committed: bool
    required: Mapping[str, int]
    present: Mapping[str, int]


def effective_replicas(replicas: int, num_nodes: int) -> int:
    """How many replicas a job of `num_nodes` nodes can place: never more than the other nodes."""
    if replicas < 0 or num_nodes < 1:
        raise ValueError(f"replicas must be >= 0 and num_nodes >= 1, got {replicas} and {num_nodes}")
    return min(replicas, num_nodes - 1)


def replica_nodes(node: int, num_nodes: int, replicas: int) -> tuple[int, ...]:
    """The nodes that receive copies of `node`'s files: its `replicas` ring successors."""
    if not 0 <= node < num_nodes:
        raise ValueError(f"node {node} is not in a job of {num_nodes} nodes")
    count = effective_replicas(replicas, num_nodes)
    return tuple((node + k) % num_nodes for k in range(1, count + 1))


def commit_targets(node: int, num_nodes: int, replicas: int) -> tuple[int, ...]:
    """The nodes a node's files go to: its ring replicas, plus node 0 when the ring does not reach it.

    The save protocol's coordinator (rank 0, on node 0) checks the stored size of every file before
    it commits, on its own node's disk; so node 0 must hold a copy of every file. With two nodes (or
    `replicas >= nodes - 1`) the ring already puts one there; with more nodes node 0 holds an extra
    copy of every file (more disk on node 0, one more copy of each file for recovery).
    """
    targets = replica_nodes(node, num_nodes, replicas)
    return targets if node == 0 or 0 in targets else (*targets, 0)


def holder_order(own_node: int, holders: set[int] | frozenset[int], num_nodes: int) -> list[int]:
    """The holders of a file, nearest first: this node, then the others in ring order from it."""
    return sorted(holders, key=lambda n: (n - own_node) % max(num_nodes, 1))


def rebuildable_steps(listings: Mapping[int, Mapping[int, StepHolding]]) -> list[int]:
    """Steps whose every required file has a copy of the right size on some node, newest first.

    A step counts only where some node committed it (holds its metadata); the required files are
    the committed nodes' metadata's (they must agree), and an uncommitted node's copies count too,
    since a copy is only ever made visible after its checksums were verified on receipt.
    """
    steps: set[int] = set()
    for held in listings.values():
        steps |= {s for s, h in held.items() if h.committed}
    out = []
    for step in sorted(steps, reverse=True):
        required = _agreed_required(step, listings)
        if required is not None and all(
            holders_of(step, name, size, listings) for name, size in required.items()
        ):
            out.append(step)
    return out


def holders_of(
    step: int, name: str, nbytes: int, listings: Mapping[int, Mapping[int, StepHolding]]
) -> set[int]:
    """The nodes holding file `name` of `step` with exactly `nbytes` bytes."""
    return {
        node for node, held in listings.items() if step in held and held[step].present.get(name) == nbytes
    }


def _agreed_required(
    step: int, listings: Mapping[int, Mapping[int, StepHolding]]
) -> Mapping[int, int] | None:
    found = [held[step].required for held in listings.values() if step in held and held[step].committed]
    first = found[0]
    return first if all(dict(r) == dict(first) for r in found[1:]) else None
