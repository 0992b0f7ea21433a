"""Incremental checkpoints (format version 3): chunks referenced from an earlier checkpoint of the run.

An incremental save writes only the chunks whose bytes changed since its *base* (an earlier,
committed checkpoint in the same run root) and records the others as references: the byte
range, in the file of the checkpoint that first wrote them, with that range's block checksums.
A reference always names the file that holds the bytes, never a checkpoint that referenced them
in turn, so a load opens `<run root>/<checkpoint>/<file>` directly (one hop, no chain to follow,
no other metadata to trust).

What this module holds, all pure:

- the records: `ReferencedFile` (a file of another checkpoint this one needs), `IndexedChunk`
  (a chunk's location plus the XXH3-128 of its bytes, what the next save compares against) and
  `References` (the metadata's `references` section);
- `IncrementalReport`, what a rank adds to its write report, and `build_references`, which the
  coordinator uses to join the ranks' reports;
- `parse_references`: the untrusted `references` section, checked like the rest of the
  metadata: checkpoint names are one plain directory name (no path, no `..`, never this save's
  own files), counts are bounded before any loop, every indexed chunk is a chunk of the
  checkpoint (a plain key's listed chunk, or one cell of a grid key), and no two chunks share a
  byte of a referenced file (a small file cannot stand for a huge tensor).

Only identical bytes are ever referenced (equal hash, dtype and box), never arithmetic deltas.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from planners.boxes import Box
from planners.grid import GridIndex, GridRecord
from planners.metadata import (
    MAX_FILE_BYTES,
    SHARD_FILE_RE,
    ChunkRecord,
    FileRecord,
    chunk_json,
    first_byte_overlap,
)

# The first format version whose metadata may reference files of another checkpoint.
REFERENCES_SINCE_VERSION = 3
# A checkpoint named by a reference: one plain directory name inside the run root.
CHECKPOINT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
# XXH3-128 of a chunk's bytes, as lowercase hex.
HASH_RE = re.compile(r"^[0-9a-f]{32}$")
# XXH3-64 of a chunk's first `HEAD_BYTES` bytes, as lowercase hex: a chunk whose head differs from
# the base's changed, and is written without hashing the rest (optimizer state changes every step).
HEAD_RE = re.compile(r"^[0-9a-f]{16}$")
HEAD_BYTES = 64 * 1024
# More than this is a hostile file, not a checkpoint (referenced files; indexed chunks).
MAX_REFERENCED_FILES = 1 << 20
MAX_INDEXED_CHUNKS = 1 << 24


@dataclass(frozen=True, slots=True, kw_only=True)
class ReferencedFile:
    """A shard file of another checkpoint of the run that this checkpoint reads bytes from.

    `checkpoint` is that checkpoint's directory name, a sibling of this one; `nbytes` the file's
    size as its own save recorded it, so a truncated or replaced file is refused before a read.
    """

    checkpoint: str
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexedChunk:
    """One chunk of a tensor key with the XXH3-128 of its bytes, wherever those bytes lie.

    The next incremental save compares its staged chunk at the same box with `head`, then with
    `xxh3`; when both match it records `chunk` (file, byte range, block checksums) instead of
    writing the bytes. `xxh3` is None for a chunk whose head already differed from its base's
    (the save did not hash the rest): the next save can then not reference it, only index it.
    """

    chunk: ChunkRecord
    head: str
    xxh3: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class References:
    """The metadata's `references` section.

    `files`: the referenced files (not part of `Metadata.files`, which are this save's own).
    `chunks`: per key, per box offsets, the indexed chunks of the save (written or referenced).
    """

    files: dict[str, ReferencedFile] = field(default_factory=dict)
    chunks: dict[str, dict[tuple[int, ...], IndexedChunk]] = field(default_factory=dict)

    def referenced_chunk(self, fqn: str, box: Box) -> ChunkRecord | None:
        """The referenced record of `fqn`'s chunk at exactly `box`, or None when this save wrote it."""
        entry = self.chunks.get(fqn, {}).get(box.offsets)
        if entry is None or entry.chunk.box != box or entry.chunk.file not in self.files:
            return None
        return entry.chunk

    def checkpoints(self) -> set[str]:
        """The checkpoints (directory names) this one reads bytes from."""
        return {f.checkpoint for f in self.files.values()}

    def to_json(self) -> dict[str, Any]:
        return {
            "files": {
                n: {"checkpoint": f.checkpoint, "nbytes": f.nbytes} for n, f in sorted(self.files.items())
            },
            "chunks": {
                fqn: [_indexed_json(e) for _, e in sorted(entries.items())]
                for fqn, entries in sorted(self.chunks.items())
            },
        }


def _indexed_json(e: IndexedChunk) -> dict[str, Any]:
    return {**chunk_json(e.chunk), "head": e.head, **({"xxh3": e.xxh3} if e.xxh3 is not None else {})}


@dataclass(frozen=True, slots=True, kw_only=True)
class IncrementalReport:
    """What an incremental save's rank adds to its write report.

    `indexed`: (key, chunk) for every chunk the rank holds, written or referenced, with its hash.
    `referenced`: the files of other checkpoints its referenced chunks lie in.
    """

    indexed: tuple[tuple[str, IndexedChunk], ...] = ()
    referenced: dict[str, ReferencedFile] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "indexed": [[fqn, _indexed_json(e)] for fqn, e in self.indexed],
            "referenced": {
                n: {"checkpoint": f.checkpoint, "nbytes": f.nbytes} for n, f in self.referenced.items()
            },
        }


