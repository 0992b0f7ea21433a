"""A step with both a local and a durable save: staged twice against uploaded from the local files.

One process is one node (no replicas); an async checkpointer; every step is
saved to both tiers (`interval_steps=1, local_interval_steps=1`). For each
way, the median over the measured steps of: the training-thread time of
`mgr.save(step)` (blocking), and the time from that call until the durable
step's `metadata.json` exists (time to durable). "staged twice" is the
manager's behaviour before `checkpoint.tiers.upload` (the durable
checkpointer stages the tensors again); "upload" is the current one.

python -m benchmarks.upload_bench --mib 64            # local durable root
python -m benchmarks.upload_bench --mib 64 --s3       # durable root on SeaweedFS (loopback)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import checkpoint
from checkpoint.config import CheckpointerConfig
from checkpoint.tiers.local_tier import LocalTier
from storage.spec import StorageSpec

# How often the watcher looks for the durable metadata (seconds): the resolution of time to durable.
POLL_SECS = 0.002


def _state(total_mib: int) -> dict[str, torch.Tensor]:
    n = 8
    return {f"t{i}": torch.randn((total_mib << 20) // 4 // n) for i in range(n)}


def _until_exists(exists: Any, start: float, out: list[float]) -> threading.Thread:
    def watch() -> None:
        while not exists():
            time.sleep(POLL_SECS)
        out.append(time.perf_counter() - start)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run_way(
    way: str, root: str, durable: str, options: dict | None, mib: int, steps: int
) -> dict[str, float]:
    """Median blocking and time-to-durable seconds of `steps` both-tier saves (the first two dropped)."""
    original = LocalTier.uploading
    if way == "staged twice":
        LocalTier.uploading = lambda self, ckpt, step: ckpt  # type: ignore[method-assign]
    state = _state(mib)
    ckpt = checkpoint.make_async_checkpointer(CheckpointerConfig(storage_options=options))
    spec = StorageSpec.resolve(durable, storage_options=options)
    mgr = checkpoint.CheckpointManager(
        durable, checkpointer=ckpt, local_root=os.path.join(root, f"local-{way.replace(' ', '-')}"),
        local_interval_steps=1, local_address="127.0.0.1", storage_options=options,
    )  # fmt: skip
    blocking, durable_secs = [], []
    try:
        for step in range(1, steps + 3):
            for t in state.values():
                t.add_(1.0)
            step_dir = spec.child(f"step-{step:09d}").open()
            start = time.perf_counter()
            watcher = _until_exists(lambda s=step_dir: s.exists("metadata.json"), start, durable_secs)
            mgr.save(step, state)
            blocking.append(time.perf_counter() - start)
            mgr.wait_until_finished()
            watcher.join()
    finally:
        mgr.close()
        ckpt.close()
        LocalTier.uploading = original  # type: ignore[method-assign]
    return {"blocking": statistics.median(blocking[2:]), "durable": statistics.median(durable_secs[2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="state size (8 float32 tensors)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per way (2 more are warm-up)")
    parser.add_argument("--s3", action="store_true", help="durable root on a SeaweedFS server on loopback")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = tempfile.mkdtemp(prefix="shardsafe-upload-bench-")
    server = None
    try:
        options = None
        if args.s3:
            import s3fs

            from checkpoint.testing.s3server import SeaweedS3Server

            server = SeaweedS3Server(Path(root) / "seaweedfs")
            options = dict(server.start().storage_options)
            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("bench")
        results = {}
        for way in ("staged twice", "upload"):
            durable = (
                f"s3://bench/{way.replace(' ', '-')}"
                if args.s3
                else os.path.join(root, way.replace(" ", "-"))
            )
            results[way] = run_way(way, root, durable, options, args.mib, args.steps)
            print(
                f"{way:13s} blocking {results[way]['blocking']:.4f}s  to durable {results[way]['durable']:.4f}s"
            )
        staged, upload = results["staged twice"], results["upload"]
        print(
            f"upload / staged twice: blocking {upload['blocking'] / staged['blocking']:.2f}x, "
            f"time to durable {upload['durable'] / staged['durable']:.2f}x"
        )
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
