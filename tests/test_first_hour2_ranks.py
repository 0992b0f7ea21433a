"""Issue 25, "the first hour, round two", under torchrun: only rank 0 calls save() in an FSDP loop.

The user's script runs as they ran it: `torchrun --nproc-per-node 2 train.py` with FSDP2 on gloo.
Before the save's first exchange went through the job's store, gloo paired rank 0's gather with
rank 1's next FSDP all-gather and aborted rank 0 with `gloo::EnforceNotMet ... collective
mismatch`; now rank 0 names the rank that did not call save().
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parent.parent

_ONLY_RANK_0_SAVES = """
    import datetime, sys, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    import checkpoint

    # The group's timeout (8 s here, 30 min by default) bounds every wait; rank 0 gives up at 3/4 of it.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=8))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = checkpoint.make_sync_checkpointer()
    for step in range(3):
        model(torch.ones(2, 8)).sum().backward()
        optim.step()
        optim.zero_grad()
        if rank == 0:  # the mistake: save() is collective
            ckpt.save({"model": model.state_dict(), "step": step}, f"ckpts/step-{step}")
    ckpt.close()
    dist.destroy_process_group()
"""


def test_only_rank_0_saving_in_an_fsdp_loop_names_the_rank_that_did_not_call_save(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(textwrap.dedent(_ONLY_RANK_0_SAVES))
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "EnforceNotMet" not in output and "collective mismatch" not in output, output
    assert (
        "checkpoint.DistributedCheckpointError: rank 0: save() is collective and rank(s) [1] did not call it "
        "within 6s: every rank must call save() with its own part of the state (inside an FSDP loop too: "
        "`if rank == 0: save(...)` leaves the others in their next collective)"
    ) in output, output
    assert "rank 1: never called save()" in output
    waits = [line for line in output.splitlines() if "waiting" in line and "at the start of a save" in line]
    assert waits, output
    assert all(
        line.endswith(
            "at the start of a save for rank(s) 1, which have not called save() (still training, stuck, or "
            "not calling save() at all: every rank must call it)"
        )
        for line in waits
    ), waits
    # Nothing was written: the save never got past its first exchange.
    assert not (tmp_path / "ckpts").exists()
