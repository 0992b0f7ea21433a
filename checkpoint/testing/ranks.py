"""Run a function on N real ``torch.distributed`` ranks, one process each: the tests' and benchmarks' launcher.

Checkpoint code is only trustworthy when every rank runs in its own process and the collectives (gather plans,
scatter, barrier) really cross process boundaries, so tests and benchmarks go through :func:`run_ranks` instead of
faking ``dist.get_rank``. Each rank is a ``forkserver`` child (forked from a clean server process that has only
imported torch and this package: no process group, no threads, no device state) that joins a fresh process group
through a store the parent hosts on a free loopback port (gloo on CPU; gloo beside NCCL when every rank has a GPU of its own, see
:func:`backend_for`), runs ``fn(rank, world_size, *args)`` and sends back its pickled return value or its
traceback on a pipe of its own. The parent waits on those pipes and on the process sentinels, never on a sleep, so a rank that
raises, dies without a word (``os._exit``, SIGKILL, segfault) or hangs is reported with its rank number, and every
failing rank's traceback ends up in one :class:`RankFailures`.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Once one rank has failed, its peers usually fail within milliseconds (gloo sees the closed connection), so wait
# this long for their own errors before killing them; longer only delays the report of a broken test.
FAILURE_GRACE_SECS = 5.0


# Imported once by the forkserver, so that each rank forks with them loaded instead of importing torch anew
# (seconds per rank on a small machine, most of a short multi-rank test). Nothing here starts a thread or
# touches a device at import, so forking after it is safe.
_PRELOAD = ("torch", "torch.distributed", "checkpoint")


class RankFailures(RuntimeError):
    """Ranks raised, died without reporting, or were killed; ``failures`` maps rank to traceback or what was seen."""

    def __init__(self, failures: Mapping[int, str], *, what: str = "rank(s) failed") -> None:
        self.failures = dict(sorted(failures.items()))
        parts = [f"--- rank {rank} ---\n{text.rstrip()}" for rank, text in self.failures.items()]
        super().__init__(f"{what}: ranks {sorted(self.failures)}\n" + "\n".join(parts))


class RankTimeout(RankFailures, TimeoutError):
    """The ranks did not all finish within ``timeout_secs``; the ones still running were killed."""


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(device: str, world_size: int) -> str:
    """The process-group backend for ``device``: gloo always, NCCL beside it when each rank has a GPU of its own.

    Gloo stays for CPU collectives (DCP's async save and shardsafe's plan exchange need a CPU backend); NCCL refuses
    two ranks on one device, so it joins only when there are at least ``world_size`` GPUs.
    """
    if device == "cuda" and torch.cuda.device_count() >= world_size:
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@dataclass(frozen=True, slots=True, kw_only=True)
class _RankSetup:
    """What every rank needs besides its rank number: the rendezvous and the launcher's options."""

    world_size: int
    port: int
    env: Mapping[str, str]
    """The parent's whole environment when `run_ranks` was called, plus the caller's `env` on top."""
    cwd: str
    timeout_secs: float
    device: str
    share_cores: bool

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")


