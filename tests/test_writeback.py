"""Local shard files start their disk writeback while they are written (issue 26, item 2).

`storage.writeback` starts the writeback of every finished 16 MiB stretch of a shard file, so the
save's final fdatasync waits only for the tail. Durability is unchanged (that fdatasync still runs);
these tests pin where the stretches start and that the kernel call is really made on Linux.
"""

from __future__ import annotations

import os
import sys

import pytest

from storage.local import LocalStorage
from storage.writeback import WRITEBACK_STEP_BYTES, Writeback, start_writeback

MiB = 1024 * 1024


def test_writeback_starts_for_each_finished_stretch_of_the_file():
    calls = []
    wb = Writeback(7, step_bytes=16 * MiB, start=lambda fd, off, n: calls.append((fd, off, n)) or True)
    for total in range(5 * MiB, 61 * MiB, 5 * MiB):  # writes of 5 MiB, 60 MiB in all
        wb.written(total)
    assert calls == [(7, 0, 20 * MiB), (7, 20 * MiB, 20 * MiB), (7, 40 * MiB, 20 * MiB)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux-only")
def test_sync_file_range_is_called_for_real_on_linux(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * MiB)
        assert start_writeback(fd, 0, MiB) is True  # the optimisation is active, not silently missing
    finally:
        os.close(fd)


def test_a_shard_file_written_in_pieces_lands_whole(tmp_path):
    storage = LocalStorage(str(tmp_path))
    storage.prepare()
    piece = bytes(range(256)) * (MiB // 256)
    pieces = 2 * WRITEBACK_STEP_BYTES // MiB + 3  # crosses two writeback stretches, then a tail
    with storage.open_write("shard") as f:
        for _ in range(pieces):
            f.write(piece)
    with open(tmp_path / "shard", "rb") as f:
        data = f.read()
    assert len(data) == pieces * MiB
    assert data == piece * pieces
