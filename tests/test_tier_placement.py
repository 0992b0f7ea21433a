"""Ring placement of local-tier replicas and the recovery decision, as pure planning (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from checkpoint.tiers.tier_files import holdings_from_json
from planners.errors import InvalidCheckpointError
from planners.tier_placement import (
    MAX_LISTED_STEPS,
    StepHolding,
    commit_targets,
    effective_replicas,
    holder_order,
    rebuildable_steps,
    replica_nodes,
)


@given(st.integers(1, 64), st.integers(0, 8))
def test_replicas_go_to_other_nodes_and_spread_evenly(num_nodes: int, replicas: int) -> None:
    placed = {node: replica_nodes(node, num_nodes, replicas) for node in range(num_nodes)}
    count = min(replicas, num_nodes - 1)
    received = [0] * num_nodes
    for node, targets in placed.items():
        assert node not in targets and len(set(targets)) == len(targets) == count
        for t in targets:
            received[t] += 1
    assert received == [count] * num_nodes  # every node receives exactly as much as it sends


def test_ring_placement_examples_and_bad_arguments() -> None:
    assert replica_nodes(0, 2, 1) == (1,) and replica_nodes(1, 2, 1) == (0,)
    assert replica_nodes(3, 4, 2) == (0, 1)
    assert replica_nodes(0, 1, 1) == () and effective_replicas(3, 2) == 1
    with pytest.raises(ValueError, match="node 4 is not in a job of 4 nodes"):
        replica_nodes(4, 4, 1)
    assert holder_order(2, {0, 1, 2, 3}, 4) == [2, 3, 0, 1]
    # The coordinator's node 0 receives every file the ring does not place there (it checks their sizes).
    assert [commit_targets(n, 2, 1) for n in range(2)] == [(1,), (0,)]
    assert [commit_targets(n, 4, 1) for n in range(4)] == [(1,), (2, 0), (3, 0), (0,)]
    assert [commit_targets(n, 4, 2) for n in range(4)] == [(1, 2), (2, 3, 0), (3, 0), (0, 1)]


def _held(
    step: int, committed: bool, present: dict[str, int], required: dict[str, int] | None = None
) -> StepHolding:
    return StepHolding(step=step, committed=committed, required=required or {}, present=present)


def test_a_step_is_rebuildable_only_when_every_file_has_a_copy_of_the_right_size() -> None:
    required = {"metadata.json": 10, "a": 100, "b": 200}
    listings = {
        0: {
            7: _held(7, True, {"metadata.json": 10, "a": 100}, required),
            6: _held(6, True, {"metadata.json": 10, "a": 100, "b": 200}, required),
        },
        1: {7: _held(7, False, {"b": 200})},  # an uncommitted node's verified copies count
        2: {5: _held(5, False, {"a": 100, "b": 200})},  # never committed anywhere: never used
    }
    assert rebuildable_steps(listings) == [7, 6]
    listings[1][7] = _held(7, False, {"b": 199})  # a truncated copy is not a copy
    assert rebuildable_steps(listings) == [6]
    listings[1][6] = _held(
        6, True, {"metadata.json": 10}, {"metadata.json": 10, "a": 100}
    )  # metadata disagree
    assert rebuildable_steps(listings) == []


def test_a_peer_listing_is_bounded_and_validated_before_use() -> None:
    ok = [{"step": 7, "committed": True, "required": {"a": 1}, "present": {"a": 1}}]
    assert holdings_from_json(ok, where="node 1")[7].present == {"a": 1}
    too_many = [dict(ok[0], step=s) for s in range(MAX_LISTED_STEPS + 1)]
    with pytest.raises(
        InvalidCheckpointError, match=f"node 1: the step listing is not a list of at most {MAX_LISTED_STEPS}"
    ):
        holdings_from_json(too_many, where="node 1")
    with pytest.raises(InvalidCheckpointError, match="node 1: malformed step listing"):
        holdings_from_json([{"step": "x", "committed": True, "required": {}, "present": {}}], where="node 1")
    with pytest.raises(InvalidCheckpointError, match="node 1: malformed step listing"):
        holdings_from_json([dict(ok[0], present=["a"])], where="node 1")
