"""Incremental checkpoints against full saves of the same state, in the same run (issue 27).

Three workloads, one process, the sync checkpointer on local disk:

- ``lora``: a frozen bf16 base (``layers`` square matrices) with a rank-``rank`` fp32 adapter per
  layer, AdamW on the adapter only (so the optimizer state is the adapter's);
- ``frozen_embedding``: a frozen fp32 embedding table beside dense fp32 layers trained with AdamW;
- ``dense``: every parameter trained with AdamW (nothing can be referenced: this measures the cost
  of detection, the XXH3 hash of every chunk).

Each round trains one step, then saves the state twice: whole (``save(state, path)``) and
incremental (``save(state, path, base=<the previous incremental step>)``), in alternating order,
and restores each into the model's own tensors. Reported per workload: median bytes written,
save seconds and restore seconds of each kind and their ratios (incremental / full), and the
seconds an incremental save spends detecting what changed (`DetectionClock`), as a share of a
full save's time.

    python -m benchmarks.incremental --out bench-out/incremental.json          # about 1 GB of state
    python -m benchmarks.incremental --scale 0.02 --rounds 2                    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import checkpoint

Workload = tuple[dict[str, Any], Callable[[], None]]  # (state dict, one training step)


def _adamw_state(params: dict[str, torch.Tensor]) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    tensors = {k: torch.nn.Parameter(v) for k, v in params.items()}
    optim = torch.optim.AdamW(list(tensors.values()), lr=1e-3)

    def step() -> None:
        for p in tensors.values():
            p.grad = torch.randn_like(p)
        optim.step()

    step()  # the moments exist from here on
    return optim, step


def _state(frozen: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> Workload:
    params = {k: v.clone() for k, v in trained.items()}
    optim, step = _adamw_state(params)
    model = {**frozen, **{k: p for k, p in zip(params, optim.param_groups[0]["params"])}}
    state = {"model": model, "optim": optim.state_dict(), "step": 0}
    return state, step


def lora(scale: float) -> Workload:
    d, layers, rank = max(64, int(4096 * scale**0.5)), 16, 8
    frozen = {f"base.{i}": torch.randn(d, d).to(torch.bfloat16) for i in range(layers)}
    trained = {
        f"lora.{i}.{ab}": torch.randn(*((rank, d) if ab == "a" else (d, rank)))
        for i in range(layers)
        for ab in "ab"
    }
    return _state(frozen, trained)


def frozen_embedding(scale: float) -> Workload:
    vocab, d = max(256, int(128_000 * scale)), 1024
    frozen = {"embedding": torch.randn(vocab, d)}
    trained = {f"dense.{i}": torch.randn(d, d) for i in range(max(1, int(24 * scale**0.5)))}
    return _state(frozen, trained)


def dense(scale: float) -> Workload:
    d = 1024
    trained = {f"dense.{i}": torch.randn(d, d) for i in range(max(1, int(64 * scale)))}
    return _state({}, trained)


WORKLOADS = {"lora": lora, "frozen_embedding": frozen_embedding, "dense": dense}


class DetectionClock:
    """Seconds spent detecting what changed: reading the base's index and hashing chunks.

    Wraps `plan_incremental` (trainer side) and `split_items` (writer side) of this process (the
    sync checkpointer runs both here), so the cost is measured directly instead of as the small
    difference of two noisy save times.
    """

    def __init__(self) -> None:
        import checkpoint.save.pipeline as pipeline
        import checkpoint.save.shard_files as shard_files

        self.secs = 0.0
        self._patched = [(pipeline, "plan_incremental"), (shard_files, "split_items")]
        self._originals = [getattr(m, n) for m, n in self._patched]
        for (module, name), original in zip(self._patched, self._originals):
            setattr(module, name, self._timing(original))

    def _timing(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.secs += time.perf_counter() - start

        return timed

    def close(self) -> None:
        for (module, name), original in zip(self._patched, self._originals):
            setattr(module, name, original)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, scale: float, rounds: int, root: str) -> dict[str, Any]:
    """Median bytes and seconds of full and incremental saves and restores of one workload."""
    state, train_step = WORKLOADS[name](scale)
    ckpt = checkpoint.make_sync_checkpointer()
    rows: dict[str, list[float]] = {
        k: [] for k in ("full_bytes", "inc_bytes", "full_save", "inc_save", "full_load", "inc_load", "detect")
    }
    clock = DetectionClock()
    try:
        ckpt.save(state, f"{root}/inc-0", incremental=True)  # the chain's first, full save
        for r in range(1, rounds + 1):
            train_step()
            state["step"] = r
            full = lambda r=r: ckpt.save(state, f"{root}/full-{r}")  # noqa: E731
            inc = lambda r=r: ckpt.save(state, f"{root}/inc-{r}", base=f"{root}/inc-{r - 1}")  # noqa: E731
            for kind, fn in (("full", full), ("inc", inc)) if r % 2 else (("inc", inc), ("full", full)):
                clock.secs = 0.0
                rows[f"{kind}_save"].append(_timed(fn))
                rows[f"{kind}_bytes"].append(ckpt.last_save.bytes_written)
                if kind == "inc":
                    rows["detect"].append(clock.secs)
            for kind in ("full", "inc") if r % 2 else ("inc", "full"):
                rows[f"{kind}_load"].append(_timed(lambda k=kind, r=r: ckpt.load(f"{root}/{k}-{r}", state)))
    finally:
        clock.close()
        ckpt.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    state_bytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    return {
        "workload": name,
        "state_bytes": state_bytes,
        **med,
        "bytes_ratio": med["inc_bytes"] / med["full_bytes"],
        "save_ratio": med["inc_save"] / med["full_save"],
        "load_ratio": med["inc_load"] / med["full_load"],
        "detect_ratio": med["detect"] / med["full_save"],
    }


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def table(results: list[dict[str, Any]]) -> str:
    """The README's markdown table."""
    lines = [
        "| workload | state | full save: bytes, s | incremental: bytes, s | bytes | save time | detection | restore time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['workload']} | {r['state_bytes'] / 2**20:.0f} MiB | {r['full_bytes'] / 2**20:.1f} MiB, "
            f"{r['full_save']:.3f} | {r['inc_bytes'] / 2**20:.2f} MiB, {r['inc_save']:.3f} | "
            f"{100 * r['bytes_ratio']:.2f}% | {100 * r['save_ratio']:.1f}% | {r['detect']:.3f} s "
            f"({100 * r['detect_ratio']:.1f}%) | {r['load_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.incremental", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scale", type=float, default=1.0, help="state size factor (1.0: about 1 GB in all)")
    parser.add_argument("--rounds", type=int, default=5, help="saves of each kind per workload (medians)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    args = parser.parse_args(argv)
    base = tempfile.mkdtemp(prefix="shardsafe-incremental-", dir=args.dir)
    try:
        results = [
            measure(w, args.scale, args.rounds, os.path.join(base, w)) for w in args.workloads.split(",")
        ]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
