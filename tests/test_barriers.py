"""`TCPStoreBarrier` on real ranks: directly, and as the sync checkpointer's post-commit barrier.

The async path (a writer process SIGKILLed between saves) is covered in tests/test_write_safety.py; here the
barrier itself is shown to hold ranks back until all arrive, to time out naming how many arrived, and to run
once per save, keyed by the save id, when `CheckpointerConfig.barrier_config` asks for it. The commit
store's exchange is shown to keep the coordinator until every rank has read its answer.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import checkpoint
from checkpoint import CheckpointerConfig
from checkpoint.save.barriers import BarrierConfig, TCPStoreBarrier, create_barrier_from_config
from checkpoint.save.collectives import StoreExchange
from checkpoint.testing.ranks import free_port, run_ranks
from planners.errors import CheckpointTimeoutError

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(240)]


def _late_arrival(rank: int, world_size: int, port: int) -> bool:
    barrier = TCPStoreBarrier(host="127.0.0.1", port=port, rank=rank, world_size=world_size, timeout_secs=60)
    dist.barrier()  # every client connected to rank 0's store
    if rank == world_size - 1:
        time.sleep(1.0)  # arrive last, well after the others are waiting
        barrier.store.set("last-rank-was-here", b"1")
    barrier.execute_barrier(key="save-1")
    # Nobody gets past the barrier before the last rank set its key, so every rank sees it.
    seen = barrier.store.check(["last-rank-was-here"])
    dist.barrier()  # rank 0 hosts the store: keep it until every rank has looked
    return seen


def test_tcp_store_barrier_holds_every_rank_until_the_last_arrives() -> None:
    assert run_ranks(_late_arrival, 3, free_port()) == [True, True, True]


def _rank_0_alone(rank: int, world_size: int, port: int) -> str:
    barrier = TCPStoreBarrier(host="127.0.0.1", port=port, rank=rank, world_size=world_size, timeout_secs=2)
    dist.barrier()
    outcome = "skipped"
    if rank == 0:
        try:
            barrier.execute_barrier(key="abc123")
        except CheckpointTimeoutError as e:
            outcome = f"{type(e).__name__}: {e}"
    dist.barrier()
    return outcome


def test_tcp_store_barrier_times_out_naming_the_ranks_that_arrived() -> None:
    results = run_ranks(_rank_0_alone, 2, free_port())

    assert results == [
        "CheckpointTimeoutError: barrier shardsafe-barrier/abc123: only 1 of 2 ranks arrived within 2s",
        "skipped",
    ]
    assert issubclass(CheckpointTimeoutError, TimeoutError)


def _sync_saves_with_barrier(rank: int, world_size: int, root: str, port: int) -> list[int]:
    args = {"host": "127.0.0.1", "port": port, "rank": rank, "world_size": world_size, "timeout_secs": 60}
    config = CheckpointerConfig(barrier_config=BarrierConfig(barrier_type="tcp_store", barrier_args=args))
    ckpt = checkpoint.make_sync_checkpointer(config)
    for step in range(2):
        ckpt.save({"w": torch.full((4, 6), float(step)), "step": step}, f"{root}/s{step}")
    dist.barrier()
    # The barrier ran once per save, under that save's id: every rank arrived at each key.
    client = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=30))
    arrivals = []
    for step in range(2):
        save_id = json.loads(Path(f"{root}/s{step}/metadata.json").read_text())["save_id"]
        arrivals.append(client.add(f"shardsafe-barrier/{save_id}", 0))
    dist.barrier()  # rank 0's checkpointer hosts the store: close only when every rank has counted
    ckpt.close()
    return arrivals


def test_sync_checkpointer_runs_the_tcp_store_barrier_after_each_commit(tmp_path: Path) -> None:
    assert create_barrier_from_config(BarrierConfig()) is None

    results = run_ranks(_sync_saves_with_barrier, 2, str(tmp_path), free_port())

    assert results == [[2, 2], [2, 2]]
    reader = checkpoint.make_sync_checkpointer()
    for step in range(2):
        loaded = reader.load(str(tmp_path / f"s{step}"))
        assert torch.equal(loaded["w"], torch.full((4, 6), float(step))) and loaded["step"] == step


# --- the commit store's scatter: the coordinator leaves only once every rank has its answer -----------------


def _scatter_with_a_late_reader(rank: int, world_size: int, port: int) -> tuple[str, float]:
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timedelta(seconds=60))
    exchange = StoreExchange(
        store, rank=rank, world_size=world_size, prefix="save-1", timeout_secs=60, secret=b"0123456789abcdef"
    )
    dist.barrier()  # every client connected to rank 0's store
    if rank == world_size - 1:
        time.sleep(1.5)  # a rank slow to read the commit's outcome (a loaded machine, a slow writer)
    start = time.monotonic()
    got = exchange.broadcast("committed" if rank == 0 else None)
    waited = time.monotonic() - start
    dist.barrier()
    return got, waited


def test_the_coordinator_of_a_store_exchange_waits_until_every_rank_has_read_the_outcome() -> None:
    """Rank 0 hosts the store; were its broadcast to return before the last rank read, rank 0 could exit
    and take the store along, and that rank would report a committed save as failed."""
    results = run_ranks(_scatter_with_a_late_reader, 3, free_port(), timeout_secs=120)
    assert [got for got, _ in results] == ["committed"] * 3
    assert results[0][1] >= 1.0, results  # the coordinator waited for the late rank's read
