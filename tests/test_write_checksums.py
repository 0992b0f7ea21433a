"""Checksums computed beside the writes (storage/safetensors_io.write_entries, issue 26 goal 2).

Files over one 16 MiB write slice checksum each slice on a second thread while it is written;
smaller ones in the writing thread. Both must record exactly the CRC-32C of every 512 KiB block
of the bytes that landed in the file, in order, for tensors that end inside a block too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planners.checksums import block_checksums
from storage.checksummed_shard import write_checksummed_shard
from storage.safetensors_io import WRITE_SLICE_BYTES

BLOCK = 512 * 1024


@pytest.mark.parametrize("total_mib", [3, 40])  # one slice (no thread) and several (the threaded path)
def test_recorded_checksums_are_those_of_the_bytes_in_the_file(tmp_path: Path, total_mib: int) -> None:
    gen = torch.Generator().manual_seed(total_mib)
    sizes = [total_mib * (1 << 20) // 4 // 2, total_mib * (1 << 20) // 4 // 2 - 999, 12345]
    entries = [(f"t{i}", torch.randn(n, generator=gen)) for i, n in enumerate(sizes)]
    assert (sum(sizes) * 4 > WRITE_SLICE_BYTES) == (total_mib > 16)
    path = tmp_path / "shard.safetensors"
    with open(path, "wb", buffering=0) as f:
        written, size = write_checksummed_shard(f, entries, metadata={"k": "v"}, block_bytes=BLOCK)
    raw = path.read_bytes()
    assert len(raw) == size
    for (key, tensor), w in zip(entries, written, strict=True):
        landed = raw[w.offset_bytes : w.offset_bytes + w.nbytes]
        assert w.key == key and landed == tensor.numpy().tobytes()
        assert list(w.checksums) == block_checksums(landed, BLOCK)
        assert len(w.checksums) == -(-w.nbytes // BLOCK)
