"""Train a small FSDP2 model, checkpoint it, and resume on a different world size.

Run it twice with torchrun (the README's quickstart does both):

    torchrun --nproc-per-node 2 examples/fsdp2_resume.py --phase train  --dir /tmp/shardsafe-demo
    torchrun --nproc-per-node 3 examples/fsdp2_resume.py --phase resume --dir /tmp/shardsafe-demo

The train phase runs a few AdamW steps on 2 ranks (CPU, gloo), saves model,
optimizer, step counter and per-rank RNG state with shardsafe, and records
the full parameters and optimizer state it saved plus the loss of the next
step. The resume phase starts 3 fresh ranks, loads the checkpoint into its
own FSDP2 sharding (resharding 2 -> 3) and checks that parameters, optimizer
state and the next step's loss equal the recorded ones exactly. (Parameters
*after* that step differ in the last bits: FSDP averages gradients over 2
ranks in one run and 3 in the other, so the example reports that difference
instead of asserting it.)
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import checkpoint

STEPS_BEFORE_SAVE = 5


def build_model() -> nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank and in both phases
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch on every rank, whatever the world size (so losses compare exactly)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> float:
    x, y = batch(step)
    loss = nn.functional.mse_loss(model(x), y)
    optim.zero_grad()
    loss.backward()
    optim.step()
    return loss.item()


def full_values(tree: object) -> object:
    """Nested plain lists of every tensor (DTensors gathered), for an exact comparison across runs."""
    if isinstance(tree, dict):
        return {str(k): full_values(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [full_values(v) for v in tree]
    if isinstance(tree, DTensor):
        return tree.full_tensor().tolist()
    if isinstance(tree, torch.Tensor):
        return tree.tolist()
    return tree


def snapshot(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": full_values(model_sd), "optim": full_values(optim_sd["state"])}


def app_state(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> dict:
    model_sd, optim_sd = get_state_dict(model, optim)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "step": step,
        "rng": checkpoint.RankLocal(torch.get_rng_state()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["train", "resume"], required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = checkpoint.make_sync_checkpointer()
    path = os.path.join(args.dir, "step-5")
    record = os.path.join(args.dir, "expected.json")

    if args.phase == "train":
        for step in range(STEPS_BEFORE_SAVE):
            train_step(model, optim, step)
        ckpt.save(app_state(model, optim, STEPS_BEFORE_SAVE), path, overwrite=True)
        saved = snapshot(model, optim)
        loss = train_step(model, optim, STEPS_BEFORE_SAVE)
        after = full_values(model.state_dict())
        if rank == 0:
            with open(record, "w") as f:
                json.dump({"saved": saved, "loss": loss, "after": after}, f)
            print(
                f"[train] {world} ranks: saved {path} after {STEPS_BEFORE_SAVE} steps; next-step loss {loss:.6f}"
            )
    else:
        # The resumed job has another world size, so the rank-local RNG state cannot come back;
        # load everything else (the model and optimizer reshard 2 -> 3 ranks).
        state = app_state(model, optim, 0)
        del state["rng"]
        state = ckpt.load(path, state_dict=state, strict=True)
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        loaded = snapshot(model, optim)
        loss = train_step(model, optim, state["step"])
        after = model.state_dict()
        with open(record) as f:
            expected = json.load(f)
        same_state = loaded == expected["saved"]
        same_loss = loss == expected["loss"]
        drift = max(
            (v.full_tensor() - torch.tensor(expected["after"][k])).abs().max().item()
            for k, v in after.items()
        )
        if rank == 0:
            print(
                f"[resume] {world} ranks: loaded {path} at step {state['step']}: parameters and AdamW state "
                f"match exactly={same_state}; next-step loss {loss:.6f} (recorded {expected['loss']:.6f}) "
                f"match exactly={same_loss}; parameter drift after that step {drift:.2e}"
            )
        if not (same_state and same_loss and state["step"] == STEPS_BEFORE_SAVE):
            raise SystemExit("resumed run differs from the original")
    ckpt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
