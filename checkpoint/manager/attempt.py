"""One attempt at loading a step on every rank, and the verdict all ranks agree on.

The manager's resume walks steps from the newest down. Each attempt ends on every rank with the
same verdict, the worst any rank saw, so no rank moves on to an older step (or raises) while
another still waits in the load's collectives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from checkpoint.checkpointer import Checkpointer
from checkpoint.run.agreement import DAMAGE, DAMAGED, FAILED, LOADED, max_over_ranks
from checkpoint.types import STATE_DICT

__all__ = ["DAMAGE", "DAMAGED", "FAILED", "LOADED", "Attempt", "attempt_load"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """The agreed outcome of one load (`worst`), this rank's own error, and how long it took."""

    worst: int
    error: BaseException | None
    seconds: float


def attempt_load(
    ckpt: Checkpointer, path: str, state: STATE_DICT, strict: bool, group: dist.ProcessGroup | None
) -> Attempt:
    """Load `path` into `state` on this rank, then agree with the others on the worst outcome."""
    error: BaseException | None = None
    outcome = LOADED
    start = time.perf_counter()
    try:
        ckpt.load(path, state, strict=strict)
    except DAMAGE as e:
        error, outcome = e, DAMAGED
    except Exception as e:  # every rank must learn of it before any raises, or the others hang
        error, outcome = e, FAILED
    worst: Any = max_over_ranks(outcome, group)
    return Attempt(worst=worst, error=error, seconds=time.perf_counter() - start)
