"""The checkpoint's metadata: the complete map from every key to its bytes.

The coordinator writes it last; its presence is what makes a checkpoint
complete. It is JSON with a format version. This module holds the records
and their writing; reading untrusted bytes back into them, with every field
checked, is `planners.metadata_parse`. The on-disk schema is documented in
docs/FORMAT.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from planners.boxes import Box
from planners.digest import seal
from planners.global_plan import Mesh
from planners.grid import GridIndex, GridRecord, grid_json, mesh_json

FORMAT_NAME = "shardsafe"
# Bump on any change an older reader would misread; readers accept every
# version up to their own. Version 2 adds the metadata digest (planners.digest)
# and grid records for DTensor keys (planners.grid). Version 3 adds references to chunks of an
# earlier checkpoint of the run (planners.references); a save that references nothing still writes 2.
FORMAT_VERSION = 3
# What a checkpoint that references no other checkpoint is written as (readable by version-2 readers).
PLAIN_FORMAT_VERSION = 2
# The first version whose metadata must carry a digest.
DIGEST_SINCE_VERSION = 2
METADATA_FILE = "metadata.json"
# The default cap on the metadata file's size (CheckpointReaderConfig.max_metadata_bytes): a reader
# refuses a larger metadata.json before reading it, whatever it claims to hold.
DEFAULT_MAX_METADATA_BYTES = 256 * 1024 * 1024
# Shard file names: shard-<save id>-r<rank>-<index>.safetensors. Nothing else
# is ever read as data, and nothing else is ever deleted by cleanup.
SHARD_FILE_RE = re.compile(
    r"^shard-(?P<save_id>[0-9a-f]{8,32})-r(?P<rank>\d{5,})-(?P<index>\d{3,})\.safetensors$"
)
# Checksums cover blocks of this many bytes of each chunk, so a resharded load
# that reads part of a chunk can still verify what it read, at the cost of
# reading at most one block more at each end of a byte run.
CHECKSUM_BLOCK_BYTES = 512 * 1024
# Anything this big is a hostile file, not a tensor (bytes, elements).
MAX_NUMEL = 1 << 50
MAX_FILE_BYTES = 1 << 52


def shard_file_name(save_id: str, stem: str) -> str:
    return f"shard-{save_id}-{stem}.safetensors"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRecord:
    """Where one chunk's bytes lie: `nbytes` at `offset_bytes` of `file`, under safetensors key `key`.

    The writer builds it as soon as a file is written (`planners.metadata_build.WrittenChunk`
    carries it to the coordinator), so the metadata records exactly what was written.
    """

    box: Box
    file: str
    key: str
    offset_bytes: int
    nbytes: int
    checksums: tuple[int, ...]  # crc32c of each checksum block of the chunk's bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorRecord:
    """One saved tensor: its dtype name, its global shape, and the chunks that tile it exactly.

    The global shape is recorded apart from the chunks so that a load can reshard into any layout: the loader
    intersects the boxes its target holds with the chunks' boxes, whatever world size saved them.
    """

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RankLocalRecord:
    """One rank-local key: per saving rank, a whole tensor (dtype, chunk) or a typed-JSON value."""

    tensors: tuple[tuple[str, ChunkRecord] | None, ...]  # per rank: (dtype, chunk) or None
    values: tuple[Any, ...]  # per rank: typed JSON when tensors[rank] is None

    @property
    def world_size(self) -> int:
        return len(self.tensors)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRecord:
    """One shard file the checkpoint needs: its exact size and the rank that wrote it.

    The size lets a load or `verify` refuse a truncated file before reading it, and the rank names who to
    blame in messages; files not listed here are leftovers of other saves (`planners.leftovers`).
    """

    nbytes: int
    rank: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Metadata:
    """The parsed `metadata.json`: everything a load needs, written last so its presence commits the save.

    Tensors are found through `tensors` (chunk records), non-tensor leaves are typed JSON in `values`, per-rank
    leaves in `rank_local`, the files the checkpoint consists of in `files`, and the original nesting of the state
    dict in `structure`. `save_id` names the save's shard files, so files of other saves are told apart.
    """

    version: int
    save_id: str
    world_size: int
    checksum_block_bytes: int
    tensors: dict[str, TensorRecord]
    values: dict[str, Any]  # fqn -> typed JSON (see planners.values)
    rank_local: dict[str, RankLocalRecord]
    files: dict[str, FileRecord]
    structure: Any
    # Version 2 (planners/grid.py): DTensor keys recorded as grids; their TensorRecord has no chunks.
    meshes: tuple[Mesh, ...] = ()
    grids: dict[str, GridRecord] = field(default_factory=dict)
    # Incremental saves (planners.references.References): chunk hashes, and from version 3 the files
    # of other checkpoints this one reads. Typed loosely: planners.references builds on this module.
    references: Any = None

    def grid_index(self) -> GridIndex:
        """Finds the chunks of grid keys (plain tensors held by every rank enter the writer rule)."""
        plain = {k: (t.dtype, t.shape) for k, t in self.tensors.items() if k not in self.grids}
        return GridIndex(meshes=self.meshes, grids=self.grids, plain=plain, world_size=self.world_size)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "save_id": self.save_id,
            "world_size": self.world_size,
            "checksum_block_bytes": self.checksum_block_bytes,
            "files": {n: {"nbytes": f.nbytes, "rank": f.rank} for n, f in sorted(self.files.items())},
            "tensors": {
                k: {"dtype": t.dtype, "shape": list(t.shape), "chunks": [chunk_json(c) for c in t.chunks]}
                if k not in self.grids
                else {"dtype": t.dtype, "shape": list(t.shape), "grid": grid_json(self.grids[k])}
                for k, t in self.tensors.items()
            },
            **({"meshes": [mesh_json(m) for m in self.meshes]} if self.meshes else {}),
            "values": self.values,
            "rank_local": {
                k: [
                    {"tensor": {"dtype": t[0], **chunk_json(t[1])}} if t is not None else {"value": v}
                    for t, v in zip(r.tensors, r.values)
                ]
                for k, r in self.rank_local.items()
            },
            "structure": self.structure,
            **({"references": self.references.to_json()} if self.references is not None else {}),
        }
        if self.version < DIGEST_SINCE_VERSION:
            # Compact separators keep json on its C encoder (indent= forces the Python one: ~5x slower
            # for a 10,000-tensor checkpoint).
            return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        return seal(doc)


def chunk_json(c: ChunkRecord) -> dict[str, Any]:
    """One chunk as the metadata document writes it."""
    return {
        "offsets": list(c.box.offsets),
        "sizes": list(c.box.sizes),
        "file": c.file,
        "key": c.key,
        "offset_bytes": c.offset_bytes,
        "nbytes": c.nbytes,
        "crc32c": list(c.checksums),
    }


def first_byte_overlap(chunks: Iterable[tuple[str, ChunkRecord]], *, label: str = "file") -> str | None:
    """Where two of `chunks` (`(key, chunk)` pairs) claim the same bytes of one file, or None.

    Each byte of a shard file belongs to at most one chunk; `label` names the kind of file in the message.
    """
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for fqn, c in chunks:
        if c.nbytes:
            by_file.setdefault(c.file, []).append((c.offset_bytes, c.offset_bytes + c.nbytes, fqn))
    for name, spans in by_file.items():
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                return (
                    f"{label} {name}: the bytes of key {second!r} from offset {start} overlap those of key "
                    f"{first!r} (ending at {end}); each byte of a file belongs to one chunk"
                )
    return None
