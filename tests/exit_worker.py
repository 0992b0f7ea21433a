"""The torchrun job that `tests/test_exit_clean.py` runs again and again: it must exit 0 every time.

Each rank trains a tiny FSDP2 model, saves it with the sync and the async
checkpointer, loads the sync checkpoint back and checks it for exact
equality, gathers the full parameters (the last collective) and exits. With
`--forget-close` it calls neither `close()` nor `destroy_process_group()`.

`--slow-gloo-workers` makes the abort of issue 18 likely instead of rare:
every thread of the rank shares one CPU and the gloo worker threads run at
the lowest priority, so a worker frees its last work late, as on a busy
machine (see checkpoint/exit_order.py). Without shardsafe's exit handler
most such jobs die with SIGABRT at exit.

Run as: `torchrun --nproc-per-node 2 tests/exit_worker.py --dir DIR [--forget-close] [--slow-gloo-workers]`
(with the repository root on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import checkpoint

# The writer processes' whole write, on a small shared machine.
WRITE_TIMEOUT_SECS = 120.0


def slow_gloo_workers() -> None:
    """Put every thread of this process on one CPU and the gloo worker threads at nice 19."""
    cpu = min(os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            os.sched_setaffinity(int(tid), {cpu})
            if name.startswith(("pt_gloo", "gloo")):
                os.setpriority(os.PRIO_PROCESS, int(tid), 19)
        except (FileNotFoundError, ProcessLookupError):  # a short-lived thread (e.g. a writer pipe's) ended
            continue


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def save_and_check(out: Path, model: nn.Module, *, close: bool) -> None:
    """Sync and async saves of the model, then the sync one loaded back into zeros and compared."""
    sync = checkpoint.make_sync_checkpointer()
    sync.save({"model": model.state_dict()}, str(out / "sync"))
    ckpt = checkpoint.make_async_checkpointer()
    _, written = ckpt.save({"model": model.state_dict()}, str(out / "async"))
    written.result(timeout=WRITE_TIMEOUT_SECS)
    target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    loaded = sync.load(str(out / "sync"), state_dict=target)
    for key, value in model.state_dict().items():
        got = loaded["model"][key]
        assert torch.equal(got.to_local(), value.to_local()), key
    if close:
        ckpt.close()
        sync.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--forget-close", action="store_true")
    parser.add_argument("--slow-gloo-workers", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    model = build()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.ones(4, 8)).square().mean()
    loss.backward()
    optim.step()
    save_and_check(args.dir, model, close=not args.forget_close)
    if args.slow_gloo_workers:  # after the async save: its writer processes keep all CPUs
        slow_gloo_workers()
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # the last collective
    if dist.get_rank() == 0:
        print(f"exit worker done: {sorted(full)}", flush=True)
    if not args.forget_close:
        dist.destroy_process_group()


if __name__ == "__main__":  # the async writer processes are spawned and re-import this module
    main()
