"""`torch.distributed.checkpoint.load.loader` from a shardsafe checkpoint: a DCP `StorageReader`.

DCP's load runs in three steps on every rank: `read_metadata` (the reader
describes the checkpoint as DCP `Metadata`: each tensor's global shape and
saved chunks, each non-tensor key as bytes), then DCP's planner intersects
the target's chunks with the saved ones and hands back `ReadItem`s, then
`read_data` fills each one. This reader answers the first step from
shardsafe's metadata (`dcp_metadata`: chunk records, or the cells of a
DTensor grid key of format version 2) and runs the third through
shardsafe's own `ChunkReader`, so only the byte ranges a rank needs are
read, every block is checked against its crc32c before it reaches a
target, and a grid key's chunks are located from the few shard headers
this rank reads from.

Non-tensor values are typed JSON: a pickled one is refused unless the
reader was built with `allow_pickle=True`. DCP's planner takes bytes
items through `torch.load` (see `_value_bytes`), so a value goes to it as
bytes this reader serialised itself from the decoded value, never as bytes
from the checkpoint. Rank-local keys (`checkpoint.RankLocal`) have no DCP
equivalent and are not offered. DCP wraps whatever a rank raises into its
`CheckpointException`; shardsafe's error (e.g. `CorruptCheckpointError`)
is in its `failures[rank][0]`.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.metadata import Metadata as DcpMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from checkpoint.load.chunk_reader import ChunkReader
from checkpoint.load.loader import read_metadata
from checkpoint.load.values import decode
from checkpoint.options import DEFAULT_MAX_METADATA_BYTES, LoadOptions
from checkpoint.state.dtypes import dtype_from_name
from planners.boxes import Box, full_box
from planners.errors import CheckpointError, InvalidCheckpointError
from planners.load_plan import LoadTarget
from planners.metadata import METADATA_FILE, Metadata
from planners.values import MAX_VALUE_DEPTH
from storage.backend import CheckpointStorage
from storage.spec import StorageAccess

__all__ = ["ShardsafeStorageReader", "dcp_metadata"]

logger = logging.getLogger(__name__)


class ShardsafeStorageReader(StorageReader):
    """Reads a shardsafe checkpoint (format version 1 or 2) for `torch.distributed.checkpoint.load.loader`.

    Call order (DCP's, on every rank): `reset`, `read_metadata`, `set_up_storage_reader`,
    `prepare_local_plan`, then `prepare_global_plan` on the coordinator, then `read_data`.

    Args:
        path: local path or fsspec URL of a committed shardsafe checkpoint.
        storage_options: fsspec options (credentials, endpoint) for a remote path.
        verify: check the crc32c of every block read (default True).
        allow_pickle: hand pickled values to DCP (default False: `PickleNotAllowedError`).
        io_threads: shard files read at once.

    Example:
        >>> import torch.distributed.checkpoint as dcp
        >>> dcp.load(state_dict, storage_reader=ShardsafeStorageReader("/tmp/run/step-1"))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
        allow_pickle: bool = False,
        io_threads: int = 8,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._access = StorageAccess(storage_options=storage_options)
        self._options = LoadOptions(verify=verify, allow_pickle=allow_pickle, io_threads=io_threads)
        self._metadata: Metadata | None = None
        self._values: dict[str, tuple[str, Any]] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Forget the metadata read; a `checkpoint_id` given to `dcp.load` replaces the path."""
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._metadata = None
        self._values = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """True when `checkpoint_id` is a path holding a shardsafe metadata file."""
        if not isinstance(checkpoint_id, (str, os.PathLike)):
            return False
        try:
            storage = StorageAccess().resolve(os.fspath(checkpoint_id)).open()
        except (CheckpointError, OSError, ValueError):
            return False
        try:
            return storage.exists(METADATA_FILE)
        finally:
            storage.close()

    def read_metadata(self) -> DcpMetadata:
        """The checkpoint as DCP `Metadata` (read and checked once; the digest of version 2 included).

        Raises:
            FileNotFoundError: no checkpoint at the path (`IncompleteCheckpointError`: an interrupted save).
            InvalidCheckpointError: the metadata is malformed.
        """
        with self._storage() as storage:
            self._metadata = read_metadata(storage, max_bytes=DEFAULT_MAX_METADATA_BYTES)
        self._values = value_keys(self._metadata)
        return dcp_metadata(self._metadata, self._values)

    def set_up_storage_reader(
        self, metadata: DcpMetadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self._metadata is None:  # DCP read the metadata through another reader object
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fill every item of this rank's plan: tensors through shardsafe's checked reads, values as bytes.

        Raises:
            CorruptCheckpointError: a block read does not match its checksum (nothing of that file is copied).
            PickleNotAllowedError: a value asked for is pickled and the reader does not allow pickle.
        """
        if self._metadata is None:
            self.read_metadata()
        metadata = self._metadata
        assert metadata is not None  # read just above
        start = time.perf_counter()
        with self._storage() as storage:
            reader = ChunkReader(
                storage, metadata, verify=self._options.verify, io_threads=self._options.io_threads
            )
            jobs, fills = [], []
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(self._value_bytes(item.storage_index.fqn)))
                    continue
                dest = planner.resolve_tensor(item).detach()
                into = _read_target(dest, metadata, item.storage_index.fqn, where=storage.url)
                jobs += [
                    (read, into)
                    for read in reader.plan(_load_target(item, metadata, into), _record(metadata, item))
                ]
                fills.append((item, dest, into))
            reader.run(jobs)
        for item, dest, into in fills:
            if into is not dest:
                with torch.no_grad():
                    dest.copy_(into)
            planner.commit_tensor(item, dest)
        logger.info(
            "DCP read of %s: %d items, %d bytes read in %.3fs",
            self.path,
            len(plan.items),
            reader.bytes_read,
            time.perf_counter() - start,
        )
        done: Future[None] = Future()  # DCP waits on a torch future
        done.set_result(None)
        return done

    def _value_bytes(self, fqn: str) -> bytes:
        """A value as DCP's planner reads bytes items: `torch.save` of the decoded value."""
        key, node = self._values[fqn]
        value = decode(node, key, self._options, self.path)
        out = io.BytesIO()
        torch.save(value, out)
        return out.getvalue()

    def _storage(self) -> _Opened:
        return _Opened(self._access.resolve(self.path).open())


