"""A rank's incremental report as it crosses the async commit store: JSON, read back untrusted.

`planners.write_report` carries a rank's `RankWriteResult` as JSON; an incremental save adds its
`IncrementalReport` (`planners.references`), which is read back here with every count bounded
before any loop, then held to the plan by `report_problem` (the coordinator's check). The committed
metadata is parsed again by every load (`planners.references.parse_references`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from planners.boxes import Box
from planners.metadata import MAX_FILE_BYTES, ChunkRecord
from planners.references import (
    HASH_RE,
    HEAD_RE,
    MAX_INDEXED_CHUNKS,
    MAX_REFERENCED_FILES,
    IncrementalReport,
    IndexedChunk,
    ReferencedFile,
)


def report_from_json(raw: Any) -> IncrementalReport:
    """A rank's `IncrementalReport` from untrusted JSON (the async commit store); `ValueError` when malformed.

    Only shapes and bounds are checked here: the coordinator's `plan_problem` holds the chunks to the
    plan, and every load parses the committed metadata again (`parse_references`).
    """
    if not isinstance(raw, dict):
        raise ValueError("incremental is not an object")
    indexed, referenced = raw.get("indexed"), raw.get("referenced")
    if not (isinstance(indexed, list) and len(indexed) <= MAX_INDEXED_CHUNKS):
        raise ValueError("incremental.indexed is not a bounded list")
    if not (isinstance(referenced, dict) and len(referenced) <= MAX_REFERENCED_FILES):
        raise ValueError("incremental.referenced is not a bounded object")
    files = {}
    for name, f in referenced.items():
        ok = isinstance(f, dict) and isinstance(f.get("checkpoint"), str) and type(f.get("nbytes")) is int
        if not ok or not 0 <= f["nbytes"] <= MAX_FILE_BYTES:
            raise ValueError(f"referenced file {str(name)[:80]!r} is malformed")
        files[name] = ReferencedFile(checkpoint=f["checkpoint"], nbytes=f["nbytes"])
    return IncrementalReport(indexed=tuple(_indexed_from_json(e) for e in indexed), referenced=files)


def _indexed_from_json(raw: Any) -> tuple[str, IndexedChunk]:
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str) and isinstance(raw[1], dict)):
        raise ValueError("an indexed chunk is malformed")
    fqn, c = raw
    ints = [c.get("offsets"), c.get("sizes"), c.get("crc32c")]
    if not all(
        isinstance(x, list) and all(type(i) is int and 0 <= i <= MAX_FILE_BYTES for i in x) for x in ints
    ):
        raise ValueError(f"key {fqn!r}: an indexed chunk has a bad box or checksums")
    if len(ints[0]) != len(ints[1]) or len(ints[0]) > 64:
        raise ValueError(f"key {fqn!r}: an indexed chunk has a bad box")
    scalars = (c.get("offset_bytes"), c.get("nbytes"))
    if not all(type(x) is int and 0 <= x <= MAX_FILE_BYTES for x in scalars):
        raise ValueError(f"key {fqn!r}: an indexed chunk has bad bytes")
    if not (isinstance(c.get("file"), str) and isinstance(c.get("key"), str)):
        raise ValueError(f"key {fqn!r}: an indexed chunk has a bad file or key")
    digest, head = c.get("xxh3"), c.get("head")
    if not (digest is None or (isinstance(digest, str) and HASH_RE.fullmatch(digest))):
        raise ValueError(f"key {fqn!r}: an indexed chunk has a bad xxh3")
    if not (isinstance(head, str) and HEAD_RE.fullmatch(head)):
        raise ValueError(f"key {fqn!r}: an indexed chunk has a bad head")
    record = ChunkRecord(
        box=Box(offsets=tuple(ints[0]), sizes=tuple(ints[1])),
        file=c["file"],
        key=c["key"],
        offset_bytes=scalars[0],
        nbytes=scalars[1],
        checksums=tuple(ints[2]),
    )
    return fqn, IndexedChunk(chunk=record, head=head, xxh3=digest)


def report_problem(
    report: IncrementalReport,
    *,
    rank: int,
    files: Mapping[str, int],
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
) -> str | None:
    """Why a rank's incremental report does not fit the plan, or None (the coordinator's check)."""
    for fqn, e in report.indexed:
        c = e.chunk
        where = f"rank {rank} indexed a chunk of key {fqn!r} in {c.file!r}"
        if fqn not in tensors:
            return f"{where}, a key the plan does not have"
        if c.file not in files and c.file not in report.referenced:
            return f"{where}, a file it neither wrote nor referenced"
        limit = files[c.file] if c.file in files else report.referenced[c.file].nbytes
        _, shape = tensors[fqn]
        if c.offset_bytes + c.nbytes > limit or len(c.box.sizes) != len(shape) or not c.box.within(shape):
            return f"{where} at bytes [{c.offset_bytes}, {c.offset_bytes + c.nbytes}) or box outside the plan"
    return None
