"""What the coordinator learns from the ranks that hold different things: their nesting and their replicas' values.

Two pure steps of the plan exchange (`checkpoint.save.plan_exchange`), fed
by one representative rank per distinct structure:

- `union_tree`: the metadata's `structure` (the nesting a load without a
  target rebuilds, and what `inspect`, `diff`, `export-hf` and the DCP
  reader list) must be every rank's, not the coordinator's alone: a pipeline
  checkpoint otherwise lists only the layers of rank 0's stage.
- `value_senders`: values (non-tensor leaves) are written from the
  coordinator's state dict; a value a pipeline stage holds and rank 0 does
  not (torchtitan flattens each optimizer's `param_groups` per parameter)
  travels to it in every save's first exchange, from the lowest rank that
  holds it.
- `replica_mismatches`: a plain tensor is taken as replicated and written
  once; when ranks hold different values under one key (a sample counter,
  an RNG state, an unseeded module) all but one rank's value would be lost
  without a word. Ranks send a digest of each small plain tensor
  (`MAX_COMPARED_BYTES`), and keys whose digests differ are reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from planners.global_plan import WorldStructure
from planners.values import JSON

# Plain tensors up to this many bytes are compared across ranks when a save plans (counters, RNG
# states, norms and biases); larger ones are taken as replicated unchecked, since hashing them on
# every rank costs time (and a device-to-host copy) that a check of the mistake does not need.
MAX_COMPARED_BYTES = 64 * 1024
# At most this many bytes of plain tensors are hashed per rank and plan (the first keys in order).
MAX_COMPARED_TOTAL_BYTES = 16 * 1024 * 1024
# Keys named in one warning; the rest are counted.
MAX_KEYS_NAMED = 5


def union_tree(trees: Sequence[JSON]) -> JSON:
    """The union of nesting trees (`checkpoint.state.flatten` records them): dicts merge by key.

    A dict key present in several trees is merged recursively; keys new to the first tree follow its
    own, in the order the trees give them. Lists and tuples of one length merge element-wise; on any
    other disagreement (a leaf against a container) the earlier tree wins, since the plan exchange
    has already refused keys held as different kinds.
    """
    out = trees[0]
    for tree in trees[1:]:
        out = _merge(out, tree)
    return out


def _merge(a: JSON, b: JSON) -> JSON:
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
        return a
    ((kind_a, body_a),) = a.items()
    ((kind_b, body_b),) = b.items()
    if kind_a != kind_b:
        return a
    if kind_a == "dict":
        merged = {k: v for k, v in body_a}
        order = [k for k, _ in body_a]
        for k, v in body_b:
            if k in merged:
                merged[k] = _merge(merged[k], v)
            else:
                merged[k] = v
                order.append(k)
        return {"dict": [[k, merged[k]] for k in order]}
    if kind_a in ("list", "tuple") and len(body_a) == len(body_b):
        return {kind_a: [_merge(x, y) for x, y in zip(body_a, body_b)]}
    return a


def replica_mismatches(reports: Sequence[tuple[int, Mapping[str, str]]]) -> list[str]:
    """Warnings for plain tensor keys whose value digests differ between ranks.

    Args:
        reports: (rank, {key: digest}) of ranks whose digests may differ from others'.

    Returns:
        One message naming up to `MAX_KEYS_NAMED` keys and two ranks each, or none.
    """
    first: dict[str, tuple[int, str]] = {}
    differ: dict[str, tuple[int, int]] = {}
    for rank, digests in sorted(reports, key=lambda r: r[0]):
        for key, d in digests.items():
            seen = first.setdefault(key, (rank, d))
            if seen[1] != d and key not in differ:
                differ[key] = (seen[0], rank)
    if not differ:
        return []
    keys = sorted(differ)
    named = "; ".join(f"{k!r} (rank {differ[k][0]} and rank {differ[k][1]})" for k in keys[:MAX_KEYS_NAMED])
    more = f" and {len(keys) - MAX_KEYS_NAMED} more" if len(keys) > MAX_KEYS_NAMED else ""
    return [
        f"plain tensors differ between ranks: {named}{more}. A plain tensor is taken as replicated and "
        "saved once, so only one rank's value is kept; wrap per-rank state in "
        "checkpoint.RankLocal(...) to keep each rank's own value, or make the ranks agree (seed the module)"
    ]


def value_senders(world: WorldStructure) -> dict[int, tuple[str, ...]]:
    """rank -> the value keys it sends the coordinator on every save: keys the coordinator's structure
    lacks, each sent by the lowest rank whose structure holds it (structures are ordered by their lowest
    rank, so that is the representative of the first structure holding it)."""
    coordinator = world.rank_structure[0]
    seen = set(world.structures[coordinator].other_keys)
    out: dict[int, tuple[str, ...]] = {}
    for i, s in enumerate(world.structures):
        if i == coordinator:
            continue
        mine = tuple(k for k in s.other_keys if k not in seen)
        if mine:
            out[world.representative(i)] = mine
            seen.update(mine)
    return out
