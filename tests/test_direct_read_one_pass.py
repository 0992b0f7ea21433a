"""Verified local loads read each byte once, and check each window before it lands (issue 26, item 1).

A region that can land in its target as it is (a whole chunk into contiguous memory) used to be
read twice when verified: once through a scratch buffer to check every block, once into the target
with the blocks checked again. It is now read once, window by window through a cache-sized scratch
buffer: each window's blocks are checked there and only then copied into the target; a row block
that starts or ends inside a checksum block (a resharded load) lands the same way, its padding read,
checked and dropped, where it used to go through a private buffer. These tests
count the bytes read and pin the guarantee that remains: no byte of a failing block, nor any byte
after it in its region, reaches the target; what landed before it is the saved, verified value.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import checkpoint
from checkpoint.load.chunk_reader import ChunkReader
from checkpoint.load.direct_read import VERIFIED_WINDOW_BLOCKS
from checkpoint.load.loader import LoadOptions, load_checkpoint, read_metadata
from planners.boxes import Box
from planners.errors import CorruptCheckpointError
from planners.load_plan import LoadTarget
from planners.metadata import CHECKSUM_BLOCK_BYTES
from storage.local import LocalStorage

BLOCKS = 8  # the tensor spans 8 checksum blocks: 4 verified windows of 2 blocks
NUMEL = BLOCKS * CHECKSUM_BLOCK_BYTES // 4


class CountingStorage(LocalStorage):
    """LocalStorage that counts the bytes its direct reads (`reading`) hand out."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.direct_bytes = 0

    @contextlib.contextmanager
    def reading(self, name: str):
        with super().reading(name) as read_into:

            def counted(offset: int, out: memoryview) -> None:
                self.direct_bytes += len(out)
                read_into(offset, out)

            yield counted


@pytest.fixture
def saved(tmp_path) -> tuple[str, dict]:
    path = str(tmp_path / "ckpt")
    state = {"w": torch.arange(NUMEL, dtype=torch.float32), "b": torch.arange(10, dtype=torch.int64)}
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(state, path)
    ckpt.close()
    return path, state


def _load(path: str, target: dict, *, verify: bool) -> CountingStorage:
    storage = CountingStorage(path)
    try:
        load_checkpoint(storage, target, rank=0, world_size=1, options=LoadOptions(verify=verify))
    finally:
        storage.close()
    return storage


@pytest.mark.parametrize("verify", [True, False])
def test_a_direct_region_is_read_once_verified_or_not(saved, verify):
    path, state = saved
    target = {"w": torch.zeros(NUMEL), "b": torch.zeros(10, dtype=torch.int64)}
    storage = _load(path, target, verify=verify)
    assert storage.direct_bytes == NUMEL * 4 + 10 * 8  # every byte of both regions once, not twice
    assert torch.equal(target["w"], state["w"])
    assert torch.equal(target["b"], state["b"])


def _chunk_offset(path: str, key: str) -> tuple[str, int]:
    storage = LocalStorage(path)
    try:
        (chunk,) = read_metadata(storage).tensors[key].chunks
    finally:
        storage.close()
    return chunk.file, chunk.offset_bytes


def test_a_corrupt_block_and_the_rest_of_its_region_never_reach_the_target(saved):
    path, state = saved
    file, offset = _chunk_offset(path, "w")
    bad_block = 5  # inside the third window (blocks 4 and 5)
    with open(os.path.join(path, file), "r+b") as f:
        f.seek(offset + bad_block * CHECKSUM_BLOCK_BYTES + 12)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))
    target = {"w": torch.zeros(NUMEL), "b": torch.zeros(10, dtype=torch.int64)}
    with pytest.raises(CorruptCheckpointError) as info:
        _load(path, target, verify=True)
    lo = offset + bad_block * CHECKSUM_BLOCK_BYTES
    assert str(info.value) == (
        f"{path}: file {file}, key 'w': checksum mismatch in block {bad_block} "
        f"(bytes [{lo}, {lo + CHECKSUM_BLOCK_BYTES})); the file is corrupt"
    )
    landed = (bad_block // VERIFIED_WINDOW_BLOCKS) * VERIFIED_WINDOW_BLOCKS * CHECKSUM_BLOCK_BYTES // 4
    assert landed == 4 * CHECKSUM_BLOCK_BYTES // 4
    # The windows before the bad one hold the saved values; from the bad block's window on, nothing landed.
    assert torch.equal(target["w"][:landed], state["w"][:landed])
    assert torch.equal(target["w"][landed:], torch.zeros(NUMEL - landed))


def _read_box(path: str, offset: int, count: int) -> tuple[torch.Tensor, CountingStorage, int]:
    """Load elements [offset, offset + count) of "w" through a ChunkReader, as a resharded rank does."""
    storage = CountingStorage(path)
    metadata = read_metadata(storage)
    target = LoadTarget(
        fqn="w", dtype=torch.float32, global_shape=(NUMEL,), box=Box(offsets=(offset,), sizes=(count,))
    )
    dest = torch.zeros(count)
    reader = ChunkReader(storage, metadata, verify=True, io_threads=1)
    try:
        reader.run([(item, dest) for item in reader.plan(target, metadata.tensors["w"])])
    finally:
        storage.close()
    return dest, storage, reader.bytes_read


def test_a_row_block_inside_checksum_blocks_lands_directly_and_its_padding_is_checked(saved):
    path, state = saved
    per_block = CHECKSUM_BLOCK_BYTES // 4
    offset, count = per_block + 1000, 3 * per_block  # from inside block 1 to inside block 4
    dest, storage, read = _read_box(path, offset, count)
    assert torch.equal(dest, state["w"][offset : offset + count])
    assert storage.direct_bytes == read == 4 * CHECKSUM_BLOCK_BYTES  # blocks 1-4 read once, into no buffer

    # A flipped byte of block 4 after the region's end: not part of the box, but read, so checked.
    file, chunk_offset = _chunk_offset(path, "w")
    with open(os.path.join(path, file), "r+b") as f:
        f.seek(chunk_offset + 5 * CHECKSUM_BLOCK_BYTES - 8)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))
    with pytest.raises(CorruptCheckpointError, match=f"file {file}, key 'w': checksum mismatch in block 4 "):
        _read_box(path, offset, count)
