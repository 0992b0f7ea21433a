"""Tests of the multi-process helper itself: real gloo collectives, and every way a rank can fail is reported.

Each run spawns fresh interpreters that import torch (about 2 s), so the failure cases share runs where they can.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist

from checkpoint.testing.ranks import (
    FAILURE_GRACE_SECS,
    RankFailures,
    RankTimeout,
    backend_for,
    free_port,
    run_ranks,
)

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(120)]

_ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "SHARDSAFE_TEST_FLAG")


def _all_reduce_sum(rank: int, world_size: int, base: int) -> tuple[int, int, list[int], dict[str, str]]:
    tensor = torch.tensor([base + rank, 10 * (rank + 1)], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    env = {name: os.environ[name] for name in _ENV_NAMES}
    return dist.get_rank(), dist.get_world_size(), tensor.tolist(), env


def _raise_on_ranks_1_and_2(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("bad shard on rank 1: key 'layer.weight'")
    if rank == 2:
        raise KeyError("missing key on rank 2")
    return rank


def _die_on_ranks_1_and_2(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # rank 0 waits here for peers that never arrive
    return rank


def _sleep_on_rank_1(rank: int, world_size: int, seconds: float) -> int:
    if rank == 1:
        time.sleep(seconds)  # stands in for a hang outside any collective
    return rank


def _return_unpicklable(rank: int, world_size: int) -> object:
    return lambda: rank


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_returns_exact_sum_and_rank_env(world_size: int) -> None:
    results = run_ranks(_all_reduce_sum, world_size, 100, env={"SHARDSAFE_TEST_FLAG": "on"})

    expected_sum = [sum(100 + r for r in range(world_size)), sum(10 * (r + 1) for r in range(world_size))]
    assert results == [
        (
            rank,
            world_size,
            expected_sum,
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "SHARDSAFE_TEST_FLAG": "on",
            },
        )
        for rank in range(world_size)
    ]


def test_every_rank_that_raises_is_reported_with_its_traceback() -> None:
    with pytest.raises(RankFailures) as info:
        run_ranks(_raise_on_ranks_1_and_2, 3)

    assert type(info.value) is RankFailures
    assert sorted(info.value.failures) == [1, 2]
    assert "ValueError: bad shard on rank 1: key 'layer.weight'" in info.value.failures[1]
    assert "in _raise_on_ranks_1_and_2" in info.value.failures[1]
    assert "KeyError: 'missing key on rank 2'" in info.value.failures[2]
    message = str(info.value)
    assert message.startswith("rank(s) failed: ranks [1, 2]\n--- rank 1 ---\nTraceback")
    assert "ValueError: bad shard on rank 1: key 'layer.weight'\n--- rank 2 ---\nTraceback" in message
    assert message.endswith("KeyError: 'missing key on rank 2'")


def test_ranks_that_die_silently_are_reported_promptly() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailures) as info:
        run_ranks(_die_on_ranks_1_and_2, 3, timeout_secs=60.0)
    elapsed = time.monotonic() - start

    failures = info.value.failures
    assert failures[1] == "exited with code 3 without reporting a result"
    assert failures[2] == "died from signal SIGKILL (exit code -9) without reporting a result"
    assert "--- rank 2 ---\ndied from signal SIGKILL (exit code -9)" in str(info.value)
    # Rank 0, stuck in the barrier, either sees the closed connection and raises, or is killed after the grace
    # period; either way it is named, and the run ends long before the 60 s deadline.
    assert sorted(failures) == [0, 1, 2]
    assert "Traceback" in failures[0] or failures[0] == (
        f"still running {FAILURE_GRACE_SECS} s after rank 1 failed; killed with SIGKILL"
    )
    assert elapsed < 30.0


def test_hung_rank_is_killed_at_the_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        # 15 s leaves room for two spawned ranks to import torch on a loaded 2-core machine
        run_ranks(_sleep_on_rank_1, 2, 120.0, timeout_secs=15.0)
    elapsed = time.monotonic() - start

    assert isinstance(info.value, TimeoutError)
    assert info.value.failures == {1: "still running at the deadline; killed with SIGKILL"}
    assert str(info.value).startswith("ranks did not finish within 15.0 s: ranks [1]\n")
    assert 15.0 <= elapsed < 35.0


def test_unpicklable_result_is_reported_as_that_rank_failing() -> None:
    with pytest.raises(RankFailures) as info:
        run_ranks(_return_unpicklable, 2)

    assert sorted(info.value.failures) == [0, 1]
    assert "_return_unpicklable.<locals>.<lambda>" in info.value.failures[0]


def test_world_size_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        run_ranks(_all_reduce_sum, 0, 0)


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname() == ("127.0.0.1", port)


def _threads_and_backend(rank: int, world_size: int) -> tuple[int, str]:
    return torch.get_num_threads(), dist.get_backend()


def test_share_cores_splits_the_cores_between_ranks_on_gloo() -> None:
    results = run_ranks(_threads_and_backend, 2, share_cores=True)

    assert results == [(max(1, (os.cpu_count() or 1) // 2), "gloo")] * 2


def test_rank_failures_are_runtime_errors_for_the_benchmarks() -> None:
    # The benchmarks' launcher raised a RuntimeError; the shared one keeps that contract.
    assert issubclass(RankFailures, RuntimeError) and issubclass(RankTimeout, TimeoutError)


def test_backend_is_gloo_unless_every_rank_has_a_gpu() -> None:
    assert backend_for("cpu", 2) == "gloo"
    gpus = torch.cuda.device_count()
    assert backend_for("cuda", gpus + 1) == "gloo"
    if gpus:
        assert backend_for("cuda", gpus) == "cpu:gloo,cuda:nccl"


def test_unknown_device_is_rejected() -> None:
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        run_ranks(_all_reduce_sum, 2, 0, device="tpu")
