"""Rank functions and a sweep child for tests/test_incremental_ranks.py (module level: spawned ranks import them)."""

from __future__ import annotations

import os
import signal

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import checkpoint
from tests.fsdp_workers import assert_same, build, snapshot, train


def _lora_like(world_size: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The FSDP2 MLP with its first layer frozen (the "base") and AdamW on the rest only."""
    model = build("fsdp", world_size, seed=seed)
    for p in model.up.parameters():
        p.requires_grad_(False)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def save_incremental_chain(rank: int, world_size: int, root: str) -> tuple[dict, list[int]] | None:
    """Train and save steps 1 (full, hashes), 2 (base 1) and 3 (base 2); rank 0 returns the state and bytes."""
    model, optim = _lora_like(world_size, seed=0)
    ckpt = checkpoint.make_sync_checkpointer()
    written = []
    for step in (1, 2, 3):
        train(model, optim, 2)
        model_sd, optim_sd = get_state_dict(model, optim)
        options = {"incremental": True} if step == 1 else {"base": f"{root}/step-{step - 1}"}
        ckpt.save({"model": model_sd, "optim": optim_sd, "step": step}, f"{root}/step-{step}", **options)
        written.append(ckpt.last_save.bytes_written)
    ckpt.close()
    snap = snapshot(model, optim)
    return (snap, written) if rank == 0 else None


def load_incremental(rank: int, world_size: int, path: str, expected: dict) -> str:
    """Load the incremental step into a differently initialised model on this world size; compare exactly."""
    model, optim = _lora_like(world_size, seed=123)
    model_sd, optim_sd = get_state_dict(model, optim)
    ckpt = checkpoint.make_sync_checkpointer()
    loaded = ckpt.load(path, state_dict={"model": model_sd, "optim": optim_sd, "step": 0}, strict=True)
    set_state_dict(model, optim, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert loaded["step"] == 3
    assert_same(expected, snapshot(model, optim))
    ckpt.close()
    return "ok"


def sweep(root: str, kill_before: int = 0) -> int:
    """Run retention (keep_last=2, step 4 just committed) on `root`; returns how many removal calls it made.

    With `kill_before` > 0 the process SIGKILLs itself just before its `kill_before`-th removal (run it
    in a forked child).
    """
    from checkpoint.manager.retention import RetentionPolicy, prune
    from storage.local import LocalStorage
    from storage.spec import StorageSpec

    calls = [0]
    remove = LocalStorage.remove

    def counted(self, names):
        calls[0] += 1
        if calls[0] == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        return remove(self, names)

    LocalStorage.remove = counted
    try:
        prune(StorageSpec.resolve(root), RetentionPolicy(keep_last=2), {4}, unloadable=(), warned=set())
    finally:
        LocalStorage.remove = remove
    return calls[0]


def save_unchanged_dtensors(rank: int, world_size: int, root: str) -> int:
    """Save the golden two-rank state twice, the second referencing the first; returns bytes written."""
    from tests.golden.make_golden import two_rank_state

    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(two_rank_state(rank, world_size), f"{root}/step-1", incremental=True)
    ckpt.save(two_rank_state(rank, world_size), f"{root}/step-2", base=f"{root}/step-1")
    written = ckpt.last_save.bytes_written
    ckpt.close()
    return written
