"""The load-side hardening holds for grid checkpoints (format version 2 with grid records).

A grid key's byte ranges come from its writer's shard header and its block
checksums from that file's `__shardsafe_crc32c__` table, not from the
metadata. So every single-bit flip is tried on the version-2 golden
two-rank checkpoint (whose DTensors are grid records): a flip of the
metadata is refused naming metadata.json; a flip of a shard file (data,
header or checksum table) is refused naming that file, or changes nothing a
load reads; `verify` reports every shard flip, blaming only that file.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

import checkpoint
from planners.errors import InvalidCheckpointError
from planners.grid import CHECKSUM_ENTRY
from planners.metadata import METADATA_FILE
from tests.damage import flipped_in_place, private_copy, read_file
from tests.golden.make_golden import GOLDEN_DIR, two_rank_global

GOLDEN = os.path.join(GOLDEN_DIR, "v2", "two_rank")


@pytest.fixture
def work(tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    return private_copy(GOLDEN, path)


def _assert_exact(loaded: dict[str, Any]) -> None:
    full = two_rank_global()
    for key in ("w", "b", "r"):
        assert torch.equal(loaded["model"][key], full[key]), key
    assert loaded["step"] == 77


def _shards() -> list[str]:
    return sorted(n for n in os.listdir(GOLDEN) if n.startswith("shard-"))


def test_the_golden_is_a_sealed_grid_checkpoint():
    doc = json.loads(read_file(GOLDEN, METADATA_FILE))
    assert doc["version"] == 2 and doc["digest"].startswith("sha256:")
    assert {k: "grid" in t for k, t in doc["tensors"].items()} == {
        "model.w": True,
        "model.b": True,
        "model.r": True,
    }
    for name in _shards():
        raw = read_file(GOLDEN, name)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert header[CHECKSUM_ENTRY]["dtype"] == "U32", name
    _assert_exact(checkpoint.make_sync_checkpointer().load(GOLDEN))


def test_every_metadata_bit_flip_of_a_grid_checkpoint_blames_the_metadata(work):
    raw = read_file(GOLDEN, METADATA_FILE)
    ckpt = checkpoint.make_sync_checkpointer()
    refused = 0
    for bit in flipped_in_place(work, METADATA_FILE, raw):
        try:
            _assert_exact(ckpt.load(work))
        except InvalidCheckpointError as e:
            message = str(e)
            # Blamed on the metadata (its parse names it first); a shard's name may appear only as a key in it.
            assert message.startswith(f"{work}: {METADATA_FILE}: "), (bit, message)
            refused += 1
    assert refused == len(raw) * 8


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_every_shard_bit_flip_of_a_grid_checkpoint_blames_that_shard(work, index):
    """Data, header and checksum-table flips: the load refuses naming the file or reads nothing changed."""
    shard = _shards()[index]
    raw = read_file(GOLDEN, shard)
    ckpt = checkpoint.make_sync_checkpointer()
    refused = 0
    for bit in flipped_in_place(work, shard, raw):
        try:
            _assert_exact(ckpt.load(work))
        except InvalidCheckpointError as e:
            assert shard in str(e), (bit, str(e))
            refused += 1
        report = checkpoint.verify(work)
        assert report.problems and all(shard in p for p in report.problems), (bit, report.problems)
    assert refused > 0
