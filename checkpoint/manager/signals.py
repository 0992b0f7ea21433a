"""Preemption notices for `CheckpointManager`: a signal sets a flag; `save()` acts on it.

Schedulers (torchrun, Slurm, Kubernetes) send SIGTERM some seconds before they
kill a job. The handler only sets a flag: a signal handler runs between two
bytecodes of whatever the main thread was doing (possibly inside a collective
or a save), so it must not save, log or talk to other ranks itself.

The ranks must agree: the signal may reach one rank and not another, or reach
them on either side of a step boundary. At each agreement point every rank
contributes its flag to an all-reduce (MAX) over a gloo process group, so all
of them save at the same step. The all-reduce costs a round trip per check,
so the manager runs it every `preemption_check_steps` steps (every step by
default; measured in the README); a single-rank job needs no agreement.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import torch.distributed as dist

from checkpoint.run.agreement import max_over_ranks


class PreemptionNotice:
    """The flag the handlers set, and the collective agreement on it.

    `group` is where the ranks agree (see `agreement_group`; None for one rank). `close()`
    puts back the handlers that were installed before.
    """

    def __init__(self, signals: Sequence[int], group: dist.ProcessGroup | None) -> None:
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        if signals and threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "save_on_signals needs the CheckpointManager to be created in the main thread "
                "(Python delivers signals only there); pass save_on_signals=() otherwise"
            )
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._group = group

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._flag.set()

    @property
    def received(self) -> bool:
        """Whether this rank got a signal (no collective)."""
        return self._flag.is_set()

    def agree(self) -> bool:
        """Whether any rank got a signal; collective when distributed (every rank calls it)."""
        if self._group is None or not self._previous:  # one rank, or no handler: nothing to agree on
            return self._flag.is_set()
        if max_over_ranks(int(self._flag.is_set()), self._group):
            self._flag.set()  # ranks that got no signal remember the agreement too
            return True
        return False

    def clear(self) -> None:
        self._flag.clear()

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def agreement_group() -> dist.ProcessGroup | None:
    """A group that all-reduces a CPU tensor (None for a single rank).

    The default group when it has gloo, else a new gloo group (an NCCL group cannot reduce a CPU
    tensor, and a CUDA one would cost a device sync per check).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if "gloo" in str(dist.get_backend()):
        return dist.group.WORLD
    return dist.new_group(backend="gloo")  # collective: every rank builds the manager at the same point


__all__ = ["PreemptionNotice", "agreement_group", "max_over_ranks"]
