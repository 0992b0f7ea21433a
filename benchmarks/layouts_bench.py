"""Resharded loads between 3-D layouts: bytes read against bytes needed, and time against a same-layout load.

A model of `--mib` MiB (fp32 Linear layers) is saved on 4 gloo ranks as FSDP2
over the `dp` dim of a 2x2 `dp x tp` mesh (each `tp` rank's sub-mesh holds a
whole copy: sub-mesh replicas), then loaded, each on fresh targets:

- into the same layout on 4 ranks (the baseline);
- into 2 pipeline stages x 2 FSDP2 ranks on 4 ranks;
- into plain FSDP2 on 3 ranks.

Per load: the bytes the loader read (its own count, from the INFO line it
logs per load: shard bytes plus headers and checksum tables) over the bytes
the targets hold (every rank's local shards, replicas included, so a
replica group that fills its own copy counts its copy), and the slowest
rank's wall time over the same-layout load's (median of `--repeats`).

    PYTHONPATH=$PWD python -m benchmarks.layouts_bench [--mib 64] [--width 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import checkpoint
from checkpoint.testing.ranks import run_ranks

MiB = 1 << 20
# Each layer is width x width fp32 plus its bias. A partial read of a chunk is widened to its checksum
# blocks (512 KiB) so that what is read can be verified: with small tensors that dominates the bytes read.
DEFAULT_WIDTH = 2048
_LOADED = re.compile(r"loaded .* on rank \d+: (\d+) bytes read")


class _Count(logging.Handler):
    """The bytes the loader reports having read, from its one INFO line per load."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bytes = 0

    def emit(self, record: logging.LogRecord) -> None:
        m = _LOADED.match(record.getMessage())
        if m:
            self.bytes += int(m.group(1))


def _model(mib: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = max(2, mib * MiB // (width * width * 4))
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def _state(layout: str, rank: int, world_size: int, mib: int, width: int) -> dict:
    model = _model(mib, width)
    names = [str(i) for i in range(len(model))]
    if layout == "submesh":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["dp"]
        for layer in model:
            fully_shard(layer, mesh=mesh)
        module: nn.Module = model
    elif layout == "pp_fsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))["dp"]
        half = len(names) // 2
        mine = names[:half] if rank < 2 else names[half:]
        module = nn.ModuleDict({n: model[int(n)] for n in mine})
        for layer in module.values():
            fully_shard(layer, mesh=mesh)
    else:  # plain FSDP2 on any world size
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        module = model
    return {"model": module.state_dict()}


def _held_bytes(state: dict) -> int:
    total = 0
    for t in state["model"].values():
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _save(rank: int, world_size: int, path: str, mib: int, width: int) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_state("submesh", rank, world_size, mib, width), path)
    ckpt.close()


def _load(
    rank: int, world_size: int, path: str, layout: str, mib: int, width: int, repeats: int
) -> list[tuple]:
    """(seconds, bytes read, bytes held) of each repeat on this rank."""
    ckpt = checkpoint.make_sync_checkpointer()
    count = _Count()
    logger = logging.getLogger("checkpoint.load.loader")
    logger.addHandler(count)
    logger.setLevel(logging.INFO)
    out = []
    for _ in range(repeats):
        state = _state(layout, rank, world_size, mib, width)
        count.bytes = 0
        torch.distributed.barrier()
        start = time.perf_counter()
        ckpt.load(path, state_dict=state, strict=True)
        torch.distributed.barrier()
        out.append((time.perf_counter() - start, count.bytes, _held_bytes(state)))
    ckpt.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="rows (and columns) of each layer")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="shardsafe-layouts-")
    try:
        path = os.path.join(root, "ckpt")
        run_ranks(_save, 4, path, args.mib, args.width, timeout_secs=600)
        rows = {}
        for name, layout, world in (
            ("same layout (4)", "submesh", 4),
            ("PP x FSDP (4)", "pp_fsdp", 4),
            ("FSDP2 (3)", "fsdp", 3),
        ):
            per_rank = run_ranks(
                _load, world, path, layout, args.mib, args.width, args.repeats, timeout_secs=600
            )
            seconds = statistics.median(max(r[i][0] for r in per_rank) for i in range(args.repeats))
            read = sum(r[0][1] for r in per_rank)
            held = sum(r[0][2] for r in per_rank)
            rows[name] = {"seconds": seconds, "bytes_read": read, "bytes_needed": held}
        base = rows["same layout (4)"]["seconds"]
        print(f"{'load into':<16} {'s (median, slowest rank)':>25} {'vs same':>8} {'read/needed':>12}")
        for name, r in rows.items():
            r["time_ratio"] = r["seconds"] / base
            r["read_ratio"] = r["bytes_read"] / r["bytes_needed"]
            print(f"{name:<16} {r['seconds']:>25.3f} {r['time_ratio']:>7.2f}x {r['read_ratio']:>11.3f}x")
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
