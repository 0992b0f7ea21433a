"""Telling ranks that hold different keys apart, in words a user can act on.

Both planners compare key sets between ranks: the per-chunk planner
(`planners.save_plan`, given every rank's local plan) and the structure
planner (`planners.world_check`, given one representative rank per distinct
structure). They report a mismatch the same way, from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from planners.errors import InvalidStateDictError

# Keys named in one error message; the rest are counted.
MAX_KEYS_SHOWN = 10


def describe_keys(keys: set[str]) -> str:
    """The first keys in sorted order, quoted, and how many more there are."""
    shown = sorted(keys)[:MAX_KEYS_SHOWN]
    more = len(keys) - len(shown)
    return ", ".join(repr(k) for k in shown) + (f" and {more} more" if more > 0 else "")


def check_same_keys(ranks: Sequence[tuple[int, set[str]]]) -> None:
    """Raise `InvalidStateDictError` naming each rank whose keys differ from the first rank's, and how.

    `ranks` holds (rank, keys) pairs; the first pair is the reference.
    """
    ref_rank, reference = ranks[0]
    problems = []
    for rank, mine in ranks[1:]:
        if mine == reference:
            continue
        parts = []
        if mine - reference:
            parts.append(f"has keys rank {ref_rank} lacks: {describe_keys(mine - reference)}")
        if reference - mine:
            parts.append(f"lacks keys rank {ref_rank} has: {describe_keys(reference - mine)}")
        problems.append(f"rank {rank} " + "; ".join(parts))
    if problems:
        raise InvalidStateDictError("state dict keys differ between ranks: " + " | ".join(problems))
