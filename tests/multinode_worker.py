"""The training script that `tests/test_multinode.py` runs under real `torchrun` jobs.

Phase `save` runs on a job of two "nodes" (two torchrun agents on this machine,
each with its own TMPDIR and node tag): every rank records where torchrun put it,
trains a small FSDP2 model with AdamW for three steps, saves it with the sync
checkpointer, trains one more step and saves again with the async checkpointer
(writer processes committing through rank 0's store, across the two agents).
Rank 0 writes the full values of both saved states with `torch.save` as the
expected values. Phase `load` runs on another job (one node, any number of
ranks), loads both checkpoints into fresh FSDP2 models initialised with other
values and checks parameters and optimizer state for exact equality.

Run as: `torchrun ... tests/multinode_worker.py --phase save|load --dir DIR`
(with the repository root on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import checkpoint
from planners.errors import RankLocalError
from tests.fsdp_workers import assert_same, build, snapshot, train

# Generous: the machine running the tests is small and shared.
WRITE_TIMEOUT_SECS = 240.0
# Where torchrun placed this rank, as the test checks it.
PLACEMENT_ENV = ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "NODE_TAG")


def app_state(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int, rank: int) -> dict:
    model_sd, optim_sd = get_state_dict(model, optim)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "step": step,
        "rng": checkpoint.RankLocal(torch.full((2,), float(rank))),
    }


def record_placement(out: Path, rank: int) -> None:
    placement = {name: os.environ.get(name) for name in PLACEMENT_ENV}
    placement["tempdir"] = tempfile.gettempdir()
    (out / "ranks").mkdir(exist_ok=True)
    (out / "ranks" / f"{rank}.json").write_text(json.dumps(placement))


def save_phase(out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    record_placement(out, rank)
    model = build("fsdp", world, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optim, 3)
    sync = checkpoint.make_sync_checkpointer()
    sync.save(app_state(model, optim, 3, rank), str(out / "sync"))
    sync.close()
    expected = {"sync": snapshot(model, optim)}

    train(model, optim, 1)  # other values, so the two checkpoints cannot stand in for each other
    ckpt = checkpoint.make_async_checkpointer()
    _, write_future = ckpt.save(app_state(model, optim, 4, rank), str(out / "async"))
    write_future.result(timeout=WRITE_TIMEOUT_SECS)
    ckpt.close()
    expected["async"] = snapshot(model, optim)
    if rank == 0:
        torch.save(expected, out / "expected.pt")


def load_phase(out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = torch.load(out / "expected.pt", weights_only=True)
    ckpt = checkpoint.make_sync_checkpointer()
    for name, step in (("sync", 3), ("async", 4)):
        model = build("fsdp", world, seed=123)  # other initial values: the load must overwrite them all
        optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state = app_state(model, optim, 0, rank)
        try:
            ckpt.load(str(out / name), state_dict=state)
        except RankLocalError as e:
            assert "'rng'" in str(e) and "saved by 4 ranks" in str(e), str(e)
        else:
            raise AssertionError(f"{name}: a rank-local value saved by 4 ranks loaded into {world}")
        del state["rng"]
        loaded = ckpt.load(str(out / name), state_dict=state, strict=True)
        set_state_dict(model, optim, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        assert loaded["step"] == step, (name, loaded["step"])
        assert_same(expected[name], snapshot(model, optim), name)
    ckpt.close()
    (out / f"loaded-by-{rank}-of-{world}").write_text("ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["save", "load"], required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        save_phase(args.dir) if args.phase == "save" else load_phase(args.dir)
        dist.barrier()  # no rank tears its connections down while another still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # the async writer processes are spawned and re-import this module
    main()
