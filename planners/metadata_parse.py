"""Reading untrusted metadata: parse, check every field, refuse shared bytes.

`planners.metadata` defines the records and how they are written; this module
is the one way bytes from a checkpoint become those records. A checkpoint may
come from anyone, so every field is validated before it sizes anything: file
names must be plain shard names inside the checkpoint, every byte range must
lie inside its file and belong to one chunk, shapes and sizes must agree,
dtypes must be known, and the digest must match (format version 2).
"""

from __future__ import annotations

import math
import re
from typing import Any

from planners.boxes import Box, tiling_problem
from planners.digest import DIGEST_FIELD, check_digest, strict_loads
from planners.dtypes import checked_name
from planners.dtypes import itemsize as dtype_itemsize
from planners.errors import InvalidCheckpointError
from planners.global_plan import Mesh
from planners.grid import GridIndex, GridRecord, parse_grid, unwritten_chunks_problem
from planners.mesh_parse import parse_meshes
from planners.metadata import (
    CHECKSUM_BLOCK_BYTES,
    DIGEST_SINCE_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_FILE_BYTES,
    MAX_NUMEL,
    METADATA_FILE,
    SHARD_FILE_RE,
    ChunkRecord,
    FileRecord,
    Metadata,
    RankLocalRecord,
    TensorRecord,
    first_byte_overlap,
)
from planners.references import as_file_records, parse_referenced_files, parse_references


def parse_metadata(data: bytes, *, where: str) -> Metadata:
    """Parse and validate untrusted metadata bytes.

    The digest (required from format version 2, checked whenever present) is
    checked before any field is trusted, so a damaged file is blamed on
    itself, never on the shard a damaged field points at.

    Raises:
        CorruptCheckpointError: the digest does not match the content.
        InvalidCheckpointError: anything malformed, out of range or unsafe, naming `where`,
            the metadata file and the key.
    """
    doc = _json_document(data, where=where)
    v = _Validator(where)
    version = _checked_version(v, doc, data)
    save_id = _save_fields(v, doc)
    files = v.files(doc.get("files"))
    meshes = parse_meshes(doc.get("meshes") if version >= 2 else None, world_size=v.world_size, fail=v.fail)
    grids: dict[str, GridRecord] = {}
    # Incremental saves (planners.references): plain keys' chunks may lie in referenced files too.
    raw_refs = doc.get("references")
    ref_files = (
        {}
        if raw_refs is None
        else parse_referenced_files(raw_refs, version=version, save_id=save_id, own=files, fail=v.fail)
    )
    chunk_files = {**files, **as_file_records(ref_files)}
    tensors = v.tensors(doc.get("tensors"), chunk_files, meshes, grids)
    index = GridIndex(meshes=meshes, grids=grids, plain={}, world_size=v.world_size)
    problem = unwritten_chunks_problem(index, {f.rank for f in files.values()})
    v.check(problem is None, str(problem))
    rank_local = v.rank_locals(doc.get("rank_local"), files)
    problem = byte_overlap_problem(tensors, rank_local)
    v.check(problem is None, str(problem))
    values = v.dict_(doc.get("values"), "values")
    structure = doc.get("structure")
    v.structure(structure, set(tensors), set(values), set(rank_local))
    references = None
    if raw_refs is not None:
        references = parse_references(
            raw_refs,
            ref_files,
            tensors=tensors,
            grids=grids,
            index=index,
            chunk=lambda key, c: v.chunk(
                key, c, tensors[key].shape, dtype_itemsize(tensors[key].dtype), chunk_files
            ),
            fail=v.fail,
        )
    return Metadata(
        version=version,
        save_id=save_id,
        world_size=v.world_size,
        checksum_block_bytes=v.block,
        tensors=tensors,
        values=values,
        rank_local=rank_local,
        files=files,
        structure=structure,
        meshes=meshes,
        grids=grids,
        references=references,
    )


def _json_document(data: bytes, *, where: str) -> Any:
    """The parsed JSON (strict: no duplicate keys, no NaN), before anything in it is trusted."""
    try:
        return strict_loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidCheckpointError(f"{where}: {METADATA_FILE}: metadata is not valid JSON: {e}") from e


def _checked_version(v: _Validator, doc: Any, data: bytes) -> int:
    """The format version, once the document is known to be shardsafe metadata whose digest matches.

    The digest is checked before the version is trusted: a damaged version field must read as a
    damaged file, not as a file from a newer shardsafe.
    """
    v.check(isinstance(doc, dict) and doc.get("format") == FORMAT_NAME, "not a shardsafe metadata file")
    version = doc.get("version")
    if DIGEST_FIELD in doc or (type(version) is int and version >= DIGEST_SINCE_VERSION):
        check_digest(data, doc, where=f"{v.where}: {METADATA_FILE}")
    version = v.int_(version, "version", low=1)
    v.check(
        version <= FORMAT_VERSION,
        f"format version {version} is newer than this reader ({FORMAT_VERSION}); upgrade shardsafe",
    )
    return version


