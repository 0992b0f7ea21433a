"""What a rank's write report may say: its JSON form and the coordinator's checks before the commit.

Each rank sends the coordinator a `RankWriteResult` (its shard files and
chunk records). For an async save that report crosses rank 0's commit store,
which any local process can reach, so it travels as JSON (never pickle) and
is read back as untrusted input: `result_from_json` checks every field's type
and bounds every count before building records. `plan_problem` then holds the
reports to the plan the coordinator already knows (`MetadataDraft`): each
rank reports only files named for itself in this save, each chunk of a planned
tensor lies in a file its writer reported and has the planned dtype, size and
checksum count, the chunks of every planned plain tensor tile it, and every
rank that the grid records make a writer reported a file. (`checkpoint.save.commit`
also refuses chunks sharing bytes, as a load would.) These are the checks of
`planners.metadata_parse` that reports can fail, without a second parse of
the whole metadata on every commit (0.6 s of CPU for 10,000 tensors). Pure:
no process group, no file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from planners.boxes import Box, full_box, tiling_problem
from planners.dtypes import DTYPE_NAMES, itemsize
from planners.global_plan import Mesh
from planners.grid import GridIndex, GridRecord
from planners.metadata import CHECKSUM_BLOCK_BYTES, MAX_FILE_BYTES, SHARD_FILE_RE, ChunkRecord
from planners.metadata_build import MetadataDraft, RankWriteResult, WrittenChunk
from planners.placement import Replicate
from planners.reference_report import report_from_json, report_problem

# A report listing more than this is not one a writer produced (files per rank, chunks per rank,
# dims per box, checksum blocks per chunk).
MAX_REPORTED_FILES = 1 << 20
MAX_REPORTED_CHUNKS = 1 << 24
MAX_DIMS = 64
MAX_CHECKSUMS = 1 << 32


def result_to_json(result: RankWriteResult) -> dict[str, Any]:
    """The report as plain JSON data (the form it crosses the commit store in)."""
    return {
        "rank": result.rank,
        "files": dict(result.files),
        "chunks": [_written_json(c) for c in result.chunks],
        "rank_local_values": result.rank_local_values,
        "error": result.error,
        **({"incremental": result.incremental.to_json()} if result.incremental is not None else {}),
    }


def _written_json(c: WrittenChunk) -> list[Any]:
    k = c.chunk
    return [
        c.fqn,
        c.dtype,
        c.rank_local,
        [list(k.box.offsets), list(k.box.sizes), k.file, k.key, k.offset_bytes, k.nbytes, list(k.checksums)],
    ]


def result_from_json(doc: Any, *, rank: int) -> RankWriteResult:
    """Rank `rank`'s report from untrusted JSON data.

    Raises:
        ValueError: a field has the wrong type, a count is out of bounds, or the report names another rank.
    """
    _need(isinstance(doc, dict), "the report is not a JSON object")
    _need(
        doc.get("rank") == rank and type(doc.get("rank")) is int, f"the report names rank {doc.get('rank')!r}"
    )
    error = doc.get("error")
    _need(error is None or isinstance(error, str), "error is not a string")
    files, chunks, values = doc.get("files"), doc.get("chunks"), doc.get("rank_local_values")
    _need(isinstance(files, dict) and len(files) <= MAX_REPORTED_FILES, "files is not a bounded object")
    _need(isinstance(chunks, list) and len(chunks) <= MAX_REPORTED_CHUNKS, "chunks is not a bounded list")
    _need(isinstance(values, dict), "rank_local_values is not an object")
    for name, nbytes in files.items():
        _need(_is_int(nbytes, 0, MAX_FILE_BYTES), f"file {name!r} has size {nbytes!r}")
    return RankWriteResult(
        rank=rank,
        files=dict(files),
        chunks=tuple(_written_from_json(c) for c in chunks),
        rank_local_values=values,
        error=error,
        incremental=report_from_json(doc["incremental"]) if "incremental" in doc else None,
    )


def _written_from_json(raw: Any) -> WrittenChunk:
    _need(isinstance(raw, list) and len(raw) == 4, "a chunk entry is malformed")
    fqn, dtype, rank_local, chunk = raw
    _need(
        isinstance(fqn, str) and isinstance(dtype, str) and type(rank_local) is bool,
        "a chunk entry is malformed",
    )
    _need(isinstance(chunk, list) and len(chunk) == 7, f"key {fqn!r}: the chunk record is malformed")
    offsets, sizes, file, key, offset_bytes, nbytes, checksums = chunk
    _need(_ints(offsets) and _ints(sizes) and len(offsets) == len(sizes), f"key {fqn!r}: a bad box")
    _need(isinstance(file, str) and isinstance(key, str), f"key {fqn!r}: a bad file or key name")
    _need(
        _is_int(offset_bytes, 0, MAX_FILE_BYTES) and _is_int(nbytes, 0, MAX_FILE_BYTES),
        f"key {fqn!r}: bad bytes",
    )
    _need(
        isinstance(checksums, list)
        and len(checksums) <= MAX_CHECKSUMS
        and all(_is_int(x, 0, 0xFFFFFFFF) for x in checksums),
        f"key {fqn!r}: bad checksums",
    )
    return WrittenChunk(
        fqn=fqn,
        dtype=dtype,
        rank_local=rank_local,
        chunk=ChunkRecord(
            box=Box(offsets=tuple(offsets), sizes=tuple(sizes)),
            file=file,
            key=key,
            offset_bytes=offset_bytes,
            nbytes=nbytes,
            checksums=tuple(checksums),
        ),
    )


def plan_problem(draft: MetadataDraft, results: Sequence[RankWriteResult], *, save_id: str) -> str | None:
    """Why the reports do not complete the planned save, or None when they do (first problem only)."""
    plan = draft.global_plan
    boxes: dict[str, list[Box]] = {fqn: [] for fqn in plan.tensors}
    for r in results:
        files = r.files
        for name in files:
            m = SHARD_FILE_RE.match(name)
            if m is None or m["save_id"] != save_id or int(m["rank"]) != r.rank:
                return f"rank {r.rank} reported file {name!r}, which is not one of its shard files of save {save_id}"
        for c in r.chunks:
            problem = _chunk_problem(plan.tensors, c, files, r.rank)
            if problem is not None:
                return problem
            if not c.rank_local:
                boxes[c.fqn].append(c.chunk.box)
    grids = plan.grid_fields.get("grids", {})
    for r in (r for r in results if r.incremental is not None):  # incremental saves: referenced chunks
        problem = report_problem(r.incremental, rank=r.rank, files=r.files, tensors=plan.tensors)
        if problem is not None:
            return problem
        for fqn, e in r.incremental.indexed:
            if e.chunk.file in r.incremental.referenced and fqn not in grids:
                boxes[fqn].append(e.chunk.box)
    for fqn, (_, shape) in plan.tensors.items():
        problem = None if fqn in grids else tiling_problem(shape, boxes[fqn])
        if problem is not None:
            return f"key {fqn!r}: the reported chunks do not tile it: {problem}"
    silent = sorted(_grid_writers(draft, len(results)) - {r.rank for r in results if r.files})
    if silent:
        return (
            f"rank {silent[0]} writes chunks of grid keys in the plan but reported no shard file "
            f"({len(silent)} such rank(s))"
        )
    return None


def _chunk_problem(
    tensors: dict[str, tuple[str, tuple[int, ...]]], c: WrittenChunk, files: dict[str, int], rank: int
) -> str | None:
    k = c.chunk
    where = f"rank {rank} reported a chunk of key {c.fqn!r} in {k.file!r}"
    if k.file not in files:
        return f"{where}, a file it did not report"
    if k.offset_bytes + k.nbytes > files[k.file]:
        return (
            f"{where} at bytes [{k.offset_bytes}, {k.offset_bytes + k.nbytes}) past its {files[k.file]} bytes"
        )
    if len(k.checksums) != -(-k.nbytes // CHECKSUM_BLOCK_BYTES):
        return f"{where} of {k.nbytes} bytes with {len(k.checksums)} block checksums"
    if c.rank_local:  # the rank's own whole tensor: only its dtype and size can be checked
        shape: tuple[int, ...] = k.box.sizes
        if c.dtype not in DTYPE_NAMES or any(k.box.offsets):
            return f"{where} with dtype {c.dtype!r} at offsets {list(k.box.offsets)}; a rank-local tensor is whole"
        dtype = c.dtype
    elif c.fqn not in tensors:
        return f"{where}, a key the plan does not have"
    else:
        dtype, shape = tensors[c.fqn]
    if c.dtype != dtype or len(k.box.sizes) != len(shape) or not k.box.within(shape):
        return (
            f"{where} with dtype {c.dtype} box {list(k.box.offsets)}+{list(k.box.sizes)}; "
            f"planned {dtype} {list(shape)}"
        )
    if k.nbytes != k.box.numel * itemsize(dtype):
        return f"{where} of {k.nbytes} bytes; its box holds {k.box.numel * itemsize(dtype)}"
    return None


def _grid_writers(draft: MetadataDraft, world_size: int) -> set[int]:
    """Every rank that writes a non-empty chunk of a grid key, by the writer rule the loader uses."""
    fields = draft.global_plan.grid_fields
    meshes: tuple[Mesh, ...] = tuple(fields.get("meshes", ()))
    grids: dict[str, GridRecord] = dict(fields.get("grids", {}))
    if not grids:
        return set()
    plain = {k: v for k, v in draft.global_plan.tensors.items() if k not in grids}
    index = GridIndex(meshes=meshes, grids=grids, plain=plain, world_size=world_size)
    writers: set[int] = set()
    done: set[tuple] = set()  # a layout without Replicate has the same writers for every key
    for fqn, g in grids.items():
        shared = any(isinstance(p, Replicate) for p in g.placements)
        layout_key = (g.mesh, g.placements, g.shape)
        if math.prod(g.shape) == 0 or (not shared and layout_key in done):
            continue
        done.add(layout_key)
        writers.update(cell.writer for cell in index.cells(fqn, full_box(g.shape)))
    return writers


def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


def _is_int(x: Any, low: int, high: int) -> bool:
    return type(x) is int and low <= x <= high


def _ints(xs: Any) -> bool:
    return isinstance(xs, list) and len(xs) <= MAX_DIMS and all(_is_int(x, 0, MAX_FILE_BYTES) for x in xs)
