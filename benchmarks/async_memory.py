"""Host memory over many async saves: does the trainer's or the writer processes' RSS grow? (issue 26, item 7)

Leaks in async checkpointing are among the most reported bugs of DCP and Orbax (staging buffers
re-allocated per save, futures and plans kept alive, shared-memory segments never unlinked). Here
every rank saves the same DTensor state dict `--saves` times in a row with
`make_async_checkpointer()`, waiting for each save to commit (a training loop that saves every
step), and after every save records the RSS of the trainer process and of its writer process(es)
(`psutil`: its child processes). Checkpoints are deleted as they go, so the page cache and the disk
stay out of it.

Reported per rank: the median RSS of the first window of saves after warm-up and of the last window,
their difference, the least-squares slope over all saves after warm-up (bytes per save) and the
steady memory as a multiple of the rank's shard bytes (for the trainer: what it holds above its RSS
before the first save, i.e. above torch and the state dict). Growth "beyond noise" means a last-window
median above the first window's by more than the spread of the first window. RSS counts the shared
staging buffer in both processes (trainer and writer each map it), so their sum over-counts it once.

    PYTHONPATH=$PWD python -m benchmarks.async_memory --saves 1000 --mib 64 [--world-size 2]

It takes about 1-2 minutes for 1,000 saves of 64 MiB on 2 ranks of a 2-core VM; results go to
stdout as JSON and to `--out` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import psutil
import torch

from benchmarks.state import StateSpec, build_state, local_nbytes
from checkpoint.testing.ranks import run_ranks

MiB = 1024**2
# Saves not counted while first-save costs settle (buffer allocation, writer start, plan cache, allocator pools).
WARMUP_SAVES = 20
# Saves in each of the compared windows (first after warm-up, last).
WINDOW_SAVES = 50


def _rss(process: psutil.Process) -> tuple[int, int]:
    """(this process's RSS, summed RSS of its child processes: the writer processes)."""
    children = 0
    for child in process.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:
            pass
    return process.memory_info().rss, children


def _rank(rank: int, world_size: int, root: str, mib: int, saves: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import checkpoint

    mesh = init_device_mesh("cpu", (world_size,))
    state = build_state(
        StateSpec(total_bytes=mib * MiB, num_tensors=16, dtype=torch.float32, device="cpu"), mesh
    )
    me = psutil.Process()
    before = me.memory_info().rss  # torch imported, the state built: what the training holds anyway
    ckpt = checkpoint.make_async_checkpointer()
    trainer, writers, seconds = [], [], []
    try:
        for i in range(saves):
            path = os.path.join(root, f"step-{i}")
            start = time.perf_counter()
            staged, written = ckpt.save(state, path)
            staged.result()
            written.result()
            seconds.append(time.perf_counter() - start)
            t, w = _rss(me)
            trainer.append(t)
            writers.append(w)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        ckpt.close()
    return {
        "rank_bytes": local_nbytes(state),
        "trainer_before": before,
        "trainer": trainer,
        "writers": writers,
        "seconds": seconds,
    }


def _summary(series: list[int], rank_bytes: int) -> dict:
    steady = series[WARMUP_SAVES:]
    first, last = steady[:WINDOW_SAVES], steady[-WINDOW_SAVES:]
    n = len(steady)
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(steady)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(steady)) / max(
        1e-9, sum((x - mean_x) ** 2 for x in range(n))
    )
    growth = statistics.median(last) - statistics.median(first)
    noise = max(first) - min(first)
    return {
        "first_window_median_MiB": round(statistics.median(first) / MiB, 1),
        "last_window_median_MiB": round(statistics.median(last) / MiB, 1),
        "growth_MiB": round(growth / MiB, 2),
        "first_window_spread_MiB": round(noise / MiB, 2),
        "slope_bytes_per_save": round(slope, 1),
        "grows_beyond_noise": growth > noise,
        "steady_x_rank_bytes": round(statistics.median(last) / rank_bytes, 2),
    }


def measure(
    *, saves: int = 1000, total_mib: int = 64, world_size: int = 2, work_dir: str | None = None
) -> dict:
    if saves < WARMUP_SAVES + 2 * WINDOW_SAVES:
        raise ValueError(f"--saves must be at least {WARMUP_SAVES + 2 * WINDOW_SAVES}, got {saves}")
    root = tempfile.mkdtemp(prefix="shardsafe-async-memory-", dir=work_dir)
    try:
        per_rank = run_ranks(_rank, world_size, root, total_mib, saves, timeout_secs=3600, share_cores=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"saves": saves, "total_mib": total_mib, "world_size": world_size, "load_average": os.getloadavg()}
    for rank, r in enumerate(per_rank):
        out[f"rank{rank}"] = {
            "rank_bytes_MiB": round(r["rank_bytes"] / MiB, 1),
            "median_save_s": round(statistics.median(r["seconds"]), 4),
            "trainer_before_first_save_MiB": round(r["trainer_before"] / MiB, 1),
            "trainer": _summary(r["trainer"], r["rank_bytes"]),
            "trainer_added_x_rank_bytes": round(
                (statistics.median(r["trainer"][-WINDOW_SAVES:]) - r["trainer_before"]) / r["rank_bytes"], 2
            ),
            "writers": _summary(r["writers"], r["rank_bytes"]),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--saves", type=int, default=1000)
    p.add_argument("--mib", type=int, default=64, help="state dict size over all ranks")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    result = measure(saves=args.saves, total_mib=args.mib, world_size=args.world_size, work_dir=args.work_dir)
    text = json.dumps(result, indent=1)
    sys.stdout.write(text + "\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