class _Opened:
    """A storage closed when the block ends (`CheckpointStorage` is not a context manager)."""

    def __init__(self, storage: CheckpointStorage) -> None:
        self.storage = storage

    def __enter__(self) -> CheckpointStorage:
        return self.storage

    def __exit__(self, *exc: object) -> None:
        self.storage.close()


def dcp_metadata(metadata: Metadata, values: dict[str, tuple[str, Any]] | None = None) -> DcpMetadata:
    """DCP's description of a shardsafe checkpoint: tensors with their saved chunks, values as bytes.

    Args:
        metadata: the parsed shardsafe metadata.
        values: the DCP keys of non-tensor values (`value_keys`; computed when None).
    """
    where = "shardsafe metadata"
    described: dict[str, Any] = {}
    grids = metadata.grid_index() if metadata.grids else None
    for fqn, record in metadata.tensors.items():
        if grids is not None and fqn in metadata.grids:  # version 2: the grid's cells are the saved chunks
            boxes = [cell.box for cell in grids.cells(fqn, full_box(record.shape))]
        else:
            boxes = [chunk.box for chunk in record.chunks]
        described[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype_from_name(record.dtype, where=where)),
            size=torch.Size(record.shape),
            chunks=[
                ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes)) for b in boxes
            ],
        )
    for fqn in values if values is not None else value_keys(metadata):
        described.setdefault(fqn, BytesStorageMetadata())
    return DcpMetadata(state_dict_metadata=described)


def value_keys(metadata: Metadata) -> dict[str, tuple[str, Any]]:
    """Every DCP key of a non-tensor value: (the shardsafe key, the typed JSON it names).

    A saved container of plain values is one shardsafe key, but DCP flattens every dict, and
    every list holding a dict, down to their leaves (its own save of `{"meta": {"epoch": 3}}`
    has the key `meta.epoch` and no `meta`; an optimizer's `param_groups` becomes
    `param_groups.0.lr`, ...). The values are offered under the keys DCP's own checkpoint
    would have, down to `MAX_VALUE_DEPTH` levels, so DCP's planner finds what it looks for.
    """
    out: dict[str, tuple[str, Any]] = {}
    for key, node in metadata.values.items():
        for fqn, leaf in _leaves(key, node, depth=0):
            out.setdefault(fqn, (key, leaf))
    return out


def _leaves(fqn: str, node: Any, *, depth: int) -> Iterator[tuple[str, Any]]:
    if depth >= MAX_VALUE_DEPTH or _is_leaf(node, depth):
        yield fqn, node
    elif type(node) is list:
        for i, entry in enumerate(node):
            yield from _leaves(f"{fqn}.{i}", entry, depth=depth + 1)
    else:
        for pair in node["dict"]:
            if type(pair) is list and len(pair) == 2 and _is_scalar(pair[0]):
                yield from _leaves(f"{fqn}.{pair[0]}", pair[1], depth=depth + 1)


def _is_leaf(node: Any, depth: int) -> bool:
    """DCP's rule in typed JSON: a dict is walked, and so is a list with a walked entry."""
    if _is_dict(node):
        return False
    if type(node) is not list or depth >= MAX_VALUE_DEPTH:
        return True
    return all(_is_leaf(entry, depth + 1) for entry in node)


def _is_dict(node: Any) -> bool:
    return type(node) is dict and len(node) == 1 and type(node.get("dict")) is list


def _is_scalar(key: Any) -> bool:
    """A dict key DCP spells as `str(key)` (typed keys such as tuples are left out)."""
    return key is None or type(key) in (str, int, bool, float)


def _record(metadata: Metadata, item: ReadItem) -> Any:
    return metadata.tensors[item.storage_index.fqn]


def _read_target(dest: torch.Tensor, metadata: Metadata, fqn: str, *, where: str) -> torch.Tensor:
    """Where the bytes land: the target itself, or a CPU tensor of the saved dtype copied over afterwards."""
    saved = dtype_from_name(metadata.tensors[fqn].dtype, where=where)
    if dest.dtype == saved and dest.device.type == "cpu":
        return dest
    return torch.empty(tuple(dest.shape), dtype=saved)


def _load_target(item: ReadItem, metadata: Metadata, into: torch.Tensor) -> LoadTarget:
    """The box DCP asks for, in the saved tensor's global coordinates."""
    fqn = item.storage_index.fqn
    record = metadata.tensors[fqn]
    chunk_offsets = item.storage_index.offset or torch.Size([0] * len(record.shape))
    offsets = tuple(c + s for c, s in zip(chunk_offsets, item.storage_offsets))
    box = Box(offsets=offsets, sizes=tuple(item.lengths))
    if tuple(into.shape) != box.sizes or not box.within(record.shape):
        raise InvalidCheckpointError(
            f"key {fqn!r}: DCP asked for the box at {list(offsets)} of sizes {list(box.sizes)}, which does not "
            f"fit the saved shape {list(record.shape)} or its target of shape {list(into.shape)}"
        )
    return LoadTarget(fqn=fqn, dtype=into.dtype, global_shape=record.shape, box=box)
