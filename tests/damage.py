"""Helpers for tests that damage a private copy of a checkpoint: read or replace one of its files, flip its bits.

Shared by the hardening tests (metadata digest, grid checksums, hostile input), so that each one
says only what it damages and what error it expects.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator


def private_copy(original: str, dest: str) -> str:
    """Copy the checkpoint directory `original` to `dest` (a test's own directory) and return `dest`."""
    shutil.copytree(original, dest)
    return dest


def read_file(path: str, name: str) -> bytes:
    """The bytes of file `name` of the checkpoint at `path`."""
    with open(os.path.join(path, name), "rb") as f:
        return f.read()


def put_file(path: str, name: str, data: bytes) -> None:
    """Replace file `name` of the checkpoint at `path` with `data`."""
    with open(os.path.join(path, name), "wb") as f:
        f.write(data)


def bit_flips(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Every single-bit variant of `data`, with the index of the flipped bit (bit 0: the low bit of byte 0)."""
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        yield bit, bytes(flipped)


def flipped_in_place(path: str, name: str, data: bytes) -> Iterator[int]:
    """Write each single-bit variant of `data` over file `name` of the checkpoint at `path`; yield the bit."""
    for bit, flipped in bit_flips(data):
        put_file(path, name, flipped)
        yield bit
