"""Why a save can beat `dd conv=fdatasync` of the same bytes here: when the disk is asked to write.

`dd` hands the kernel all of its bytes and then calls `fdatasync` once, so the disk writes only
at the end; shardsafe's writer starts the writeback of every finished 16 MiB of a shard file
(`storage/writeback.py`), so the final sync waits for the tail only. This writes 256 MiB five
ways, interleaved, each after `sync` (no pending writes): `dd` from /dev/zero, and Python
writes of 16 MiB slices, random bytes or zeros, plain (one `fdatasync` at the end, as `dd`) or
with the writeback started every 16 MiB. It shows the spread of `dd` itself on this VM's disk.

    PYTHONPATH=$PWD python -m benchmarks.dd_reference [--mib 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import numpy

from storage.writeback import Writeback

MiB = 1 << 20
SLICE = 16 * MiB


def _python_write(path: str, nbytes: int, piece: Callable[[int], memoryview | bytes], kick: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        writeback, total = Writeback(fd), 0
        for offset in range(0, nbytes, SLICE):
            total += os.write(fd, piece(offset))
            if kick:
                writeback.written(total)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    nbytes = args.mib * MiB // SLICE * SLICE
    data = memoryview(numpy.random.default_rng(0).integers(0, 256, nbytes, dtype=numpy.uint8))
    zeros = bytes(SLICE)
    root = tempfile.mkdtemp(prefix="dd-reference-", dir=os.getcwd())
    path = os.path.join(root, "file.bin")
    dd = shutil.which("dd")
    ways: dict[str, Callable[[], None]] = {
        "python, random, plain": lambda: _python_write(path, nbytes, lambda o: data[o : o + SLICE], False),
        "python, random, writeback every 16 MiB": lambda: _python_write(
            path, nbytes, lambda o: data[o : o + SLICE], True
        ),
        "python, zeros, plain": lambda: _python_write(path, nbytes, lambda o: zeros, False),
        "python, zeros, writeback every 16 MiB": lambda: _python_write(path, nbytes, lambda o: zeros, True),
    }
    if dd is not None:
        command = [dd, "if=/dev/zero", f"of={path}", "bs=16M", f"count={nbytes}", "iflag=count_bytes"]
        ways["dd conv=fdatasync"] = lambda: subprocess.run(
            [*command, "conv=fdatasync", "status=none"], check=True
        )
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.repeats):
            for name, write in ways.items():
                os.sync()
                start = time.perf_counter()
                write()
                seconds[name].append(time.perf_counter() - start)
                os.unlink(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, samples in seconds.items():
        print(
            f"{name:40s} median {statistics.median(samples):.3f} s  [{min(samples):.3f}-{max(samples):.3f}]"
        )


if __name__ == "__main__":
    main()
