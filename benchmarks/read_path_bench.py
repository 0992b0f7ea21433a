"""What the local read paths cost a warm load: memory map, `pread` buffers, and direct reads.

LocalStorage reads with `preadv`, so a shard truncated during a load is
reported as corruption instead of killing the process with SIGBUS (a memory
map's failure mode). Whole regions are read straight into their targets
(`checkpoint/load/direct_read.py`); other regions go through private buffers. This
compares three readers on a warm 256 MiB single-file checkpoint, loaded in
place into a preallocated target: a memory-mapped reader (the first
implementation, kept here only as a baseline), `pread` into buffers for every
region (the second), and the current LocalStorage (direct reads, verified in
one pass through a cache-sized window); the last line is the cost of
verification on the direct path, the measure of issue 26's goal 1.

    PYTHONPATH=$PWD python -m benchmarks.read_path_bench [--mib 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch

import checkpoint
from checkpoint.load.loader import LoadOptions, load_checkpoint
from storage.local import LocalStorage

MiB = 1 << 20


class MappedLocalStorage(LocalStorage):
    """The baseline: byte ranges as views of a private memory map of the file."""

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        fd, size = self._open_read(name)
        try:
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if size else None
        finally:
            os.close(fd)
        return [memoryview(m)[o : o + n] if m is not None else memoryview(b"") for o, n in ranges]

    reading = None  # no direct reads: every region comes from the map


class BufferedLocalStorage(LocalStorage):
    """`pread` into a fresh buffer for every region, then a copy into the target."""

    reading = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="checkpoint size (16 tensors)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="read-path-bench-")
    try:
        path = os.path.join(root, "ckpt")
        state = {f"t{i}": torch.randn(args.mib * MiB // 16 // 4) for i in range(16)}
        checkpoint.make_sync_checkpointer().save(state, path)
        target = {k: torch.empty_like(v) for k, v in state.items()}
        medians = {}
        for verify in (True, False):
            for label, storage_type in (
                ("mmap", MappedLocalStorage),
                ("pread buffers", BufferedLocalStorage),
                ("direct", LocalStorage),
            ):
                seconds = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    load_checkpoint(
                        storage_type(path), target, rank=0, world_size=1, options=LoadOptions(verify=verify)
                    )
                    seconds.append(time.perf_counter() - start)
                median = medians[(verify, label)] = statistics.median(seconds)
                print(
                    f"verify={verify} {label}: median {median * 1e3:.0f} ms "
                    f"({args.mib / 1024 / median:.2f} GiB/s) over {args.repeats} warm loads"
                )
                assert all(torch.equal(target[k], state[k]) for k in state)
        ratio = medians[(True, "direct")] / medians[(False, "direct")]
        print(
            f"direct: verified / unverified {ratio:.2f}x (issue 26 goal: <= 1.2x; "
            f"load average {os.getloadavg()[0]:.1f})"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
