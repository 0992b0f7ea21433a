"""Agreement of every rank on one small integer: the worst outcome of a load, a received signal.

Each agreement is one all-reduce (MAX) of a CPU tensor over a gloo group, so every rank leaves it with
the same answer and none moves on (or raises) while another still waits in a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from planners.errors import IncompleteCheckpointError, InvalidCheckpointError

# Outcomes of one rank's attempt at loading a step; the ranks act on the worst (largest).
LOADED, DAMAGED, FAILED = 0, 1, 2
# Errors that mean "this step cannot be loaded", as opposed to a target that does not fit it.
DAMAGE = (InvalidCheckpointError, IncompleteCheckpointError)


def max_over_ranks(value: int, group: dist.ProcessGroup | None) -> int:
    """The largest `value` any rank passed; collective over `group` (None: this rank's own)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())
