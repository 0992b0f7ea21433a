"""When an async save returns, and when its tensors may change (the README's "Async saves").

An async `save()` returns once the plan is agreed and the copy into the
staging buffer has started; the copy finishes later, on a background thread,
and only then (`stage_future` done) may training modify the saved tensors.
This prints, for each save of one rank's state dict, the milliseconds from
the call until `save()` returned, until `stage_future` completed, and until
`write_future` completed (committed). The first save, which starts the writer
process and allocates the staging buffer, is left out of the summary.

Run: `python -m benchmarks.async_return --mib 64 --saves 6`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import checkpoint


def measure(mib: int, saves: int, directory: str) -> list[tuple[float, float, float]]:
    """(returned, staged, committed) in milliseconds after each `save()` call."""
    state = {"w": torch.randn(mib * 2**20 // 4), "step": 0}
    ckpt = checkpoint.make_async_checkpointer()
    rows = []
    try:
        for i in range(saves):
            start = time.perf_counter()
            stage_future, write_future = ckpt.save(state, f"{directory}/save-{i}")
            returned = time.perf_counter()
            stage_future.result()
            staged = time.perf_counter()
            write_future.result()
            committed = time.perf_counter()
            rows.append(tuple((t - start) * 1000 for t in (returned, staged, committed)))
    finally:
        ckpt.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="size of the state dict (MiB, one tensor)")
    parser.add_argument("--saves", type=int, default=6, help="saves; the first is left out of the summary")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        rows = measure(args.mib, args.saves, directory)
    for i, (returned, staged, committed) in enumerate(rows):
        print(
            f"save {i}: save() returned {returned:.1f} ms, staged {staged:.1f} ms, committed {committed:.1f} ms"
        )
    steady = rows[1:] or rows
    for name, col in (("returned", 0), ("staged", 1), ("committed", 2)):
        values = [r[col] for r in steady]
        print(
            f"{name}: median {statistics.median(values):.1f} ms, range {min(values):.1f}-{max(values):.1f} ms"
        )


if __name__ == "__main__":
    main()
