"""Train a small FSDP2 model with async checkpoints through `checkpoint.CheckpointManager`.

    torchrun --nproc-per-node 2 examples/train_with_manager.py --root /tmp/shardsafe-run --steps 40 --kill-at 25
    # killed mid-run (here by --kill-at; or kill -9, a lost node), then resumed on another world size:
    torchrun --nproc-per-node 3 examples/train_with_manager.py --root /tmp/shardsafe-run --steps 40
    shardsafe ls /tmp/shardsafe-run

Every rank runs the same loop: `mgr.load(state)` picks the newest complete step
under the root (None on a fresh start) and reshards it to this job's world
size; `mgr.save(step, state)` saves every `--every` steps through the async
checkpointer (training continues while each rank's writer process writes),
keeps the last 3 steps plus every 20th, and saves at once when torchrun or the
scheduler sends SIGTERM. `--kill-at STEP` (demo only) SIGKILLs torchrun and
every rank while that step's files are being written, before its commit, so
the rerun shows a resume from the newest complete step before it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import checkpoint


def build_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


TARGET = torch.randn(32, 8, generator=torch.Generator().manual_seed(1234))  # the map the model learns


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch for a step whatever the world size."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
    return x, x @ TARGET


class KillJobWhileWriting(checkpoint.WriterHook):
    """Demo only: SIGKILL the whole job (torchrun and every rank) once `suffix`'s shard files are written.

    Runs in a writer process before the commit, so that step stays incomplete: a kill -9 mid-save.
    """

    def __init__(self, suffix: str, pids: list[int]) -> None:
        self.suffix, self.pids = suffix, pids

    def pre_commit(self, path: str, **kwargs: object) -> None:
        if path.endswith(self.suffix):
            if kwargs.get("rank") == 0:
                print(f"kill -9 of the whole job while {path} is being written", flush=True)
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    def post_commit(self, path: str, **kwargs: object) -> None:
        pass


class TrainState:
    """Model and optimizer as one stateful object: the checkpointer calls state_dict()/load_state_dict()."""

    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd: dict) -> None:
        set_state_dict(self.model, self.optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, help="run directory: local path or fsspec URL")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5, help="save every N steps")
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL the job after staging this step")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state = {"train": TrainState(model, optim), "step": -1}

    hook = None
    if args.kill_at is not None:
        pids: list[int] = [0] * world
        dist.all_gather_object(pids, os.getpid())
        hook = KillJobWhileWriting(f"step-{args.kill_at:09d}", [os.getppid(), *pids])  # torchrun, every rank
    ckpt = checkpoint.make_async_checkpointer(commit_hook=hook)  # collective: every rank, same point
    mgr = checkpoint.CheckpointManager(
        args.root,
        checkpointer=ckpt,
        keep_last=3,
        keep_every=20,
        interval_steps=args.every,
        save_on_signals=(signal.SIGTERM,),
    )
    start = mgr.load(state)
    first = 0 if start is None else start + 1
    if rank == 0:
        print(
            f"[{world} ranks] {'fresh start' if start is None else f'resumed from step {start}'}", flush=True
        )

    for step in range(first, args.steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
        state["step"] = step
        saved = mgr.save(step, state)
        if rank == 0 and (saved or step % 10 == 0):
            print(
                f"step {step:3d}  loss {loss.item():.5f}{'  (checkpoint staged)' if saved else ''}",
                flush=True,
            )
        if mgr.preempted:
            break
    if not mgr.preempted:
        mgr.save(state["step"], state, force=True)  # the final state, whatever the interval
    mgr.close()  # waits for the last write, prunes old steps
    ckpt.close()
    if rank == 0:
        print(f"done; newest complete step: {mgr.latest_step()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
