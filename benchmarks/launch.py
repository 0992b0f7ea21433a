"""Spawning the benchmark's ranks: one process per rank, real collectives.

Both systems run inside the same rank processes, so they share the
interpreter, the process group and the machine's noise. Each rank is a
`spawn` child that joins a fresh process group on a free loopback port (gloo
on CPU; gloo beside NCCL when every rank has a GPU of its own) and sends back
its pickled result or its traceback. The parent waits on the pipes and on
the process sentinels with a deadline, so a rank that raises, dies or hangs
ends the benchmark with every rank's report instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """Ranks failed; `failures` maps each failed rank to its traceback or what was seen of it."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = dict(sorted(failures.items()))
        text = "\n".join(f"--- rank {r} ---\n{t.rstrip()}" for r, t in self.failures.items())
        super().__init__(f"benchmark ranks {sorted(self.failures)} failed:\n{text}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(device: str, world_size: int) -> str:
    """The process-group backend: DCP's async save needs a CPU backend, so gloo is always there.

    NCCL joins it only when each rank has a GPU of its own (NCCL refuses two ranks on one device).
    """
    if device == "cuda" and torch.cuda.device_count() >= world_size:
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    device: str,
    timeout_s: float,
    args: tuple[Any, ...],
    conn: Connection,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        # As torchrun does: share the cores between the ranks instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend_for(device, world_size),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            message = pickle.dumps((True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except Exception:
        message = pickle.dumps((False, traceback.format_exc()))
    conn.send_bytes(message)
    conn.close()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, device: str = "cpu", timeout_s: float = 900.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks; their results, by rank.

    Args:
        fn: a module-level function (it is pickled into the children).
        world_size: ranks to start.
        *args: picklable arguments for every rank.
        device: "cpu" or "cuda" (picks the backend and each rank's GPU).
        timeout_s: deadline for the whole run and the process group's collective timeout.

    Raises:
        RankError: a rank raised, died or was still running at the deadline.
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs, readers = [], []
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                name=f"bench-rank{rank}",
                args=(fn, rank, world_size, port, device, timeout_s, args, writer),
            )
            proc.start()
            writer.close()  # the child holds the only write end: its death reads as EOF here
            procs.append(proc)
            readers.append(reader)
        results, failures = _collect(procs, readers, time.monotonic() + timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        for reader in readers:
            reader.close()
    if failures:
        raise RankError(failures)
    return [results[r] for r in range(world_size)]


def _collect(
    procs: list, readers: list[Connection], deadline: float
) -> tuple[dict[int, Any], dict[int, str]]:
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    pending = set(range(len(procs)))
    while pending and (remaining := deadline - time.monotonic()) > 0:
        wait([readers[r] for r in pending] + [procs[r].sentinel for r in pending], timeout=remaining)
        for rank in sorted(pending):
            exited = procs[rank].exitcode is not None
            if readers[rank].poll():
                try:
                    # allow_pickle: the rank's own result over its own pipe, never bytes from a file
                    ok, payload = pickle.loads(readers[rank].recv_bytes())  # allow_pickle (see above)
                except (EOFError, OSError):
                    ok, payload = False, f"exited with code {procs[rank].exitcode} without a result"
            elif exited:
                ok, payload = False, f"exited with code {procs[rank].exitcode} without a result"
            else:
                continue
            pending.discard(rank)
            (results if ok else failures)[rank] = payload
            if not ok:  # the others fail within moments, or hang on the dead peer: do not wait long
                deadline = min(deadline, time.monotonic() + 10.0)
    for rank in pending:
        failures[rank] = "still running at the deadline; killed"
    return results, failures
