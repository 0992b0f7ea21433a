"""Write the golden checkpoints of the current format version under tests/golden/v<version>/.

Golden checkpoints are written once per format version and committed; the
test suite loads them forever after (tests/test_golden.py), so a change that
breaks reading old checkpoints fails CI. Never regenerate an existing
version's directory: add the next version's beside it.

Run from the repository root:

    python -m tests.golden.make_golden            # refuses to overwrite an existing version
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # also runnable as a plain script
    sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
from planners.metadata import FORMAT_VERSION  # noqa: E402

logger = logging.getLogger(__name__)

GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")


def single_rank_state() -> dict[str, Any]:
    """Every kind of leaf a one-process job saves, with fixed values."""
    return {
        "model": {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 1,
            "b16": torch.tensor([1.5, -2.0, 3.25, 0.0, 1e-3], dtype=torch.bfloat16),
            "h": torch.tensor([[0.5, -0.25], [8.0, 65504.0]], dtype=torch.float16),
        },
        "ints": [
            torch.tensor([-(2**40), -1, 0, 2**40], dtype=torch.int64),
            torch.tensor([0, 127, 255], dtype=torch.uint8),
            torch.tensor([[True, False, True], [False, False, True]]),
        ],
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "step": 1000,
        "lr": 0.5,
        "inf": float("inf"),
        "cfg": {"betas": (0.9, 0.999), 0: "int key", "name": "golden", "none": None},
        "rng": checkpoint.RankLocal(torch.tensor([7, 8], dtype=torch.int64)),
        "pos": checkpoint.RankLocal({"epoch": 3, "batch": 17}),
    }


def two_rank_global() -> dict[str, torch.Tensor]:
    """The full tensors the two ranks shard between them."""
    return {
        "w": torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8,
        "b": (torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5).to(torch.bfloat16),
        "r": torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32),
    }


def two_rank_state(rank: int, world_size: int) -> dict[str, Any]:
    """Row-sharded, column-sharded and replicated tensors, plus per-rank values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = two_rank_global()
    return {
        "model": {
            "w": distribute_tensor(full["w"], mesh, [Shard(0)]),
            "b": distribute_tensor(full["b"], mesh, [Shard(1)]),
            "r": distribute_tensor(full["r"], mesh, [Replicate()]),
        },
        "step": 77,
        "rng": checkpoint.RankLocal(torch.tensor([rank, rank + 10], dtype=torch.int64)),
        "pos": checkpoint.RankLocal({"rank": rank}),
    }


def _save_two_ranks(rank: int, world_size: int, path: str) -> None:
    checkpoint.make_sync_checkpointer().save(two_rank_state(rank, world_size), path)


def _save_two_ranks_incremental(rank: int, world_size: int, path: str, base: str) -> None:
    """Format version 3: `base` holds the state with another 'w'; `path` references the rest of it."""
    from torch.distributed.tensor import DTensor

    ckpt = checkpoint.make_sync_checkpointer()
    changed = two_rank_state(rank, world_size)
    w: DTensor = changed["model"]["w"]
    changed["model"]["w"] = DTensor.from_local(w.to_local() + 100, w.device_mesh, w.placements)
    ckpt.save(changed, base, incremental=True)
    ckpt.save(two_rank_state(rank, world_size), path, base=base)


def _save_single_incremental(path: str, base: str) -> None:
    """Format version 3: `base` holds the state with another 'w'; `path` references the rest of it."""
    ckpt = checkpoint.make_sync_checkpointer()
    changed = single_rank_state()
    changed["model"]["w"] = changed["model"]["w"] + 100
    ckpt.save(changed, base, incremental=True)
    ckpt.save(single_rank_state(), path, base=base)


def main() -> None:
    from checkpoint.testing.ranks import run_ranks

    out = os.path.join(GOLDEN_DIR, f"v{FORMAT_VERSION}")
    if os.path.exists(out):
        raise SystemExit(f"{out} exists: golden checkpoints of a released version are never rewritten")
    if FORMAT_VERSION >= 3:  # incremental checkpoints (planners.references), each beside its base
        _save_single_incremental(os.path.join(out, "single"), os.path.join(out, "single-base"))
        run_ranks(
            _save_two_ranks_incremental, 2, os.path.join(out, "two_rank"), os.path.join(out, "two_rank-base")
        )
    else:
        checkpoint.make_sync_checkpointer().save(single_rank_state(), os.path.join(out, "single"))
        run_ranks(_save_two_ranks, 2, os.path.join(out, "two_rank"))
    logger.info("wrote golden checkpoints of format version %d to %s", FORMAT_VERSION, out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
