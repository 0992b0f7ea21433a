"""Assembling the metadata from what the ranks wrote (the coordinator's last step before the commit).

Before any rank writes, the coordinator knows the save's global plan, its
values and its nesting (`MetadataDraft`). After the writes every rank reports
its files and, per chunk, the `ChunkRecord` the metadata needs
(`RankWriteResult`); `build_metadata` joins the two into a `Metadata`. The
records here are the plain data that travels between the ranks and the
coordinator; nothing in this module writes or reads a byte: the writes are
`checkpoint.save.shard_files.write_rank_files`, the publication of the metadata is
`checkpoint.save.commit`.

Chunks of grid keys (DTensor keys of format version 2) are not reported: the
key's grid record and the shard file's header locate them
(`planners.grid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from planners.metadata import (
    CHECKSUM_BLOCK_BYTES,
    PLAIN_FORMAT_VERSION,
    ChunkRecord,
    FileRecord,
    Metadata,
    RankLocalRecord,
    TensorRecord,
)
from planners.references import (
    REFERENCES_SINCE_VERSION,
    IncrementalReport,
    build_references,
    referenced_plain_chunks,
)
from planners.save_plan import GlobalPlan
from planners.values import JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataDraft:
    """What the coordinator knows before the writes; `build_metadata` completes it with the write results."""

    global_plan: GlobalPlan
    values: dict[str, JSON]
    structure: JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class WrittenChunk:
    """One chunk a rank wrote, as the metadata will record it.

    `chunk` is the metadata's own `ChunkRecord` (box, file, key, byte range,
    block checksums), built by the writer from its plan item and what the
    storage layer reported (`storage.safetensors_io.WrittenTensor`); the
    other fields say which metadata entry it belongs to.
    """

    fqn: str
    dtype: str
    rank_local: bool  # a whole tensor of this rank's own (`RankLocal`), not a chunk of a shared key
    chunk: ChunkRecord


@dataclass(frozen=True, slots=True, kw_only=True)
class RankWriteResult:
    """A rank's report to the coordinator: the file sizes and chunks to commit, or the error that stops it."""

    rank: int
    files: dict[str, int] = field(default_factory=dict)  # name -> nbytes
    chunks: tuple[WrittenChunk, ...] = ()
    rank_local_values: dict[str, JSON] = field(default_factory=dict)
    error: str | None = None
    # Incremental saves only: the rank's chunk hashes and the chunks it referenced (planners.references).
    incremental: IncrementalReport | None = None


def build_metadata(
    draft: MetadataDraft, results: Sequence[RankWriteResult], *, save_id: str, world_size: int
) -> Metadata:
    """Complete the coordinator's draft with every rank's written chunks and files.

    Args:
        draft: the coordinator's plan, values and nesting of this save.
        results: one successful result per rank (`results[i].rank` in `range(len(results))`).
        save_id: the save's id, which names its shard files.
        world_size: ranks in the saving job.

    Returns:
        The metadata to publish; chunks of each tensor sorted by their box offsets.
    """
    reports = [r.incremental for r in results]
    references = build_references(reports)
    # A save that references no file keeps the previous version, so older readers still read it.
    version = (
        REFERENCES_SINCE_VERSION if references is not None and references.files else PLAIN_FORMAT_VERSION
    )
    grids = draft.global_plan.grid_fields.get("grids", {})
    return Metadata(
        version=version,
        save_id=save_id,
        world_size=world_size,
        checksum_block_bytes=CHECKSUM_BLOCK_BYTES,
        tensors=_tensor_records(draft.global_plan, results, referenced_plain_chunks(reports, grids)),
        values=draft.values,
        rank_local=_rank_local_records(results),
        files=_file_records(results),
        structure=draft.structure,
        **draft.global_plan.grid_fields,
        references=references,
    )


def _file_records(results: Sequence[RankWriteResult]) -> dict[str, FileRecord]:
    return {name: FileRecord(nbytes=n, rank=r.rank) for r in results for name, n in r.files.items()}


def _tensor_records(
    plan: GlobalPlan, results: Sequence[RankWriteResult], referenced: dict[str, list[ChunkRecord]]
) -> dict[str, TensorRecord]:
    """Every planned tensor with its reported and referenced chunks (none for a grid key), in box order."""
    chunks: dict[str, list[ChunkRecord]] = {fqn: [] for fqn in plan.tensors}
    for c in (c for r in results for c in r.chunks if not c.rank_local):
        chunks[c.fqn].append(c.chunk)
    for fqn, extra in referenced.items():
        chunks[fqn].extend(extra)
    return {
        fqn: TensorRecord(dtype=dtype, shape=shape, chunks=_in_box_order(chunks[fqn]))
        for fqn, (dtype, shape) in plan.tensors.items()
    }


def _in_box_order(chunks: list[ChunkRecord]) -> tuple[ChunkRecord, ...]:
    # Most keys of a large state dict have one chunk or none (grid keys): no sort to pay for them.
    return tuple(chunks) if len(chunks) < 2 else tuple(sorted(chunks, key=lambda c: c.box.offsets))


def _rank_local_records(results: Sequence[RankWriteResult]) -> dict[str, RankLocalRecord]:
    """Per rank-local key, each rank's tensor or value (a rank holds one of the two)."""
    ranks = len(results)
    tensors: dict[str, list[tuple[str, ChunkRecord] | None]] = {}
    values: dict[str, list[JSON]] = {}
    for r in results:
        for c in (c for c in r.chunks if c.rank_local):
            tensors.setdefault(c.fqn, [None] * ranks)[r.rank] = (c.dtype, c.chunk)
        for fqn, v in r.rank_local_values.items():
            values.setdefault(fqn, [None] * ranks)[r.rank] = v
    return {
        fqn: RankLocalRecord(
            tensors=tuple(tensors.get(fqn, [None] * ranks)), values=tuple(values.get(fqn, [None] * ranks))
        )
        for fqn in sorted(set(tensors) | set(values))
    }