def _save_fields(v: _Validator, doc: dict) -> str:
    """Check the save's world size, checksum block size and id; the first two size every later check."""
    world_size = v.int_(doc.get("world_size"), "world_size", low=1)
    block = v.int_(doc.get("checksum_block_bytes"), "checksum_block_bytes", low=4096, high=1 << 40)
    save_id = doc.get("save_id")
    v.check(isinstance(save_id, str) and re.fullmatch(r"[0-9a-f]{8,32}", save_id) is not None, "bad save_id")
    v.block = block
    v.world_size = world_size
    return save_id


def byte_overlap_problem(
    tensors: dict[str, TensorRecord], rank_local: dict[str, RankLocalRecord]
) -> str | None:
    """Where two chunks claim the same bytes of a file, or None.

    Each byte of a shard file belongs to at most one chunk. Without this rule
    a small file could stand for a huge tensor (every chunk pointing at the
    same bytes), so a load would allocate far more than the files hold.
    Chunks of one tensor overlapping in the tensor are `tiling_problem`'s.
    """
    chunks = [(fqn, c) for fqn, t in tensors.items() for c in t.chunks]
    chunks += [(fqn, e[1]) for fqn, r in rank_local.items() for e in r.tensors if e is not None]
    return first_byte_overlap(chunks)


