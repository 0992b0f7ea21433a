"""Where a verified warm load's time goes, piece by piece (issue 26, goal 1: verified <= 1.2x unverified).

A verified local load reads each 1 MiB window into a scratch buffer that stays in the CPU cache,
checks its CRC-32C blocks there, and only then copies it into the target
(`checkpoint/load/direct_read.py`), so no unverified byte ever reaches a target. This times
the pieces of that path on one warm file, interleaved, in one process, against the unverified
read straight into the target:

- `direct`: `preadv` into the target in 8 MiB windows (what `verify=False` does);
- `scratch+copy`: the verified path with no checksum at all: the hop through the cache;
- `scratch+crc32c+copy`: the verified path as shipped;
- `scratch+xxh3+copy`: the same with XXH3-64 (about twice CRC-32C's speed here) in place
  of CRC-32C, which would be a new checkpoint format;
- `target+crc32c`, `target+xxh3`: read into the target and check it there, which is fast
  because the bytes are still in cache, but lets unverified bytes reach the target, which the
  integrity section rules out.

The target is a torch tensor, as in a load (4 KiB pages; numpy's own arrays get huge pages
and time differently).

    PYTHONPATH=$PWD python -m benchmarks.verify_floor [--mib 256] [--repeats 11]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import crc32c
import numpy
import torch
import xxhash

MiB = 1 << 20
BLOCK = 512 * 1024  # the checkpoint's checksum block
WINDOW = 2 * BLOCK  # the verified read window (direct_read.VERIFIED_WINDOW_BLOCKS)


def _paths(fd: int, target: numpy.ndarray) -> dict[str, Callable[[], None]]:
    total = len(target)
    out = memoryview(target)
    scratch = numpy.empty(WINDOW, dtype=numpy.uint8)
    view = memoryview(scratch)

    def direct() -> None:
        for o in range(0, total, 8 * MiB):
            os.preadv(fd, [out[o : o + 8 * MiB]], o)

    def through_scratch(check: Callable[[memoryview], int] | None) -> Callable[[], None]:
        def run() -> None:
            for o in range(0, total, WINDOW):
                os.preadv(fd, [view], o)
                if check is not None:
                    for b in range(0, WINDOW, BLOCK):
                        check(view[b : b + BLOCK])
                numpy.copyto(target[o : o + WINDOW], scratch)

        return run

    def in_target(check: Callable[[memoryview], int]) -> Callable[[], None]:
        def run() -> None:
            for o in range(0, total, WINDOW):
                os.preadv(fd, [out[o : o + WINDOW]], o)
                for b in range(o, o + WINDOW, BLOCK):
                    check(out[b : b + BLOCK])

        return run

    return {
        "direct": direct,
        "scratch+copy": through_scratch(None),
        "scratch+crc32c+copy": through_scratch(crc32c.crc32c),
        "scratch+xxh3+copy": through_scratch(xxhash.xxh3_64_intdigest),
        "target+crc32c": in_target(crc32c.crc32c),
        "target+xxh3": in_target(xxhash.xxh3_64_intdigest),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    total = args.mib * MiB // WINDOW * WINDOW
    with tempfile.NamedTemporaryFile(prefix="verify-floor-") as f:
        f.write(os.urandom(total))
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        target = torch.empty(total, dtype=torch.uint8)
        target.fill_(1)  # faulted in, as a model's tensors are
        paths = _paths(fd, target.numpy())
        for run in paths.values():  # warm: page cache, caches, first-call costs
            run()
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, run in paths.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
        os.close(fd)
    base = statistics.median(seconds["direct"])
    for name, samples in seconds.items():
        median = statistics.median(samples)
        print(f"{name:22s} {median * 1e3:6.1f} ms  {median / base:4.2f}x direct")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
