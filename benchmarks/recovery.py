"""Recovery from the node-local tier against the durable tier, and what the local tier costs.

One process (one node), so it runs in a minute on a small machine:

* Resume time, always `CheckpointManager.load` itself: from this node's local
  tier (own disk, read straight into the targets), after a lost node (a job of
  two nodes, each a spawned rank with its own `local_root` and tier server;
  node 1's root is empty, so its rank reads node 0's copies over HTTP, also
  straight into its targets, while node 0 reads its own disk: the time is the
  slower rank's), and from a durable root on S3 (a SeaweedFS server on
  loopback, `checkpoint.testing.s3server`): on loopback, and with S3 behind a
  proxy capping each TCP connection at `--stream-limit-MBps`
  (`checkpoint.testing.throttle`), as a link to a remote store is capped.
* Training-thread time of a local save (what `save()` blocks for: staging)
  against a plain copy of the same tensors into preallocated buffers.
* Host memory and local disk per rank: the staging buffers of the manager's
  two async writers, and the bytes the local root holds after the saves.

Run: `python benchmarks/recovery.py --mib 64` (prints JSON). Every load is
checked for exact equality before its time counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(REPO_ROOT))

import checkpoint  # noqa: E402
from checkpoint.testing.ranks import run_ranks  # noqa: E402
from checkpoint.testing.s3server import SeaweedS3Server  # noqa: E402
from checkpoint.testing.throttle import throttled_link  # noqa: E402

MiB = 1024 * 1024
TENSORS = 8
STEP_DIR = "step-000000001"


def _state(total_mib: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    per = total_mib * MiB // TENSORS // 4
    return {f"layer{i}.weight": torch.rand(per, generator=gen) for i in range(TENSORS)}


def _check(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if not torch.equal(target[key], value):
            raise RuntimeError(f"benchmark load of {key} returned different values")


def _timed_load(load: Any, state: dict[str, torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        start = time.perf_counter()
        load(target)
        best = min(best, time.perf_counter() - start)
        _check(target, state)
    return round(best, 3)


def _save_both_tiers(
    state: dict[str, torch.Tensor], durable: str, local: Path, options: dict
) -> dict[str, Any]:
    """Save step 1 durably and locally; returns blocking times and the memory and disk figures."""
    config = checkpoint.CheckpointerConfig(storage_options=options)
    ckpt = checkpoint.make_async_checkpointer(config)
    mgr = checkpoint.CheckpointManager(
        durable, checkpointer=ckpt, interval_steps=5, local_root=str(local), local_address="127.0.0.1"
    )
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    blocks, copies = [], []
    buffers = {k: torch.empty_like(v) for k, v in state.items()}
    try:
        for step in range(1, 6):  # steps 1-4: local saves; step 5 both tiers (loaded below)
            start = time.perf_counter()
            mgr.save(step, state)
            if step > 1:  # the first save also allocates the staging buffer
                blocks.append(time.perf_counter() - start)
            mgr.wait_until_finished()  # not timed: the writer's work runs while training would
            start = time.perf_counter()
            for k, v in state.items():
                buffers[k].copy_(v)
            copies.append(time.perf_counter() - start)
        disk = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    finally:
        mgr.close()
        ckpt.close()
    return {
        "local_save_block_s": round(min(blocks), 4),
        "plain_copy_s": round(min(copies), 4),
        "local_save_vs_plain_copy": round(min(blocks) / min(copies), 2),
        # The durable writer's staging buffer and the local one's (each holds this rank's chunks once).
        "host_staging_bytes_per_rank": 2 * nbytes,
        "local_disk_bytes_per_node": disk,
        "state_bytes": nbytes,
    }


def _resume_times(state: dict, durable: str, local: Path, options: dict, repeats: int) -> dict[str, float]:
    """Seconds of `CheckpointManager.load` from each source (managers are built before the clock starts)."""
    ckpt = checkpoint.make_sync_checkpointer(checkpoint.CheckpointerConfig(storage_options=options))
    out: dict[str, float] = {}
    durable_mgr = checkpoint.CheckpointManager(durable, checkpointer=ckpt)
    local_mgr = checkpoint.CheckpointManager(
        durable, checkpointer=ckpt, local_root=str(local), local_address="127.0.0.1"
    )
    try:
        out["durable_s3_s"] = _timed_load(
            lambda t: _expect(durable_mgr.load(t), durable_mgr, "durable"), state, repeats
        )
        out["local_tier_own_disk_s"] = _timed_load(
            lambda t: _expect(local_mgr.load(t), local_mgr, "local"), state, repeats
        )
    finally:
        durable_mgr.close()
        local_mgr.close()
        ckpt.close()
    seconds = []
    for _ in range(repeats):
        job = uuid.uuid4().hex[:8]
        roots = [local.parent / f"lost-{job}-node0", local.parent / f"lost-{job}-node1"]
        shutil.copytree(local, roots[0])  # node 0 kept its disk; node 1 lost its own (an empty root)
        times = run_ranks(
            _lost_node_rank, 2, durable, [str(r) for r in roots], options, state, timeout_secs=600
        )
        seconds.append(max(times))
    out["local_tier_lost_node_s"] = round(min(seconds), 3)
    return out


def _lost_node_rank(
    rank: int, world_size: int, durable: str, roots: list[str], options: dict, state: dict
) -> float:
    """One node of the job after node 1 was lost: `CheckpointManager.load` of step 5, timed and checked."""
    import torch.distributed as dist

    os.environ.update(GROUP_RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    ckpt = checkpoint.make_sync_checkpointer(checkpoint.CheckpointerConfig(storage_options=options))
    mgr = checkpoint.CheckpointManager(
        durable, checkpointer=ckpt, local_root=roots[rank], local_address="127.0.0.1"
    )
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    try:
        dist.barrier()
        start = time.perf_counter()
        _expect(mgr.load(target), mgr, "local")
        seconds = time.perf_counter() - start
        _check(target, state)
    finally:
        mgr.close()
        ckpt.close()
    return seconds


def _expect(step: int | None, mgr: checkpoint.CheckpointManager, tier: str) -> None:
    if step != 5 or mgr.resumed_from != tier:
        raise RuntimeError(f"benchmark resumed step {step} from {mgr.resumed_from}, not 5 from {tier}")


def run_recovery_bench(
    *, total_mib: int = 64, repeats: int = 2, stream_limit_MBps: float = 10.0
) -> dict[str, Any]:
    state = _state(total_mib)
    with tempfile.TemporaryDirectory(prefix="shardsafe-recovery-") as tmp:
        root = Path(tmp)
        (root / "seaweedfs").mkdir()
        server = SeaweedS3Server(root / "seaweedfs")
        endpoint = server.start()
        try:
            import s3fs

            options = endpoint.storage_options
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
            durable, local = f"s3://{bucket}/run", root / "local"
            costs = _save_both_tiers(state, durable, local, options)
            result: dict[str, Any] = {"bytes": costs["state_bytes"], "save_costs": costs}
            result["loopback"] = _resume_times(state, durable, local, options, repeats)
            with throttled_link(endpoint.endpoint_url, stream_limit_MBps * 1e6) as proxy_url:
                capped = {**options, "client_kwargs": {**options["client_kwargs"], "endpoint_url": proxy_url}}
                limited = _resume_times(state, durable, local, capped, repeats)
            result[f"s3_per_stream_limit_{stream_limit_MBps:g}MBps"] = limited
            for figures in (result["loopback"], limited):
                for name in [k for k in figures if k.startswith("local_tier")]:
                    figures[f"durable_over_{name.removesuffix('_s')}"] = round(
                        figures["durable_s3_s"] / figures[name], 1
                    )
            return result
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="state dict size in MiB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stream-limit-MBps", type=float, default=10.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(
        json.dumps(
            run_recovery_bench(
                total_mib=args.mib, repeats=args.repeats, stream_limit_MBps=args.stream_limit_MBps
            ),
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
