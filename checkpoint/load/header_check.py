"""A shard file's own header against the metadata: whose file it is, and which keys it holds.

Both a load (on the headers it reads anyway, `checkpoint.load.grid`) and `verify` run these: a
version-2 shard carries its own checksums, so a same-size file of another save, or of another
rank, would pass them; only its header tells. Problems are returned as text.
"""

from __future__ import annotations

from collections.abc import Iterable

from planners.grid import CHECKSUM_ENTRY
from planners.metadata import FORMAT_NAME, FileRecord, Metadata
from storage.safetensors_io import SafetensorsHeader


def owner_problems(name: str, header: SafetensorsHeader, metadata: Metadata, record: FileRecord) -> list[str]:
    """The header's `__metadata__` must name this save and the rank the metadata says wrote the file.

    A load checks it too, on the headers it reads anyway (`checkpoint.load.grid`): a version-2 file
    carries its own checksums, so a same-size file of another save would pass them.
    """
    save_id, rank = header.metadata.get("save_id"), header.metadata.get("rank")
    if save_id != metadata.save_id or rank != str(record.rank):
        return [
            f"file {name}: its header says save {save_id!r} rank {rank!r}, the metadata says save "
            f"{metadata.save_id!r} rank {record.rank}; the file belongs to another save"
        ]
    if header.metadata != {"format": FORMAT_NAME, "save_id": save_id, "rank": rank}:
        return [
            f"file {name}: its header's __metadata__ holds other entries than format, save_id and rank; "
            "the header is damaged"
        ]
    return []


def header_key_problems(
    name: str, header: SafetensorsHeader, explicit_keys: set[str], grid_keys: Iterable[str]
) -> list[str]:
    """The header's tensor keys against the metadata's, without enumerating grid chunks (a load's check).

    Every key a chunk record places in the file must be in the header; every other key must be a grid
    key (the checksum table aside).
    """
    keys = set(header.tensors) - {CHECKSUM_ENTRY}
    problems = [
        f"file {name}: the header has no tensor {k!r}, which the metadata places in it"
        for k in sorted(explicit_keys - keys)[:1]
    ]
    unknown = sorted(keys - explicit_keys - set(grid_keys))
    if unknown:
        problems.append(f"file {name}: holds tensor {unknown[0]!r} that the metadata does not know")
    return problems