def build_references(reports: Sequence[IncrementalReport | None]) -> References | None:
    """The coordinator's `references` section from every rank's report (None: not an incremental save)."""
    present = [r for r in reports if r is not None]
    if not present:
        return None
    files: dict[str, ReferencedFile] = {}
    chunks: dict[str, dict[tuple[int, ...], IndexedChunk]] = {}
    for r in present:
        files.update(r.referenced)
        for fqn, e in r.indexed:
            chunks.setdefault(fqn, {})[e.chunk.box.offsets] = e
    return References(files=files, chunks=chunks)


def referenced_plain_chunks(
    reports: Sequence[IncrementalReport | None], grids: Mapping[str, Any]
) -> dict[str, list[ChunkRecord]]:
    """Per plain (non-grid) key, the chunks the ranks referenced: they join the key's chunk list."""
    out: dict[str, list[ChunkRecord]] = {}
    for r in (r for r in reports if r is not None):
        for fqn, e in r.indexed:
            if fqn not in grids and e.chunk.file in r.referenced:
                out.setdefault(fqn, []).append(e.chunk)
    return out


# --- reading untrusted metadata ------------------------------------------------------------------

Fail = Callable[[str], None]


def parse_referenced_files(
    doc: Any, *, version: int, save_id: str, own: Mapping[str, FileRecord], fail: Fail
) -> dict[str, ReferencedFile]:
    """The `references.files` of untrusted metadata, each a plain shard name in a sibling checkpoint.

    Refused: a references section in a version before `REFERENCES_SINCE_VERSION` that lists files,
    a checkpoint name that is a path, `.`/`..` or a URL, a file of this very save (a cycle) or one
    also listed as this checkpoint's own, and more entries than `MAX_REFERENCED_FILES`.
    """
    if not isinstance(doc, dict):
        fail("references must be an object")
    files = doc.get("files", {})
    if not isinstance(files, dict) or len(files) > MAX_REFERENCED_FILES:
        fail(f"references.files must be an object of at most {MAX_REFERENCED_FILES} entries")
    if files and version < REFERENCES_SINCE_VERSION:
        fail(
            f"version {version} metadata cannot reference files (references need version {REFERENCES_SINCE_VERSION})"
        )
    out: dict[str, ReferencedFile] = {}
    for name, f in files.items():
        m = SHARD_FILE_RE.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            fail(
                f"referenced file {str(name)[:80]!r} is not a shard file name (paths, '..' and URLs are refused)"
            )
        if m["save_id"] == save_id or name in own:
            fail(f"referenced file {name!r} belongs to this save: a checkpoint cannot reference itself")
        if not isinstance(f, dict):
            fail(f"references.files[{name!r}] must be an object")
        ckpt, nbytes = f.get("checkpoint"), f.get("nbytes")
        if not (isinstance(ckpt, str) and CHECKPOINT_NAME_RE.fullmatch(ckpt) and ".." not in ckpt):
            fail(
                f"referenced file {name!r}: checkpoint {str(ckpt)[:80]!r} is not one directory name of the "
                "run root (references outside the run are refused)"
            )
        if type(nbytes) is not int or not 0 <= nbytes <= MAX_FILE_BYTES:
            fail(f"referenced file {name!r}: nbytes must be an integer in [0, {MAX_FILE_BYTES}]")
        out[name] = ReferencedFile(checkpoint=ckpt, nbytes=nbytes)
    return out


ChunkParser = Callable[[str, Any], ChunkRecord]


