"""Property: any edit of a version-2 checkpoint's metadata or shard headers ends in a `CheckpointError`.

Hypothesis edits the golden two-rank version-2 checkpoint (issue 19, "beyond the cases"): grid
records (mesh index, placements, shapes, dtypes, new grid keys), meshes (shapes, first_rank and
rank_step, explicit rank lists), the world size, the rank-local checksum tables, top-level fields
and file records of metadata.json, and the safetensors headers of the shard files (shapes,
dtypes, byte offsets, the `__shardsafe_crc32c__` table). The metadata is sealed again after the
edit, as anyone can. The cases of issue 19 (a mesh of 2**28 ranks, split 2**20 on 1024 ranks,
8 keys of 1024 x 1024 cells with two files, a 16 TiB claim) seed it as explicit examples.

Every example is loaded, verified, diffed with itself, inspected and exported to Hugging Face
in a worker process (`tests.limited_child`), under these budgets:

- memory: 1.5 GiB of address space beyond the worker's imports (`RLIMIT_AS`);
- time: 10 s of wall clock per operation (the worker is killed and the example fails).

Each operation must succeed or raise a `CheckpointError` subclass; `FileNotFoundError` is
accepted too, as the README promises it for a missing shard file. A `MemoryError`,
`RuntimeError`, any other exception, a killed or a dead worker fails the property. 100
examples (derandomized, so every run tries the same ones) keep the test near 30 s on two cores.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests import hostile_metadata as hostile
from tests.limited_child import LimitedWorker

OPS = ("load", "verify", "diff", "inspect", "export")
SHARDS = sorted(n for n in os.listdir(hostile.GOLDEN_V2) if n.startswith("shard-"))
ACCEPTED = ("CheckpointError", "FileNotFoundError")

# Integers a hostile writer picks: mostly small ones that almost fit (so examples reach the reads,
# not only the parser), and the sizes the cases use.
small = st.integers(0, 3)
ints = st.one_of(
    small,
    st.integers(-2, 9),
    st.sampled_from([1023, 1024, (1 << 20) - 1, 1 << 20, 1 << 28, 1 << 40, 1 << 62, -(1 << 40)]),
)
placements = st.one_of(
    st.tuples(st.just("shard"), small).map(list),
    st.tuples(st.just("shard"), ints).map(list),
    st.just(["replicate"]),
    st.tuples(st.just("strided_shard"), small, ints).map(list),
    st.lists(st.one_of(st.text(max_size=3), ints), max_size=3),
)
meshes = st.one_of(
    st.fixed_dictionaries({"shape": st.lists(ints, max_size=3), "first_rank": small, "rank_step": small}),
    st.fixed_dictionaries({"shape": st.lists(ints, max_size=3), "first_rank": ints, "rank_step": ints}),
    st.fixed_dictionaries(
        {"shape": st.lists(small, min_size=1, max_size=2), "ranks": st.lists(ints, max_size=6)}
    ),
)
grids = st.fixed_dictionaries(
    {"mesh": st.one_of(small, ints), "placements": st.lists(placements, max_size=3)}
)
keys = st.sampled_from(["model.w", "model.b", "model.r", "model.new"])
shapes = st.one_of(st.lists(st.integers(0, 8), max_size=3), st.lists(ints, max_size=3))
dtypes = st.sampled_from(["float32", "bfloat16", "int32", "float8_e4m3fn", "bogus"])
grid_edits = st.tuples(st.just("grid"), keys, grids, shapes, dtypes)
mesh_edits = st.tuples(st.just("mesh"), st.integers(0, 2), meshes)
metadata_edits = st.one_of(
    grid_edits,
    mesh_edits,
    st.tuples(st.just("grid_placements"), keys, st.lists(placements, min_size=1, max_size=2)),
    st.tuples(st.just("world_size"), ints),
    st.tuples(st.just("crc"), st.integers(0, 1), st.lists(ints, max_size=3)),
    st.tuples(st.just("field"), st.sampled_from(["version", "checksum_block_bytes", "save_id"]), ints),
    st.tuples(st.just("file"), st.integers(0, 1), ints, ints),
)
header_edits = st.tuples(
    st.integers(0, 1),
    st.sampled_from(["model.w", "model.b", "model.r", "rng", "__shardsafe_crc32c__"]),
    st.sampled_from(["shape", "dtype", "data_offsets"]),
    st.one_of(shapes, st.sampled_from(["F32", "BF16", "U32", "I64", "??"])),
    st.booleans(),  # also record the file's new size in metadata.json
)


def _edited(edits: list[tuple]) -> dict[str, Any]:
    doc = hostile.golden_doc()
    for edit in edits:
        kind, args = edit[0], edit[1:]
        if kind == "world_size":  # rank-local keys (one entry per rank) go, so the meshes are what is tested
            doc["world_size"] = args[0]
            doc["rank_local"] = {}
            doc["structure"]["dict"] = [p for p in doc["structure"]["dict"] if p[0] not in ("rng", "pos")]
        elif kind == "mesh":
            doc["meshes"][min(args[0], len(doc["meshes"])) :] = [args[1]]
        elif kind == "grid":
            key, grid, shape, dtype = args
            doc["tensors"][key] = {"dtype": dtype, "shape": shape, "grid": grid}
        elif kind == "grid_placements" and args[0] in doc["tensors"]:
            doc["tensors"][args[0]].setdefault("grid", {"mesh": 0})["placements"] = args[1]
        elif kind == "crc" and "rng" in doc["rank_local"]:
            doc["rank_local"]["rng"][args[0]]["tensor"]["crc32c"] = args[1]
        elif kind == "field":
            doc[args[0]] = args[1]
        elif kind == "file":
            doc["files"][SHARDS[args[0]]] = {"nbytes": args[1], "rank": args[2]}
    return doc


def _edit_header(path: str, doc: dict[str, Any], edit: tuple) -> None:
    """Rewrite one entry of a shard file's safetensors header in place (the data follows unchanged)."""
    index, key, field, value, record_size = edit
    name = os.path.join(path, SHARDS[index])
    with open(name, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if key in header:
        header[key][field] = value
    if SHARDS[index] not in doc["files"]:
        record_size = False
    body = json.dumps(header).encode()
    with open(name, "wb") as f:
        f.write(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    if record_size:
        doc["files"][SHARDS[index]]["nbytes"] = 8 + len(body) + len(raw) - 8 - n


@pytest.fixture(scope="module")
def worker() -> Iterator[LimitedWorker]:
    w = LimitedWorker()
    yield w
    w.close()


def _check(worker: LimitedWorker, doc: dict[str, Any], headers: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        hostile.copy_shards(path)
        for edit in headers:
            _edit_header(path, doc, edit)
        hostile.write_metadata(path, doc)
        for op in OPS:
            outcome = worker.run(op, path)
            event(f"{op}: {outcome.kind} {outcome.classes[0] if outcome.classes else ''}")
            assert outcome.kind in ("ok", "error"), (op, outcome)
            if outcome.kind == "error":
                assert any(c in outcome.classes for c in ACCEPTED), (op, outcome)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(edits=st.lists(metadata_edits, max_size=3), headers=st.lists(header_edits, max_size=2))
@example(edits=[("seed", hostile.huge_unused_mesh())], headers=[])
@example(edits=[("seed", hostile.huge_split())], headers=[])
@example(edits=[("seed", hostile.many_cells())], headers=[])
@example(edits=[("seed", hostile.huge_claim())], headers=[])
def test_hostile_v2_edits_end_in_a_checkpoint_error(worker, edits, headers):
    if edits and edits[0][0] == "seed":  # one of the cases, as a whole document
        doc = edits[0][1]
    else:
        doc = _edited(edits)
    _check(worker, doc, headers)
