"""What a load returns where its target holds no tensor to read into.

A target leaf that is not a tensor (a plain value, or None: "load this key")
takes the saved value at its path, whatever it is: a decoded typed-JSON
value, the part of one that the path names (planners.select), a whole
tensor, or a whole saved subtree. A load without a target is the subtree at
the root. Rank-local values are also resolved here, for either kind of load.
Tensors are allocated only after their chunks are known to lie inside real
files, and their reads are queued for the load's chunk reader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from checkpoint.state.dtypes import dtype_from_name
from checkpoint.state.flatten import rebuild
from planners.boxes import full_box
from planners.errors import InvalidCheckpointError, PickleNotAllowedError
from planners.load_plan import LoadTarget, ReadItem
from planners.metadata import Metadata, TensorRecord
from planners.select import ABSENT, index_structure, locate, pick
from planners.values import decode_value

if TYPE_CHECKING:
    from checkpoint.load.chunk_reader import ChunkReader
    from checkpoint.options import LoadOptions

Jobs = list[tuple[ReadItem, torch.Tensor]]


class SavedValues:
    """What a load returns where the target holds no tensor: decoded values, whole tensors, subtrees.

    A target leaf that is not a tensor (a plain value, or None: "load this key") takes the saved
    value at its path, whatever it is; a path inside a saved typed-JSON value picks that part of it
    (planners.select). Tensors are allocated whole and their reads queued on `jobs`; they hold
    their bytes once the caller has run the jobs, and then `placed` moves them to `map_location`.
    """

    def __init__(
        self,
        metadata: Metadata,
        reader: ChunkReader,
        jobs: Jobs,
        options: LoadOptions,
    ) -> None:
        self.metadata, self.reader, self.jobs, self.options = metadata, reader, jobs, options
        self.produced: set[str] = set()  # target keys given saved tensors, to place after the reads
        self._tensors: dict[str, torch.Tensor] = {}
        self._decoded: dict[str, Any] = {}
        self._index: dict[tuple, Any] | None = None

    def at(self, fqn: str, path: tuple) -> Any:
        """The saved value for the target leaf at `path`, or `ABSENT`."""
        m = self.metadata
        if fqn in m.values:
            return self._decode(fqn)
        if fqn in m.tensors or fqn in m.rank_local:
            self.produced.add(fqn)
            return self._leaf("tensor" if fqn in m.tensors else "rank_local", fqn)
        if self._index is None:
            self._index = index_structure(m.structure)
        found = locate(self._index, path)
        if found is None:
            return ABSENT
        if "value" in found.node:
            return pick(self._decode(found.node["value"]), found.rest)
        self.produced.add(fqn)
        return self.subtree(found.node)

    def subtree(self, node: Any) -> Any:
        return rebuild(node, self._leaf)

    def _leaf(self, kind: str, fqn: str) -> Any:
        if kind == "tensor":
            return self._tensor(fqn)
        if kind == "rank_local":
            rec = self.metadata.rank_local[fqn]
            return [
                rank_local_value(rec, r, None, self.reader, self.jobs, fqn, self.options)
                for r in range(rec.world_size)
            ]
        return self._decode(fqn)

    def _tensor(self, fqn: str) -> torch.Tensor:
        dest = self._tensors.get(fqn)
        if dest is None:
            record = self.metadata.tensors[fqn]
            dtype = dtype_from_name(record.dtype, where=self.reader.storage.url)
            for chunk in record.chunks:  # the chunks tile the tensor: the allocation is bounded by real bytes
                self.reader.require_bytes(fqn, chunk)
            whole = LoadTarget(fqn=fqn, dtype=dtype, global_shape=record.shape, box=full_box(record.shape))
            # Planned before allocating: a grid key's chunks are located and checked against their files here.
            items = self.reader.plan(whole, record)
            dest = self._tensors[fqn] = torch.empty(record.shape, dtype=dtype)
            self.jobs += [(item, dest) for item in items]
        return dest

    def _decode(self, fqn: str) -> Any:
        if fqn not in self._decoded:
            self._decoded[fqn] = decode(self.metadata.values[fqn], fqn, self.options, self.reader.storage.url)
        return self._decoded[fqn]

    def placed(self, value: Any) -> Any:
        """`value` with every tensor in it moved by `map_location` (call after the reads ran)."""
        if self.options.map_location is None:
            return value
        return _map_tensors(value, _placer(self.options.map_location))


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def decode(value: Any, fqn: str, options: LoadOptions, where: str) -> Any:
    """A value leaf, refused with the checkpoint named when it is malformed or pickled without opt-in."""
    try:
        return decode_value(value, key=fqn, allow_pickle=options.allow_pickle)
    except (InvalidCheckpointError, PickleNotAllowedError) as e:
        raise type(e)(f"{where}: {e}") from None


def _placer(map_location: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if map_location is None:
        return lambda t: t
    if callable(map_location):
        return map_location
    return lambda t: t.to(map_location)


def rank_local_value(
    record: Any, rank: int, current: Any, reader: ChunkReader, jobs: list, fqn: str, options: LoadOptions
) -> Any:
    entry = record.tensors[rank]
    if entry is None:
        return decode(record.values[rank], fqn, options, reader.storage.url)
    dtype_name, chunk = entry
    dtype = dtype_from_name(dtype_name, where=reader.storage.url)
    shape = chunk.box.sizes
    if (
        isinstance(current, torch.Tensor)
        and current.dtype == dtype
        and tuple(current.shape) == shape
        and current.device.type != "meta"
    ):
        dest = current  # filled in place, like any other target tensor
    else:
        reader.require_bytes(fqn, chunk)
        dest = torch.empty(shape, dtype=dtype)
    record_t = TensorRecord(dtype=dtype_name, shape=shape, chunks=(chunk,))
    jobs += [
        (item, dest)
        for item in reader.plan(
            LoadTarget(fqn=fqn, dtype=dtype, global_shape=shape, box=full_box(shape)), record_t
        )
    ]
    return dest
