"""How long an async save blocks training, against one plain copy and DCP's `async_save` (issue 3).

The training may change its tensors only once a save's staging is done, so
the blocking time of a save is measured from the call until its stage future
(DCP: its staging completion) is done, on the slowest rank. References, in the
same processes and the same run, interleaved save by save:

- `copy`: one `copy_` of the rank's local shards into buffers allocated
  beforehand: the floor for any staging;
- `clone`: the same bytes cloned (allocation included), what a naive stager does;
- DCP `async_save` with its defaults, and with a persistent writer process and
  a reused `DefaultStager` (its fastest steady state).

Each system first saves a small state dict once (writer processes started,
first-call costs paid); then the first save of the real state dict, which
allocates each system's staging memory and plans afresh, is reported apart, and
the steady state is the median of the later saves. Every save's write is
awaited before the next measurement, so no writer competes with the copies
being timed.

Run: `python -m benchmarks.async_blocking --total-mib 512 --world-size 2 --saves 5`.
`benchmarks.run` imports `measure`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import checkpoint
from checkpoint.testing.ranks import run_ranks

MiB = 1024**2
COLUMNS = 4096  # float32 columns per tensor row: 16 KiB rows, so any size is a whole number of rows


def _state(total_bytes: int, num_tensors: int, rank: int, world_size: int) -> dict:
    rows = max(world_size, total_bytes // (num_tensors * COLUMNS * 4))
    mesh = init_device_mesh("cpu", (world_size,))
    model = {}
    for i in range(num_tensors):
        local = torch.randn(
            rows // world_size, COLUMNS, generator=torch.Generator().manual_seed(rank * 1000 + i)
        )
        model[f"layer{i}"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return {"model": model, "step": 1}


def _locals(state: dict) -> list[torch.Tensor]:
    return [t.to_local() for t in state["model"].values()]


def _dcp_process_kwargs() -> dict[str, Any]:
    """DCP's persistent writer process and a stager reused across saves, where this torch has them."""
    kwargs: dict[str, Any] = {}
    params = inspect.signature(dcp.async_save).parameters
    if "async_checkpointer_type" in params:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kwargs["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
    if "async_stager" in params:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        kwargs["async_stager"] = DefaultStager(
            StagingOptions(
                use_pinned_memory=False,
                use_shared_memory=True,
                use_async_staging=True,
                use_non_blocking_copy=False,
            )
        )
    return kwargs


def _dcp_blocking(state: dict, path: str, kwargs: dict[str, Any]) -> float:
    start = time.perf_counter()
    response = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(path), **kwargs)
    staging = getattr(response, "staging_completion", None)
    if staging is not None:  # staged in a thread: the tensors may change only once it is done
        staging.result()
    blocked = time.perf_counter() - start
    getattr(response, "upload_completion", response).result()
    return blocked


def _warm_up(ours: Any, dcp_process: dict[str, Any], rank: int, world_size: int, root: str) -> None:
    """One small save per system: writers started, first-call costs paid, as in a job that ran a while.

    The first save of the real state dict then measures what a first save of a new
    layout costs each system (allocating its staging memory, planning), not start-up.
    """
    small = _state(world_size * COLUMNS * 4, 1, rank, world_size)
    ours.save(small, f"{root}/ours")[1].result()
    _dcp_blocking(small, f"{root}/dcp", {})
    _dcp_blocking(small, f"{root}/dcp-process", dcp_process)


