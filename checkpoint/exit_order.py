"""Interpreter exit without an abort: torch's gloo worker threads finish their last work before finalization.

Why this exists (issue 18): a job's rank sometimes died at exit with
"terminate called without an active exception" (SIGABRT), after its work was
done. The core dump shows the cause, which is in torch and Python, not in
shardsafe's own threads:

1. A gloo process group runs each collective on a worker thread
   (`pt_gloo_runloop`). The worker marks the work complete, the caller's
   `wait()` returns, and only then does the worker drop its reference to the
   work, and with it the last references to the work's tensors.
2. Tensors made in Python keep their Python object alive from C++; freeing
   them on the worker takes the GIL (`TensorImpl::decref_pyobject`).
3. If the main thread has meanwhile reached interpreter finalization, Python
   ends any thread that asks for the GIL with `pthread_exit`. That unwinds
   through the work's destructor, which is `noexcept`, so the C++ runtime
   calls `std::terminate`.

A worker is late only when the OS has not scheduled it between the end of
the collective and the end of the program, so the abort is rare and comes
more often on a busy machine (and when finalization takes longer, e.g. with
more modules imported). `destroy_process_group()` does not stop the workers:
after it, and after a `gc.collect()` at exit, the worker threads still run
(something inside torch still holds the group), so they cannot be joined.

The fix is an exit handler, installed when `checkpoint` is imported: it runs
while the interpreter is still whole and, with the GIL released, waits until
every gloo worker thread of the process sleeps, so a late worker frees its
last work then instead of during finalization. It needs Linux's
`/proc/self/task` to see the threads; elsewhere it does nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import time

logger = logging.getLogger(__name__)

# The name torch gives the worker threads of a gloo process group.
GLOO_WORKER_THREAD = "pt_gloo_runloop"
# How long one wait lasts (the GIL is released meanwhile, so a worker that
# asked for it gets it), and how many waits in a row must find every worker
# asleep: a worker that still held a work would have run during them.
POLL_SECS = 0.002
IDLE_POLLS_NEEDED = 3
# An upper bound on the time the exit handler adds to the process's exit.
MAX_WAIT_SECS = 2.0

_TASKS = "/proc/self/task"
_installed = False


def thread_states(name: str) -> list[str]:
    """The scheduler state letter (R running or runnable, S sleeping...) of each thread called `name`."""
    states = []
    try:
        tids = os.listdir(_TASKS)
    except OSError:  # not Linux, or /proc is not mounted
        return []
    for tid in tids:
        try:
            with open(f"{_TASKS}/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        comm_start, comm_end = stat.find("("), stat.rfind(")")
        if stat[comm_start + 1 : comm_end] == name:
            states.append(stat[comm_end + 2 : comm_end + 3])
    return states


def wait_for_idle_gloo_workers(max_wait_secs: float = MAX_WAIT_SECS) -> bool:
    """Wait, without the GIL, until every gloo worker thread of this process has been asleep for a while.

    Returns:
        True when the workers are idle (or there are none), False when `max_wait_secs` passed first.
    """
    deadline = time.monotonic() + max_wait_secs
    idle_polls = 0
    while idle_polls < IDLE_POLLS_NEEDED:
        states = thread_states(GLOO_WORKER_THREAD)
        if not states:
            return True
        idle_polls = idle_polls + 1 if all(s == "S" for s in states) else 0
        if time.monotonic() > deadline:
            logger.debug("gloo worker threads still busy at exit after %.1f s: %s", max_wait_secs, states)
            return False
        time.sleep(POLL_SECS)
    return True


def install_exit_handler() -> None:
    """Register `wait_for_idle_gloo_workers` to run at interpreter exit (once per process)."""
    global _installed
    if not _installed:
        atexit.register(wait_for_idle_gloo_workers)
        _installed = True
