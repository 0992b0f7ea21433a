"""The pure integrity helpers: block checksums (planners/checksums.py) and leftover names (planners/leftovers.py).

Writers, loads and `verify` all go through these, so their contract is pinned here in one process; the end-to-end
behaviour (a flipped byte fails the load, verify names the block) is in tests/test_integrity.py.
"""

from __future__ import annotations

import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from planners.checksums import bad_blocks, block_checksums, block_span
from planners.leftovers import leftover_names

BLOCK = 16


def test_block_checksums_cover_each_block_and_a_short_last_one() -> None:
    data = bytes(range(40))

    assert block_checksums(data, BLOCK) == [
        crc32c.crc32c(data[0:16]),
        crc32c.crc32c(data[16:32]),
        crc32c.crc32c(data[32:40]),
    ]
    assert block_checksums(b"", BLOCK) == []


@settings(max_examples=50, deadline=None)
@given(data=st.binary(min_size=1, max_size=200), flip=st.integers(min_value=0), first=st.integers(0, 3))
def test_bad_blocks_names_exactly_the_block_with_a_flipped_byte(data: bytes, flip: int, first: int) -> None:
    # `data` is the tail of a chunk that starts `first` blocks earlier.
    expected = [0] * first + block_checksums(data, BLOCK)
    at = flip % len(data)
    corrupt = bytearray(data)
    corrupt[at] ^= 0xFF

    assert bad_blocks(data, expected, BLOCK, first_block=first) == []
    assert bad_blocks(bytes(corrupt), expected, BLOCK, first_block=first) == [first + at // BLOCK]


def test_bad_blocks_lists_every_bad_block_and_skips_checked_ones() -> None:
    data = bytes(64)
    expected = block_checksums(data, BLOCK)
    corrupt = bytearray(data)
    corrupt[0] = corrupt[20] = corrupt[63] = 1

    assert bad_blocks(bytes(corrupt), expected, BLOCK) == [0, 1, 3]
    assert bad_blocks(bytes(corrupt), expected, BLOCK, skip=lambda i: i == 1) == [0, 3]
    assert bad_blocks(memoryview(bytes(corrupt))[32:], expected, BLOCK, first_block=2) == [3]


def test_block_span_is_file_relative_and_ends_at_the_chunk() -> None:
    assert block_span(0, BLOCK, offset_bytes=100, nbytes=40) == (100, 116)
    assert block_span(2, BLOCK, offset_bytes=100, nbytes=40) == (132, 140)


def test_leftovers_are_shard_files_of_other_saves_and_temporary_metadata() -> None:
    names = [
        "metadata.json",
        "shard-aaaaaaaa-r00000-000.safetensors",  # the committed save
        "shard-bbbbbbbb-r00001-002.safetensors",  # a save in progress
        "shard-cccccccc-r00000-000.safetensors",  # a crashed save
        ".metadata.json.tmp-1234",
        "notes.txt",  # the user's: never a leftover
        "shard-cccccccc-r00000-000.safetensors.bak",
        ".in-progress-bbbbbbbb",  # markers are checkpoint/save/lease.py's business
    ]

    assert leftover_names(names, keep={"aaaaaaaa", "bbbbbbbb"}) == [
        "shard-cccccccc-r00000-000.safetensors",
        ".metadata.json.tmp-1234",
    ]
    assert leftover_names(names, keep={"aaaaaaaa"}) == [
        "shard-bbbbbbbb-r00001-002.safetensors",
        "shard-cccccccc-r00000-000.safetensors",
        ".metadata.json.tmp-1234",
    ]