def parse_references(
    doc: Any,
    files: dict[str, ReferencedFile],
    *,
    tensors: Mapping[str, Any],
    grids: Mapping[str, GridRecord],
    index: GridIndex,
    chunk: ChunkParser,
    fail: Fail,
) -> References:
    """The `references` section once its files are parsed: every indexed chunk checked.

    Args:
        doc: the raw section.
        files: its parsed `files` (`parse_referenced_files`).
        tensors: the parsed tensor records (plain keys with their chunks; grid keys without).
        grids: the grid records; `index` locates their cells.
        chunk: parses one raw chunk of a key (box within shape, byte range within its file, checksums).
        fail: raises the metadata's `InvalidCheckpointError`.
    """
    raw = doc.get("chunks", {})
    if not isinstance(raw, dict):
        fail("references.chunks must be an object")
    total = sum(len(v) if isinstance(v, list) else 0 for v in raw.values())
    if total > MAX_INDEXED_CHUNKS:
        fail(f"references.chunks lists {total} chunks, more than {MAX_INDEXED_CHUNKS}")
    chunks: dict[str, dict[tuple[int, ...], IndexedChunk]] = {}
    for fqn, entries in raw.items():
        if fqn not in tensors or not isinstance(entries, list):
            fail(f"references.chunks[{str(fqn)[:80]!r}] names no saved tensor key")
        own = chunks[fqn] = {}
        for e in entries:
            record = chunk(fqn, e)
            digest, head = e.get("xxh3"), e.get("head")
            if not (digest is None or (isinstance(digest, str) and HASH_RE.fullmatch(digest))):
                fail(f"key {fqn!r}: xxh3 must be 32 lowercase hex digits")
            if not (isinstance(head, str) and HEAD_RE.fullmatch(head)):
                fail(f"key {fqn!r}: head must be 16 lowercase hex digits")
            problem = _not_a_chunk(fqn, record, tensors, grids, index, files)
            if problem is not None:
                fail(problem)
            if record.box.offsets in own:
                fail(f"key {fqn!r}: the chunk at {list(record.box.offsets)} is indexed twice")
            own[record.box.offsets] = IndexedChunk(chunk=record, head=head, xxh3=digest)
    problem = _referenced_overlap(chunks, files)
    if problem is not None:
        fail(problem)
    return References(files=files, chunks=chunks)


def _not_a_chunk(
    fqn: str,
    c: ChunkRecord,
    tensors: Mapping[str, Any],
    grids: Mapping[str, GridRecord],
    index: GridIndex,
    files: Mapping[str, ReferencedFile],
) -> str | None:
    """Why an indexed chunk is not one of the key's saved chunks, or None."""
    where = f"key {fqn!r}: indexed chunk at {list(c.box.offsets)}"
    if fqn not in grids:
        if c not in tensors[fqn].chunks:
            return f"{where} differs from every chunk the key lists"
        return None
    cells = index.cells(fqn, c.box)
    if len(cells) != 1 or cells[0].box != c.box:
        return f"{where} of sizes {list(c.box.sizes)} is not one chunk of the key's grid"
    return None


def _referenced_overlap(
    chunks: Mapping[str, Mapping[tuple[int, ...], IndexedChunk]], files: Mapping[str, ReferencedFile]
) -> str | None:
    """Where two indexed chunks claim the same bytes of a referenced file, or None."""
    referenced = ((fqn, e.chunk) for fqn, entries in chunks.items() for e in entries.values())
    return first_byte_overlap(((fqn, c) for fqn, c in referenced if c.file in files), label="referenced file")


def as_file_records(files: Mapping[str, ReferencedFile]) -> dict[str, FileRecord]:
    """Referenced files as the chunk checks see them (their size bounds every byte range)."""
    return {n: FileRecord(nbytes=f.nbytes, rank=0) for n, f in files.items()}


def references_summary(refs: References | None) -> dict[str, Any]:
    """What `shardsafe inspect` shows of an incremental checkpoint: which checkpoints it reads, how much."""
    if refs is None or not refs.files:
        return {"checkpoints": [], "files": 0, "nbytes": 0}
    nbytes = sum(
        e.chunk.nbytes
        for entries in refs.chunks.values()
        for e in entries.values()
        if e.chunk.file in refs.files
    )
    return {"checkpoints": sorted(refs.checkpoints()), "files": len(refs.files), "nbytes": nbytes}


def references_line(summary: dict[str, Any]) -> str:
    """`shardsafe inspect`'s line about what a checkpoint references ("" when nothing)."""
    if not summary["files"]:
        return ""
    return (
        f"\n  references {summary['nbytes']} bytes in {summary['files']} file(s) of checkpoint(s) "
        f"{', '.join(summary['checkpoints'])}"
    )
