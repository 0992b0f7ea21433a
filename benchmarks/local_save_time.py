"""Seconds of a small single-rank sync save to local disk, for before/after comparisons of the write path.

python -m benchmarks.local_save_time            # 8 x 16 MiB float32, 7 saves, the first dropped
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch

import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--mib", type=int, default=16, help="MiB per tensor")
    parser.add_argument("--saves", type=int, default=7)
    args = parser.parse_args()
    state = {f"t{i}": torch.randn(args.mib << 18) for i in range(args.tensors)}
    ckpt = checkpoint.make_sync_checkpointer()
    root = tempfile.mkdtemp(prefix="shardsafe-bench-")
    seconds = []
    try:
        for _ in range(args.saves):
            start = time.perf_counter()
            ckpt.save(state, f"{root}/ckpt", overwrite=True)
            seconds.append(time.perf_counter() - start)
    finally:
        ckpt.close()
        shutil.rmtree(root)
    kept = seconds[1:]
    print(f"{args.tensors * args.mib} MiB: median {statistics.median(kept):.3f}s min {min(kept):.3f}s")


if __name__ == "__main__":
    main()