def _rank_main(
    fn: Callable[..., Any], rank: int, setup: _RankSetup, args: tuple[Any, ...], conn: Connection
) -> None:
    _enter_rank_environment(rank, setup)
    try:
        _join_group(rank, setup)
        try:
            result = fn(rank, setup.world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle, not torch's ForkingPickler: that one moves tensors to shared memory whose file descriptors
        # vanish when this process exits. Pickling here also turns an unpicklable result into a reported failure.
        message = pickle.dumps((True, result))
    except Exception:
        message = pickle.dumps((False, traceback.format_exc()))
    conn.send_bytes(message)
    conn.close()


def _enter_rank_environment(rank: int, setup: _RankSetup) -> None:
    """The caller's environment and directory (a forkserver child starts with the server's), plus torchrun's rank variables."""
    os.environ.clear()
    os.environ.update(setup.env)
    os.chdir(setup.cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(setup.port),
        RANK=str(rank),
        WORLD_SIZE=str(setup.world_size),
        LOCAL_RANK=str(rank),
    )


def _join_group(rank: int, setup: _RankSetup) -> None:
    """Set the rank's threads and device, join the process group through the parent's store, and meet every peer."""
    world_size = setup.world_size
    if setup.share_cores:  # as torchrun does: share the cores between the ranks instead of oversubscribing
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if setup.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    # A collective waiting on a dead peer must not outlive the parent's own deadline.
    timeout = datetime.timedelta(seconds=setup.timeout_secs)
    store = dist.TCPStore("127.0.0.1", setup.port, world_size, False, timeout=timeout)
    dist.init_process_group(
        backend_for(setup.device, world_size), store=store, rank=rank, world_size=world_size, timeout=timeout
    )
    # Every rank holds its connections before any rank can run `fn` to its end and close them: without
    # this, a rank whose `fn` returns at once tears its side down while a peer is still connecting.
    dist.barrier()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_secs: float = 120.0,
    env: Mapping[str, str] | None = None,
    device: str = "cpu",
    share_cores: bool = False,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` ranks and returns their results, by rank.

    Args:
        fn: a module-level (picklable) function; its return value must be picklable too.
        world_size: number of ranks (processes) to start.
        *args: extra picklable arguments passed to ``fn`` on every rank.
        timeout_secs: deadline for the whole run, start-up included; also the process group's collective timeout.
        env: extra environment variables set in every rank before the process group is created.
        device: ``"cpu"``, or ``"cuda"``: rank r takes GPU ``r % device_count`` (backend: :func:`backend_for`).
        share_cores: give each rank ``cpu_count // world_size`` torch threads, as torchrun does (benchmarks).

    Raises:
        RankFailures: a rank raised (its traceback is included) or exited without reporting (its exit code is).
        RankTimeout: ranks were still running after ``timeout_secs``; they are killed and named.

    Example: ``run_ranks(_sum_of_ranks, 3) == [3, 3, 3]`` where ``_sum_of_ranks`` all-reduces ``[rank]``.
    """
    # The parent hosts the job's store, as torchrun's agent does: a rank that exits first (rank 0 included)
    # never takes the store away from peers still using it.
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    setup = _RankSetup(
        world_size=world_size,
        port=store.port,
        env={**os.environ, **(env or {})},
        cwd=os.getcwd(),
        timeout_secs=timeout_secs,
        device=device,
        share_cores=share_cores,
    )
    return _run(fn, args, setup, store)


def _run(fn: Callable[..., Any], args: tuple[Any, ...], setup: _RankSetup, store: dist.Store) -> list[Any]:
    """Starts the ranks, collects their reports, and always reaps every process and pipe (`store` lives until then)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))  # only the first call, which starts the server, uses it
    deadline = time.monotonic() + setup.timeout_secs
    procs: list[BaseProcess] = []
    readers: list[Connection] = []
    try:
        _spawn(ctx, fn, setup, args, procs, readers)
        results, failures, timed_out = _collect(procs, readers, deadline)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for reader in readers:
            reader.close()
    if timed_out:
        raise RankTimeout(failures, what=f"ranks did not finish within {setup.timeout_secs} s")
    if failures:
        raise RankFailures(failures)
    return [results[rank] for rank in range(setup.world_size)]


def _spawn(
    ctx: Any,
    fn: Callable[..., Any],
    setup: _RankSetup,
    args: tuple[Any, ...],
    procs: list[BaseProcess],
    readers: list[Connection],
) -> None:
    """Starts one process per rank; appends each to `procs` and its result pipe to `readers` (for cleanup)."""
    for rank in range(setup.world_size):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_rank_main, args=(fn, rank, setup, args, writer), name=f"rank{rank}")
        proc.start()
        writer.close()  # the child holds the only write end, so its death shows up as EOF here
        procs.append(proc)
        readers.append(reader)


def _collect(
    procs: list[BaseProcess], readers: list[Connection], deadline: float
) -> tuple[dict[int, Any], dict[int, str], bool]:
    """Waits for every rank's report or death, then kills the ranks still running.

    Returns ``(results, failures, timed_out)``; ``timed_out`` is set only when no rank had failed by itself.
    """
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    pending = set(range(len(procs)))
    while pending and (remaining := deadline - time.monotonic()) > 0:
        wait([readers[r] for r in pending] + [procs[r].sentinel for r in pending], timeout=remaining)
        for rank in sorted(pending):
            report = _read_report(procs[rank], readers[rank])
            if report is None:
                continue
            pending.discard(rank)
            ok, payload = report
            if ok:
                results[rank] = payload
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + FAILURE_GRACE_SECS)
    timed_out = bool(pending) and not failures
    why = (
        "at the deadline"
        if timed_out
        else f"{FAILURE_GRACE_SECS} s after rank {next(iter(failures), -1)} failed"
    )
    for rank in pending:
        procs[rank].kill()
        failures[rank] = f"still running {why}; killed with SIGKILL"
    return results, failures, timed_out


def _read_report(proc: BaseProcess, reader: Connection) -> tuple[bool, Any] | None:
    """Returns ``(ok, result or error text)`` once the rank has reported or died, else None."""
    # Read the exit state before polling: a rank that sent and then exited has its report in the pipe already.
    exited = proc.exitcode is not None
    if reader.poll():
        try:
            return pickle.loads(reader.recv_bytes())
        except (EOFError, OSError):
            proc.join(timeout=1.0)  # the pipe closes as the process exits; the exit code follows at once
    elif not exited:
        return None
    code = proc.exitcode
    if code is not None and code < 0:
        return (
            False,
            f"died from signal {signal.Signals(-code).name} (exit code {code}) without reporting a result",
        )
    return False, f"exited with code {code} without reporting a result"
