"""Hostile edits of the version-2 golden checkpoint's metadata, each sealed with a valid digest.

A digest only proves that nobody damaged the file by accident; anyone can write one. So each
hostile document here is sealed again after its edit, and what it tests is the parser's bounds
(mesh sizes, splits, cells), not the digest. Shared by tests/test_hostile_metadata.py and the
property test (tests/test_hostile_metadata_property.py), which seeds itself with these cases.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

from planners.digest import seal
from planners.metadata import METADATA_FILE
from tests.golden.make_golden import GOLDEN_DIR

GOLDEN_V2 = os.path.join(GOLDEN_DIR, "v2", "two_rank")


def golden_doc() -> dict[str, Any]:
    """The golden two-rank version-2 metadata as a JSON document (digest included)."""
    with open(os.path.join(GOLDEN_V2, METADATA_FILE), "rb") as f:
        return json.loads(f.read())


def write_checkpoint(dest: str, doc: dict[str, Any]) -> str:
    """A copy of the golden shard files at `dest` under the metadata `doc`, sealed; returns `dest`."""
    copy_shards(dest)
    write_metadata(dest, doc)
    return dest


def copy_shards(dest: str) -> None:
    """The golden checkpoint's shard files, copied into `dest` (created)."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(GOLDEN_V2):
        if name != METADATA_FILE:
            shutil.copyfile(os.path.join(GOLDEN_V2, name), os.path.join(dest, name))


def write_metadata(dest: str, doc: dict[str, Any]) -> None:
    """`doc` sealed with its digest as `dest`'s metadata.json."""
    with open(os.path.join(dest, METADATA_FILE), "wb") as f:
        f.write(seal(doc))


def huge_unused_mesh(ranks: int = 1 << 28) -> dict[str, Any]:
    """Case 8: a mesh of `ranks` ranks by first_rank/rank_step that no tensor uses."""
    doc = _resized(golden_doc(), ranks)
    doc["meshes"].append({"shape": [ranks], "first_rank": 0, "rank_step": 1})
    return doc


def huge_split(split: int = 1 << 20, mesh: int = 1024) -> dict[str, Any]:
    """Case 9: `model.w` strided-sharded into `split` pieces over a mesh of `mesh` ranks."""
    doc = _resized(golden_doc(), mesh)
    doc["meshes"].append({"shape": [mesh], "first_rank": 0, "rank_step": 1})
    doc["tensors"]["model.w"]["shape"] = [1 << 30, 4]
    doc["tensors"]["model.w"]["grid"] = {"mesh": 1, "placements": [["strided_shard", 0, split]]}
    return doc


def many_cells(keys: int = 8, side: int = 1024) -> dict[str, Any]:
    """Case 10: `keys` grid keys, each cut into side x side chunks on a side x side mesh; two files."""
    doc = _resized(golden_doc(), side * side)
    doc["meshes"].append({"shape": [side, side], "first_rank": 0, "rank_step": 1})
    for i in range(keys):
        doc["tensors"][f"model.g{i}"] = {
            "dtype": "float32",
            "shape": [side, side],
            "grid": {"mesh": 1, "placements": [["shard", 0], ["shard", 1]]},
        }
        doc["structure"]["dict"].append([f"g{i}", {"tensor": f"model.g{i}"}])
    return doc


def huge_claim(nbytes_log2: int = 44) -> dict[str, Any]:
    """Case 12: `model.r` (replicated, int32) claims 2**nbytes_log2 bytes; the files hold 20."""
    doc = golden_doc()
    doc["tensors"]["model.r"]["shape"] = [1 << (nbytes_log2 - 2)]
    return doc


def _resized(doc: dict[str, Any], world_size: int) -> dict[str, Any]:
    """`doc` claiming `world_size` ranks; its rank-local keys (one entry per rank) are dropped."""
    doc["world_size"] = world_size
    doc["rank_local"] = {}
    doc["structure"] = _without(doc["structure"], {"rng", "pos"})
    return doc


def _without(structure: Any, names: set[str]) -> Any:
    """`structure` with the top-level dict entries named in `names` removed."""
    out = copy.deepcopy(structure)
    out["dict"] = [pair for pair in out["dict"] if pair[0] not in names]
    return out
