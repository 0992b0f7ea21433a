"""The training script that `tests/test_local_tier.py` runs under real `torchrun` jobs.

Phase `train` (2 nodes x 2 ranks): an FSDP2 model with AdamW trains steps
1..7 under a `CheckpointManager` with an async checkpointer, durable saves
every 5 steps and a local tier saving every step. Rank 0 writes the full
values after steps 5 and 7 as the expected values. Once step 7 is committed
(locally with its replicas, and step 5 durably) rank 0 says so through a FIFO
the test reads, and every rank then waits to be killed, as a node failure
would find it.

Phase `resume` (any nodes and ranks): a fresh model with other initial values
resumes through the manager, checks that the step it got is the expected one
and that parameters and optimizer state equal that step's exactly, and
records the step in `resumed-<rank>-of-<world>.json`.

Phase `loop` (issue 23 item 7; any nodes, one rank each is enough): resume
through a manager with an async checkpointer saving locally every step (one
replica) and durably every 5, check the resumed values, then save steps up to
`--until`. With `--kill-at K`, right after `save(K)` returns (its local write
in flight) rank 0 says `K` through the FIFO and every rank waits to be killed.
Each run records the step it resumed in `loop-<run>-<rank>.json`.

Each agent passes its own `--local-root`, as each node has its own disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import checkpoint
from tests.fsdp_workers import assert_same, build, snapshot, train

# Generous: the machine running the tests is small and shared.
KILL_WAIT_SECS = 600.0


def app_state(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> dict:
    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd, "step": step}


def manager(args: argparse.Namespace, ckpt: checkpoint.Checkpointer) -> checkpoint.CheckpointManager:
    return checkpoint.CheckpointManager(
        str(args.durable),
        checkpointer=ckpt,
        interval_steps=5,
        local_root=str(args.local_root),
        local_interval_steps=1,
        local_keep_last=args.local_keep_last,
    )


def train_phase(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build("fsdp", world, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = checkpoint.make_async_checkpointer()
    mgr = manager(args, ckpt)
    expected = {}
    for step in range(1, 8):
        train(model, optim, 1)
        mgr.save(step, app_state(model, optim, step))
        if step in (5, 7):
            expected[step] = snapshot(model, optim)
    mgr.wait_until_finished()  # step 7 committed on both nodes with its replicas; step 5 durable
    if rank == 0:
        torch.save(expected, args.out / "expected.pt")
    dist.barrier()
    if rank == 0:
        with open(args.out / "committed.fifo", "w") as fifo:  # blocks until the test listens
            fifo.write("7\n")
    threading.Event().wait(KILL_WAIT_SECS)  # the test SIGKILLs this job here
    raise SystemExit("the test did not kill the job")


def resume_phase(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = torch.load(args.out / "expected.pt", weights_only=True)
    model = build("fsdp", world, seed=123)  # other initial values: the load must overwrite them all
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = checkpoint.make_sync_checkpointer()
    mgr = manager(args, ckpt)
    state = app_state(model, optim, 0)
    step = mgr.load(state)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert step == args.expect and state["step"] == args.expect, (step, state["step"], args.expect)
    assert_same(expected[args.expect], snapshot(model, optim), f"step {args.expect}")
    mgr.close()
    ckpt.close()
    (args.out / f"resumed-{rank}-of-{world}.json").write_text(
        json.dumps({"step": step, "resumed_from": mgr.resumed_from})
    )


def loop_phase(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    ckpt = checkpoint.make_async_checkpointer()
    mgr = checkpoint.CheckpointManager(
        str(args.durable),
        checkpointer=ckpt,
        interval_steps=5,
        local_root=str(args.local_root),
        local_interval_steps=1,
        local_keep_last=2,
        replicas=1,
    )
    state = {"w": torch.zeros(32, 32), "step": 0}
    start = mgr.load(state)
    if start is not None:  # the values of the step resumed: each save below wrote its own step's
        assert state["step"] == start and torch.equal(state["w"], torch.full((32, 32), float(start))), start
    (args.out / f"loop-{args.attempt}-{rank}.json").write_text(json.dumps({"resumed": start}))
    for step in range((start or 0) + 1, args.until + 1):
        state["w"].fill_(float(step))
        state["step"] = step
        mgr.save(step, state)
        if step == args.kill_at:
            if rank == 0:
                with open(args.out / "committed.fifo", "w") as fifo:  # blocks until the test listens
                    fifo.write(f"{step}\n")
            threading.Event().wait(KILL_WAIT_SECS)  # the test SIGKILLs this job here
            raise SystemExit("the test did not kill the job")
    mgr.close()
    ckpt.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["train", "resume", "loop"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--durable", type=Path, required=True)
    parser.add_argument("--local-root", type=Path, required=True)
    parser.add_argument("--local-keep-last", type=int, default=2)
    parser.add_argument("--expect", type=int, default=7)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--until", type=int, default=0)
    parser.add_argument("--attempt", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format=f"rank {os.environ.get('RANK')} %(name)s %(levelname)s %(message)s"
    )
    dist.init_process_group("gloo")
    try:
        {"train": train_phase, "resume": resume_phase, "loop": loop_phase}[args.phase](args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/multinode_worker.py: skip torch's C++ teardown once the work is on disk


if __name__ == "__main__":  # the async writer processes are spawned and re-import this module
    main()
