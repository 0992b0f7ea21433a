"""Incremental saves: write the chunks that changed, reference the ones the base already holds.

Call order (format and records: `planners.references`):

1. Trainer rank, after the plan is agreed (`plan_incremental`, from `checkpoint.save.pipeline.plan_step`):
   each rank reads its base's metadata itself, once, and keeps the indexed chunks of the boxes it
   writes (`IncrementalPlan`, which travels to the async writer process inside `PreparedSave`).
   The base must be a committed checkpoint in the same run root (a sibling directory): the
   path rule is checked on every rank alike before anything is read, so every rank refuses a bad
   base together. A base whose metadata cannot be read (in flight, failed, damaged) is not
   referenced: the rank writes every chunk, which is always safe, and says so in a warning.
2. Process that writes (`split_items`, from `checkpoint.save.shard_files.write_rank_files`): the
   XXH3-64 of each chunk's first 64 KiB, then the XXH3-128 of all its staged bytes, are compared
   with the base's at the same box, for the same dtype; equal chunks are left out of the files and
   recorded as references to the file that first wrote them (the base's own file, or the file the
   base referenced: one hop, no chain). A chunk whose head already differs is not hashed further
   (optimizer state, dense training), so detection costs one pass over the unchanged bytes only.
   Rank-local tensors are always written. A rank keeps its first file even when every chunk in it
   is referenced, so every writer of a grid key still owns a file (what a load's checks expect).
3. `report`: every chunk's hash and location, and the referenced files, go to the coordinator in
   the rank's write report; the metadata records them (`planners.metadata_build`).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import xxhash

from planners.errors import CheckpointPathError
from planners.metadata import Metadata
from planners.metadata_build import WrittenChunk
from planners.metadata_parse import parse_metadata
from planners.references import HEAD_BYTES, IncrementalReport, IndexedChunk, ReferencedFile
from planners.save_plan import FilePlan, WriteItem
from storage.metadata_file import read_metadata_bytes
from storage.spec import StorageAccess, StorageSpec

logger = logging.getLogger(__name__)

BoxKey = tuple[str, tuple[int, ...], tuple[int, ...]]  # (fqn, offsets, sizes)


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseChunk:
    """A chunk of the base at one box: its dtype, hash and location, and where that file lives."""

    dtype: str
    indexed: IndexedChunk
    location: ReferencedFile  # the checkpoint that holds the file, and the file's size


@dataclass(frozen=True, slots=True, kw_only=True)
class IncrementalPlan:
    """One rank's part of an incremental save: the base's chunks at the boxes this rank writes.

    `base` is the base checkpoint's directory name (None: hash every chunk, reference nothing, as a
    save that starts a chain does).
    """

    base: str | None = None
    chunks: dict[BoxKey, BaseChunk] = field(default_factory=dict)


def base_name(path: str, base: str, access: StorageAccess) -> str:
    """The directory name of `base`, once it is known to be another checkpoint of `path`'s run root.

    Raises:
        CheckpointPathError: `base` is not a sibling directory of `path` (the run root is the parent
            of the checkpoint directory), or is `path` itself.
    """
    here, there = access.resolve(path), access.resolve(base)
    here_root, there_root = here.root.rstrip("/"), there.root.rstrip("/")
    same_run = here.protocol == there.protocol and posixpath.dirname(here_root) == posixpath.dirname(
        there_root
    )
    name = posixpath.basename(there_root)
    if not same_run or name == posixpath.basename(here_root) or name in ("", ".", ".."):
        raise CheckpointPathError(
            f"base checkpoint {there.url} is not another checkpoint of the run of {here.url}: an incremental "
            "save references only a sibling directory of the same run root"
        )
    return name


def plan_incremental(spec: StorageSpec, base: str | None, files: tuple[FilePlan, ...]) -> IncrementalPlan:
    """This rank's `IncrementalPlan`: the base's indexed chunks at the boxes in `files`.

    `spec` is the save's directory; `base` the base's directory name (`base_name`), or None. A base
    that cannot be read is not referenced (logged as a warning): the save writes every chunk.
    """
    if base is None:
        return IncrementalPlan()
    try:
        base_spec = _sibling(spec, base)
        storage = base_spec.open()
        try:
            metadata = parse_metadata(read_metadata_bytes(storage), where=storage.url)
        finally:
            storage.close()
    except Exception as e:  # an unreadable base is never referenced: write everything
        logger.warning(
            "incremental save to %s: base %s is not referenced (%s: %s); every chunk is written",
            spec.url,
            base,
            type(e).__name__,
            e,
        )
        return IncrementalPlan()
    wanted = {(i.fqn, i.box.offsets, i.box.sizes) for fp in files for i in fp.items if not i.rank_local}
    return IncrementalPlan(base=base, chunks=_base_chunks(metadata, base, wanted))


def _sibling(spec: StorageSpec, name: str) -> StorageSpec:
    """The spec of directory `name` beside `spec`'s directory (same file system, same options)."""
    parent_path, _, _ = spec.path.rstrip("/").rpartition("/")
    parent_root, _, _ = spec.root.rstrip("/").rpartition("/")
    parent = StorageSpec(
        protocol=spec.protocol,
        root=parent_root or "/",
        url=spec.url.rstrip("/").rpartition("/")[0] or "/",
        storage_options=spec.storage_options,
        transfer=spec.transfer,
        path=parent_path or "/",
        fs=spec.fs,
    )
    return parent.child(name)