class _Validator:
    """Checks for untrusted metadata; every failure names the checkpoint and the field."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.block = CHECKSUM_BLOCK_BYTES
        self.world_size = 1

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            raise InvalidCheckpointError(f"{self.where}: {METADATA_FILE}: invalid metadata: {problem}")

    def fail(self, problem: str) -> None:
        self.check(False, problem)

    def int_(self, x: Any, field: str, *, low: int = 0, high: int = MAX_FILE_BYTES) -> int:
        self.check(
            type(x) is int and low <= x <= high,
            f"{field} must be an integer in [{low}, {high}], got {str(x)[:40]!r}",
        )
        return x

    def dict_(self, x: Any, field: str) -> dict:
        self.check(isinstance(x, dict), f"{field} must be an object")
        return x

    def ints(self, x: Any, field: str, ndim: int | None = None) -> tuple[int, ...]:
        self.check(isinstance(x, list) and len(x) <= 64, f"{field} must be a list of at most 64 integers")
        self.check(ndim is None or len(x) == ndim, f"{field} has {len(x)} dims, expected {ndim}")
        return tuple(self.int_(i, field, high=MAX_NUMEL) for i in x)

    def file_name(self, name: Any) -> str:
        self.check(
            isinstance(name, str) and SHARD_FILE_RE.fullmatch(name) is not None,
            f"file name {str(name)[:80]!r} is not a shard file name (paths, '..' and URLs are refused)",
        )
        return name

    def files(self, doc_files: Any) -> dict[str, FileRecord]:
        """The shard files: plain names, sizes within bounds, each written by a rank of the save."""
        return {
            self.file_name(n): FileRecord(
                nbytes=self.int_(f.get("nbytes"), f"files[{n!r}].nbytes", high=MAX_FILE_BYTES),
                rank=self.int_(f.get("rank"), f"files[{n!r}].rank", high=self.world_size - 1),
            )
            for n, f in self.dict_(doc_files, "files").items()
            if self.dict_(f, f"files[{n!r}]") is not None
        }

    def chunk(
        self, key: str, c: Any, shape: tuple[int, ...], itemsize: int, files: dict[str, FileRecord]
    ) -> ChunkRecord:
        c = self.dict_(c, f"chunk of {key!r}")
        box = Box(
            offsets=self.ints(c.get("offsets"), f"{key!r} offsets", len(shape)),
            sizes=self.ints(c.get("sizes"), f"{key!r} sizes", len(shape)),
        )
        self.check(
            box.within(shape),
            f"key {key!r}: chunk {list(box.offsets)}+{list(box.sizes)} lies outside shape {list(shape)}",
        )
        name = self.file_name(c.get("file"))
        self.check(name in files, f"key {key!r}: file {name!r} is not listed in files")
        offset, nbytes = (
            self.int_(c.get("offset_bytes"), f"{key!r} offset_bytes"),
            self.int_(c.get("nbytes"), f"{key!r} nbytes"),
        )
        self.check(
            nbytes == box.numel * itemsize,
            f"key {key!r}: nbytes {nbytes} != {box.numel} elements x {itemsize} bytes",
        )
        self.check(
            offset + nbytes <= files[name].nbytes,
            f"key {key!r}: bytes [{offset}, {offset + nbytes}) lie outside file {name!r} of {files[name].nbytes} bytes",
        )
        self.check(isinstance(c.get("key"), str), f"key {key!r}: chunk key must be a string")
        crcs = c.get("crc32c")
        nblocks = -(-nbytes // self.block)
        self.check(
            isinstance(crcs, list) and len(crcs) == nblocks,
            f"key {key!r}: expected {nblocks} block checksums",
        )
        checksums = tuple(self.int_(x, f"{key!r} crc32c", high=0xFFFFFFFF) for x in crcs)
        return ChunkRecord(
            box=box, file=name, key=c["key"], offset_bytes=offset, nbytes=nbytes, checksums=checksums
        )

    def tensors(
        self,
        doc_tensors: Any,
        files: dict[str, FileRecord],
        meshes: tuple[Mesh, ...],
        grids: dict[str, GridRecord],
    ) -> dict[str, TensorRecord]:
        """Every tensor record; the grid records of format version 2 are added to `grids`."""
        index = GridIndex(meshes=meshes, grids={}, plain={}, world_size=self.world_size)
        return {
            k: self.tensor(k, t, files, index, grids) for k, t in self.dict_(doc_tensors, "tensors").items()
        }

    def rank_locals(self, doc_rank_local: Any, files: dict[str, FileRecord]) -> dict[str, RankLocalRecord]:
        """Every rank-local record (one entry per saving rank each)."""
        return {k: self.rank_local(k, r, files) for k, r in self.dict_(doc_rank_local, "rank_local").items()}

    def tensor(
        self, key: str, t: Any, files: dict[str, FileRecord], index: GridIndex, grids: dict[str, GridRecord]
    ) -> TensorRecord:
        t = self.dict_(t, f"tensors[{key!r}]")
        dtype = checked_name(t.get("dtype"), where=f"{self.where}: key {key!r}")
        shape = self.ints(t.get("shape"), f"{key!r} shape")
        self.check(math.prod(shape) <= MAX_NUMEL, f"key {key!r}: shape {list(shape)} is too large")
        if "grid" in t:  # version 2: a grid record, its chunks found through the shard headers
            grids[key] = parse_grid(key, t["grid"], dtype=dtype, shape=shape, index=index, fail=self.fail)
            return TensorRecord(dtype=t["dtype"], shape=shape, chunks=())
        chunks = tuple(
            self.chunk(key, c, shape, dtype_itemsize(dtype), files)
            for c in (
                t.get("chunks")
                if isinstance(t.get("chunks"), list)
                else self.check(False, f"{key!r} chunks must be a list") or []
            )
        )
        problem = tiling_problem(shape, [c.box for c in chunks])
        self.check(problem is None, f"key {key!r}: {problem}")
        return TensorRecord(dtype=t["dtype"], shape=shape, chunks=chunks)

    def rank_local(self, key: str, per_rank: Any, files: dict[str, FileRecord]) -> RankLocalRecord:
        self.check(
            isinstance(per_rank, list) and len(per_rank) == self.world_size,
            f"rank_local[{key!r}] must list one entry per saving rank ({self.world_size})",
        )
        tensors, values = [], []
        for r, entry in enumerate(per_rank):
            entry = self.dict_(entry, f"rank_local[{key!r}][{r}]")
            if "tensor" in entry:
                t = self.dict_(entry["tensor"], f"rank_local[{key!r}][{r}].tensor")
                dtype = checked_name(t.get("dtype"), where=f"{self.where}: key {key!r}")
                shape = self.ints(t.get("sizes"), f"{key!r} sizes")
                tensors.append((t["dtype"], self.chunk(key, t, shape, dtype_itemsize(dtype), files)))
                values.append(None)
            else:
                self.check("value" in entry, f"rank_local[{key!r}][{r}] needs 'tensor' or 'value'")
                tensors.append(None)
                values.append(entry["value"])
        return RankLocalRecord(tensors=tuple(tensors), values=tuple(values))

    def structure(
        self, node: Any, tensors: set[str], values: set[str], rank_local: set[str], depth: int = 0
    ) -> None:
        self.check(depth <= 256, "structure nested deeper than 256 levels")
        self.check(
            isinstance(node, dict) and len(node) == 1, f"structure node {str(node)[:60]!r} is malformed"
        )
        ((kind, body),) = node.items()
        if kind in ("list", "tuple"):
            self.check(isinstance(body, list), f"structure {kind} must hold a list")
            for child in body:
                self.structure(child, tensors, values, rank_local, depth + 1)
        elif kind == "dict":
            self.check(isinstance(body, list), "structure dict must hold a list of pairs")
            for pair in body:
                self.check(
                    isinstance(pair, list) and len(pair) == 2 and type(pair[0]) in (str, int),
                    "structure dict pair is malformed",
                )
                self.structure(pair[1], tensors, values, rank_local, depth + 1)
        else:
            known = {"tensor": tensors, "value": values, "rank_local": rank_local}.get(kind)
            self.check(
                known is not None and isinstance(body, str) and body in known,
                f"structure leaf {kind}:{str(body)[:60]!r} names no saved key",
            )
