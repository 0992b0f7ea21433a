"""Chunk records for grid keys (format version 2), built from the few shard headers a rank needs.

Loading a grid key asks `planners.grid.GridIndex` which saved chunks
overlap the target box and which rank wrote each; the chunk's bytes and
block checksums come from that rank's shard files: the safetensors header
(offsets, shape, dtype) and the file's checksum table. Each header and table
is read once per load and only for files the rank reads data from, so the
bytes a loading rank reads besides its data grow with the files it touches,
not with the world size. What a header says is checked before it is
trusted: its save id, rank and key set against the metadata (as `verify`
does, since a same-size file of another save carries checksums of its own
that its bytes pass), and each chunk's shape and dtype against the grid.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from checkpoint.load.header_check import header_key_problems, owner_problems
from checkpoint.state.dtypes import safetensors_code
from planners.boxes import Box
from planners.errors import CorruptCheckpointError, InvalidCheckpointError
from planners.grid import CHECKSUM_ENTRY, Cell
from planners.metadata import ChunkRecord, Metadata, TensorRecord
from storage.backend import CheckpointStorage
from storage.checksummed_shard import checksum_slices, parse_checksum_table
from storage.safetensors_io import SafetensorsHeader, read_header


class GridResolver:
    """Explicit chunk records for the boxes one rank loads of grid keys."""

    def __init__(self, storage: CheckpointStorage, metadata: Metadata) -> None:
        self.storage = storage
        self.metadata = metadata
        self.index = metadata.grid_index()
        self._files: dict[int, list[str]] = defaultdict(list)
        for name, f in sorted(metadata.files.items()):
            self._files[f.rank].append(name)
        self._headers: dict[str, tuple[SafetensorsHeader, dict[str, tuple[int, int]]]] = {}
        self._tables: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self._explicit_keys: dict[str, set[str]] | None = None  # built at the first header read
        self.bytes_read = 0  # headers and checksum tables

    def record(self, fqn: str, box: Box) -> TensorRecord:
        """`fqn`'s record restricted to the saved chunks overlapping `box`, each fully located."""
        saved = self.metadata.tensors[fqn]
        chunks = tuple(self.chunk(fqn, cell) for cell in self.index.cells(fqn, box))
        return TensorRecord(dtype=saved.dtype, shape=saved.shape, chunks=chunks)

    def all_records(self) -> dict[str, TensorRecord]:
        """Every grid key with all its chunks (what `verify` checks); reads every writer's headers."""
        return {
            fqn: self.record(fqn, Box(offsets=(0,) * len(g.shape), sizes=g.shape))
            for fqn, g in self.metadata.grids.items()
        }

    def chunk(self, fqn: str, cell: Cell) -> ChunkRecord:
        """The located record of one saved chunk, from its writer's shard header and checksum table.

        Raises:
            InvalidCheckpointError: the writer's file does not hold the chunk as the grid says, naming the file.
            FileNotFoundError: a file of the writer is missing.
        """
        where = f"{self.storage.url}: key {fqn!r}"
        refs = self.metadata.references  # incremental: a referenced chunk lies in another checkpoint's file
        referenced = None if refs is None else refs.referenced_chunk(fqn, cell.box)
        if referenced is not None:
            return referenced
        names = self._files.get(cell.writer, [])
        for name in names:
            header, slices = self._header(name)
            entry = header.tensors.get(fqn)
            if entry is None:
                continue
            dtype = self.metadata.grids[fqn].dtype
            if entry.shape != cell.box.sizes or entry.dtype != safetensors_code(dtype):
                raise InvalidCheckpointError(
                    f"{where}: file {name} holds shape {list(entry.shape)} {entry.dtype} where the grid puts "
                    f"the chunk at {list(cell.box.offsets)} of sizes {list(cell.box.sizes)} {dtype}"
                )
            first, count = slices[fqn]
            return ChunkRecord(
                box=cell.box,
                file=name,
                key=fqn,
                offset_bytes=entry.offset_bytes,
                nbytes=entry.nbytes,
                checksums=self._table(name, header)[first : first + count],
            )
        raise InvalidCheckpointError(
            f"{where}: the chunk at {list(cell.box.offsets)} was written by rank {cell.writer}, "
            f"but none of its files {names[:4]} holds the key"
        )

    def _header(self, name: str) -> tuple[SafetensorsHeader, dict[str, tuple[int, int]]]:
        with self._lock:
            if name not in self._headers:
                where = f"{self.storage.url}/{name}"
                expected = self.metadata.files[name].nbytes
                header = read_header(self.storage, name, where=self.storage.url, expected_bytes=expected)
                self._check_owner(name, header, where)
                slices = checksum_slices(header, block_bytes=self.metadata.checksum_block_bytes, where=where)
                self._headers[name] = (header, slices)
                self.bytes_read += header.data_offset_bytes
            return self._headers[name]

    def _check_owner(self, name: str, header: SafetensorsHeader, where: str) -> None:
        """The header must name this save, the file's rank and only keys the metadata puts there."""
        if self._explicit_keys is None:
            self._explicit_keys = explicit_keys_by_file(self.metadata)
        problems = owner_problems(name, header, self.metadata, self.metadata.files[name])
        problems = problems or header_key_problems(
            name, header, self._explicit_keys.get(name, set()), self.metadata.grids
        )
        if problems:
            raise CorruptCheckpointError(
                f"{where}: {problems[0]}; this checkpoint cannot be loaded as it is: restore the file "
                "from a copy of this save, or load another checkpoint"
            )

    def _table(self, name: str, header: SafetensorsHeader) -> tuple[int, ...]:
        with self._lock:
            if name not in self._tables:
                entry = header.tensors[CHECKSUM_ENTRY]
                (raw,) = self.storage.read_ranges(name, [(entry.offset_bytes, entry.nbytes)])
                self._tables[name] = parse_checksum_table(raw)
                self.bytes_read += entry.nbytes
            return self._tables[name]


def explicit_keys_by_file(metadata: Metadata) -> dict[str, set[str]]:
    """Per shard file, the safetensors keys its chunk records (plain and rank-local tensors) name."""
    out: dict[str, set[str]] = defaultdict(set)
    for record in metadata.tensors.values():
        for c in record.chunks:
            out[c.file].add(c.key)
    for rank_local in metadata.rank_local.values():
        for entry in rank_local.tensors:
            if entry is not None:
                out[entry[1].file].add(entry[1].key)
    return out