def _rank(rank: int, world_size: int, total_bytes: int, num_tensors: int, saves: int, root: str) -> dict:
    ours = checkpoint.make_async_checkpointer()
    state = _state(total_bytes, num_tensors, rank, world_size)
    src = _locals(state)
    dst = [torch.empty_like(t) for t in src]
    dcp_process = _dcp_process_kwargs()
    _warm_up(ours, dcp_process, rank, world_size, f"{root}/warm")
    times: dict[str, list[float]] = {
        k: [] for k in ("copy", "clone", "ours", "ours_return", "dcp", "dcp_process")
    }
    for i in range(saves):
        dist.barrier()
        start = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
        times["copy"].append(time.perf_counter() - start)
        start = time.perf_counter()
        clones = [s.clone() for s in src]
        times["clone"].append(time.perf_counter() - start)
        del clones

        dist.barrier()
        start = time.perf_counter()
        stage_future, write_future = ours.save(state, f"{root}/ours-{i}")
        times["ours_return"].append(time.perf_counter() - start)
        stage_future.result()
        times["ours"].append(time.perf_counter() - start)
        write_future.result()

        dist.barrier()
        times["dcp"].append(_dcp_blocking(state, f"{root}/dcp-{i}", {}))
        dist.barrier()
        times["dcp_process"].append(_dcp_blocking(state, f"{root}/dcp-process-{i}", dcp_process))
        if rank == 0 and i > 0:  # keep the disk from filling up; the first saves stay for inspection
            for name in ("ours", "dcp", "dcp-process"):
                shutil.rmtree(f"{root}/{name}-{i - 1}", ignore_errors=True)
    ours.close()
    stager = dcp_process.get("async_stager")
    if stager is not None:
        stager.close()
    return {"times": times, "rank_bytes": sum(t.numel() * t.element_size() for t in src)}


def _summary(results: list[dict], total_bytes: int, world_size: int, saves: int) -> dict[str, Any]:
    # The slowest rank blocks training: per save, the max over ranks.
    slowest = {k: [max(r["times"][k][i] for r in results) for i in range(saves)] for k in results[0]["times"]}
    out: dict[str, Any] = {
        "total_bytes": total_bytes,
        "world_size": world_size,
        "rank_bytes": max(r["rank_bytes"] for r in results),
        "saves": saves,
        "copy_s": statistics.median(slowest["copy"]),
        "clone_s": statistics.median(slowest["clone"]),
        "samples_s": slowest,  # per save, slowest rank: for spreads
    }
    for name in ("ours", "ours_return", "dcp", "dcp_process"):
        out[f"{name}_first_s"] = slowest[name][0]
        out[f"{name}_steady_s"] = statistics.median(slowest[name][1:]) if saves > 1 else None
    for name in ("ours", "dcp", "dcp_process"):
        steady = out[f"{name}_steady_s"]
        out[f"{name}_steady_x_copy"] = steady / out["copy_s"] if steady is not None else None
        out[f"{name}_first_x_copy"] = out[f"{name}_first_s"] / out["copy_s"]
    return out


def measure(
    *,
    total_bytes: int = 512 * MiB,
    world_size: int = 2,
    saves: int = 5,
    num_tensors: int = 16,
    root: str | None = None,
) -> dict[str, Any]:
    """Blocking times of shardsafe's and DCP's async saves and of a plain copy, on `world_size` gloo ranks.

    Args:
        total_bytes: size of the state dict over all ranks (float32 DTensors sharded by rows).
        world_size: ranks to spawn.
        saves: saves per system; the first is reported apart, the rest make the steady state.
        num_tensors: tensors in the state dict.
        root: directory for the checkpoints (a temporary one, removed afterwards, by default).

    Returns:
        Seconds (`*_s`, slowest rank; steady state = median of saves 2..n) and ratios to one
        plain copy (`*_x_copy`): `ours` until the stage future is done, `ours_return` until
        `save()` returned, `dcp` (defaults) and `dcp_process` (persistent process, reused stager).
    """
    if saves < 2:
        raise ValueError(f"saves must be at least 2 (one first save, one steady), got {saves}")
    scratch = tempfile.mkdtemp(prefix="shardsafe-async-bench-") if root is None else root
    try:
        results = run_ranks(
            _rank, world_size, total_bytes, num_tensors, saves, scratch, timeout_secs=1800, share_cores=True
        )
    finally:
        if root is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return _summary(results, total_bytes, world_size, saves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-mib", type=int, default=512)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--num-tensors", type=int, default=16)
    parser.add_argument("--root", default=None, help="where checkpoints go (default: a temporary directory)")
    args = parser.parse_args()
    result = measure(
        total_bytes=args.total_mib * MiB,
        world_size=args.world_size,
        saves=args.saves,
        num_tensors=args.num_tensors,
        root=args.root,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