def _base_chunks(metadata: Metadata, base: str, wanted: set[BoxKey]) -> dict[BoxKey, BaseChunk]:
    """The base's indexed chunks at the wanted boxes, each located in the file that holds its bytes."""
    refs = metadata.references
    if refs is None:  # the base recorded no hashes: nothing can be compared
        return {}
    out: dict[BoxKey, BaseChunk] = {}
    for fqn, entries in refs.chunks.items():
        dtype = metadata.tensors[fqn].dtype
        for e in entries.values():
            key = (fqn, e.chunk.box.offsets, e.chunk.box.sizes)
            if key not in wanted:
                continue
            name = e.chunk.file
            if name in refs.files:  # the base referenced it in turn: point at where the bytes are
                location = refs.files[name]
            elif name in metadata.files:
                location = ReferencedFile(checkpoint=base, nbytes=metadata.files[name].nbytes)
            else:
                continue
            out[key] = BaseChunk(dtype=dtype, indexed=e, location=location)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Split:
    """A rank's files with the referenced chunks left out, and what it learnt while hashing."""

    files: tuple[FilePlan, ...]
    hashes: dict[BoxKey, tuple[str, str | None]]  # (head, full) hashes; full is None once the head differed
    referenced: tuple[tuple[str, IndexedChunk], ...]
    referenced_files: dict[str, ReferencedFile]

    def report(self, written: tuple[WrittenChunk, ...]) -> IncrementalReport:
        """The rank's report: every chunk it holds (written ones located where they landed), with hashes."""
        indexed = [
            (
                c.fqn,
                IndexedChunk(
                    chunk=c.chunk, head=self.hashes[_box_key(c)][0], xxh3=self.hashes[_box_key(c)][1]
                ),
            )
            for c in written
            if not c.rank_local and _box_key(c) in self.hashes
        ]
        return IncrementalReport(indexed=(*indexed, *self.referenced), referenced=dict(self.referenced_files))


def _box_key(c: WrittenChunk) -> BoxKey:
    return (c.fqn, c.chunk.box.offsets, c.chunk.box.sizes)


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A chunk's row-major bytes as a flat uint8 tensor, on the tensor's own device."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _host(data: torch.Tensor) -> memoryview:
    return memoryview((data if data.device.type == "cpu" else data.cpu()).numpy())


def split_items(
    plan: IncrementalPlan, files: tuple[FilePlan, ...], tensors: Mapping[str, torch.Tensor]
) -> Split:
    """Hash each chunk this rank writes; leave out those the base holds byte for byte.

    Runs where the bytes are (the trainer for a sync save, the writer process on the staged copy for
    an async one), before any file is opened.
    """
    hashes: dict[BoxKey, tuple[str, str | None]] = {}
    referenced: list[tuple[str, IndexedChunk]] = []
    referenced_files: dict[str, ReferencedFile] = {}
    kept_files: list[FilePlan] = []
    for index, fp in enumerate(files):
        kept: list[WriteItem] = []
        for item in fp.items:
            match = None if item.rank_local else _same_in_base(plan, item, tensors[item.fqn], hashes)
            if match is None:
                kept.append(item)
                continue
            referenced.append((item.fqn, match.indexed))
            referenced_files[match.indexed.chunk.file] = match.location
        if kept or index == 0:
            kept_files.append(FilePlan(stem=fp.stem, items=tuple(kept)))
    return Split(
        files=tuple(kept_files),
        hashes=hashes,
        referenced=tuple(referenced),
        referenced_files=referenced_files,
    )


def _same_in_base(
    plan: IncrementalPlan, item: WriteItem, tensor: torch.Tensor, hashes: dict[BoxKey, tuple[str, str | None]]
) -> BaseChunk | None:
    """The base's chunk when it holds exactly these bytes at this box and dtype (hashes are recorded either way).

    The head hash comes first: a chunk whose head differs from the base's changed, and the rest of it
    is not hashed (dense optimizer state costs one 64 KiB hash per chunk, not a pass over its bytes).
    """
    key = (item.fqn, item.box.offsets, item.box.sizes)
    if item.nbytes == 0:
        return None
    data = _flat_bytes(tensor)  # a device tensor is copied to the host only when its head matches
    head = xxhash.xxh3_64_hexdigest(_host(data[:HEAD_BYTES]))
    found = plan.chunks.get(key)
    if found is not None and (found.indexed.head != head or found.dtype != item.dtype):
        hashes[key] = (head, None)
        return None
    digest = xxhash.xxh3_128_hexdigest(_host(data))
    hashes[key] = (head, digest)
    if found is None or found.indexed.xxh3 != digest or found.indexed.chunk.nbytes != item.nbytes:
        return None
    return found
