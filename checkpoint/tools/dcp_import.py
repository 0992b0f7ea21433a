"""Convert a torch.distributed.checkpoint (DCP) directory into a shardsafe checkpoint, streaming.

A DCP directory (torchtitan's, or any `dcp.save`) holds `.metadata`, a
pickle of DCP's `Metadata`, and `__<rank>_<n>.distcp` files of
`torch.save`d chunks. Unpickling runs whatever code the file names, so the
conversion refuses to start unless the caller says the directory is trusted
(`trust_pickle=True`, `--trust-pickle`); shardsafe's own metadata is JSON and
never needs that trust again.

The conversion goes tensor by tensor: DCP's own loader (`dcp.load` with a
one-key target, no process group) assembles one whole tensor from its
chunks, and its bytes go straight into a shardsafe shard file whose header
was written first (every shape and dtype is known from DCP's metadata), with
the crc32c of every block. Peak memory is about the largest tensor, not the
model. The metadata is published last, as in any shardsafe save, so an
interrupted conversion leaves an incomplete checkpoint, never a wrong one.

DCP's non-tensor entries (an optimizer's `param_groups`, step counters) are
pickled objects too: they become shardsafe values, typed JSON when they are
plain (ints, floats, strings, lists, tuples, dicts), pickled otherwise, so
loading those few still needs `allow_pickle=True`. Keys keep DCP's flat,
dotted names, which are the names shardsafe gives a nested target's leaves,
so `{"model": ..., "optim": ...}` loads as it was saved with DCP.
"""

from __future__ import annotations

import logging
import os
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import crc32c
import torch
import torch.distributed.checkpoint as dcp

# FsspecReader is DCP's public reader for fsspec URLs, though the package does not re-export it.
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoint.tools.hf_export import plan_files
from planners.boxes import full_box
from planners.dtypes import dtype_name
from planners.errors import CheckpointExistsError, PickleNotAllowedError
from planners.metadata import (
    CHECKSUM_BLOCK_BYTES,
    METADATA_FILE,
    PLAIN_FORMAT_VERSION,
    ChunkRecord,
    FileRecord,
    Metadata,
    TensorRecord,
    shard_file_name,
)
from planners.values import encode_value
from storage.backend import CheckpointStorage
from storage.safetensors_io import WRITE_SLICE_BYTES, build_header, tensor_bytes
from storage.spec import StorageSpec, spec_for

DCP_METADATA_FILE = ".metadata"
# Shard files of the converted checkpoint, as the writer's default max_file_bytes.
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DcpImportResult:
    """What `import_dcp` wrote: tensor and value counts, tensor bytes, shard files."""

    tensors: int
    values: int
    total_bytes: int
    files: tuple[str, ...]


def import_dcp(
    dcp_dir: str | os.PathLike[str],
    out: str | StorageSpec,
    *,
    trust_pickle: bool = False,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DcpImportResult:
    """Convert the DCP checkpoint in `dcp_dir` into a shardsafe checkpoint at `out`.

    Args:
        dcp_dir: a directory written by `torch.distributed.checkpoint.save.protocol` (local, or an fsspec URL).
        out: the new checkpoint's path (local, fsspec URL or `StorageSpec`); must not hold a
            committed checkpoint.
        trust_pickle: confirm that `dcp_dir` comes from a trusted source: DCP's metadata and
            non-tensor entries are pickles, and unpickling can run arbitrary code.
        max_file_bytes: the largest shard file written (a bigger tensor gets a file of its own).
        storage_options: fsspec options for both paths (where they are URLs; a `StorageSpec` keeps its own).
        progress: called as `progress(bytes_just_written, total_bytes)` after each tensor.

    Raises:
        PickleNotAllowedError: `trust_pickle` is False (nothing is read).
        FileNotFoundError: `dcp_dir` holds no `.metadata`.
        CheckpointExistsError: `out` already holds a committed checkpoint.

    Example: `import_dcp("/runs/titan/step-1000", "/ckpt/step-1000", trust_pickle=True)`.
    """
    dcp_dir = os.fspath(dcp_dir)
    reader = _open_dcp(dcp_dir, trust_pickle=trust_pickle, storage_options=storage_options)
    target = spec_for(out, storage_options=storage_options).open()
    try:
        return _convert(reader, target, dcp_dir, max_file_bytes=max_file_bytes, progress=progress)
    finally:
        target.close()


def _convert(
    reader: Any,
    target: CheckpointStorage,
    dcp_dir: str,
    *,
    max_file_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> DcpImportResult:
    """`import_dcp` once both sides are open: shard files first, then the metadata, which commits."""
    dcp_metadata = reader.read_metadata()
    entries = dcp_metadata.state_dict_metadata
    layout = _regroup(entries, dcp_metadata.planner_data)
    _prepare_target(target)
    save_id = secrets.token_hex(6)
    total = sum(_nbytes(entries[k]) for k in layout.tensors.values())
    tick = (lambda n: progress(n, total)) if progress is not None else None
    records, files = _write_tensors(target, layout, entries, save_id, reader, max_file_bytes, tick)
    metadata = Metadata(
        version=PLAIN_FORMAT_VERSION,  # references nothing: readable by version-2 readers
        save_id=save_id,
        world_size=1,
        checksum_block_bytes=CHECKSUM_BLOCK_BYTES,
        tensors=records,
        values=_read_values(reader, layout.values),
        rank_local={},
        files=files,
        structure=layout.structure,
    )
    target.publish(METADATA_FILE, metadata.to_json())  # the commit: last, as in any save
    logger.info(
        "imported %d tensors and %d values from %s into %s",
        len(records),
        len(layout.values),
        dcp_dir,
        target.url,
    )
    return DcpImportResult(
        tensors=len(records), values=len(layout.values), total_bytes=total, files=tuple(files)
    )


def _prepare_target(target: CheckpointStorage) -> None:
    """Refuse a path that holds a committed checkpoint (an import never overwrites), then create it."""
    if target.exists(METADATA_FILE):
        raise CheckpointExistsError(f"{target.url} already holds a committed checkpoint; choose another path")
    target.prepare()


def _write_tensors(
    target: CheckpointStorage,
    layout: _Layout,
    entries: dict[str, Any],
    save_id: str,
    reader: Any,
    max_file_bytes: int,
    progress: Callable[[int], None] | None,
) -> tuple[dict[str, TensorRecord], dict[str, FileRecord]]:
    """The tensors, grouped into shard files of at most `max_file_bytes`."""
    keys = list(layout.tensors)
    groups = plan_files([_nbytes(entries[layout.tensors[k]]) for k in keys], max_file_bytes)
    records: dict[str, TensorRecord] = {}
    files: dict[str, FileRecord] = {}
    for n, group in enumerate(g for g in groups if g):
        name = shard_file_name(save_id, f"r00000-{n:03d}")
        specs = {keys[i]: (layout.tensors[keys[i]], entries[layout.tensors[keys[i]]]) for i in group}
        file_bytes, file_records = _write_shard(target, name, specs, save_id, reader, progress)
        records.update(file_records)
        files[name] = FileRecord(nbytes=file_bytes, rank=0)
    return records, files


def _open_dcp(dcp_dir: str, *, trust_pickle: bool, storage_options: dict[str, Any] | None) -> Any:
    """A DCP storage reader whose (pickled) metadata is read once, after the caller trusted it.

    Building the reader reads nothing; DCP's fsspec reader resolves the URL itself, so its file
    system (not a second resolution of ours) answers whether `.metadata` is there.
    """
    remote = "://" in dcp_dir and not dcp_dir.startswith("file://")
    if remote:
        reader = _RemoteReader(dcp_dir, **dict(storage_options or {}))
    else:
        reader = _LocalReader(os.path.expanduser(dcp_dir.removeprefix("file://")))
    if not reader.fs.exists(reader.fs.concat_path(reader.path, DCP_METADATA_FILE)):
        raise FileNotFoundError(f"no DCP checkpoint at {dcp_dir}: {DCP_METADATA_FILE} not found")
    if not trust_pickle:
        raise PickleNotAllowedError(
            f"{dcp_dir}: DCP stores its {DCP_METADATA_FILE} (and non-tensor entries) with pickle, and "
            "unpickling a file can run arbitrary code; convert only a checkpoint you trust, passing "
            "trust_pickle=True (--trust-pickle on the command line)"
        )
    return reader


class _MetadataOnce:
    """dcp.load reads (unpickles) the metadata at every call; one call per tensor must not."""

    _cached: Any = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self._cached is None:
            self._cached = super().read_metadata(*args, **kwargs)
        return self._cached


class _LocalReader(_MetadataOnce, dcp.FileSystemReader):
    pass


class _RemoteReader(_MetadataOnce, FsspecReader):  # DCP's reader for fsspec URLs
    pass


def _nbytes(md: TensorStorageMetadata) -> int:
    return md.size.numel() * md.properties.dtype.itemsize


def _read_tensor(reader: Any, key: str, md: TensorStorageMetadata) -> torch.Tensor:
    dest = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    _dcp_load({key: dest}, reader)
    return dest


def _dcp_load(state: dict[str, Any], reader: Any) -> None:
    """DCP's own loader in this one process; its warning that no process group exists is expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)


def _read_values(reader: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Every value leaf as typed JSON; DCP's bytes entries are read in one call (they are small)."""
    leaves = [k for tree in values.values() for k in _leaf_keys(tree)]
    holder: dict[str, Any] = dict.fromkeys(leaves)
    if leaves:
        _dcp_load(holder, reader)
    return {
        fqn: encode_value(_assemble(tree, holder), key=fqn, allow_pickle=True) for fqn, tree in values.items()
    }


def _leaf_keys(tree: Any) -> list[str]:
    if isinstance(tree, _DcpKey):
        return [tree.key]
    return [k for child in tree.values() for k in _leaf_keys(child)]


def _assemble(tree: Any, loaded: dict[str, Any]) -> Any:
    if isinstance(tree, _DcpKey):
        return loaded[tree.key]
    if _is_list(tree):
        return [_assemble(tree[i], loaded) for i in range(len(tree))]
    return {k: _assemble(v, loaded) for k, v in tree.items()}


def _is_list(node: dict) -> bool:
    """DCP paths index lists by int: a node whose keys are exactly 0..n-1 was a list."""
    return bool(node) and all(type(k) is int for k in node) and sorted(node) == list(range(len(node)))


@dataclass(frozen=True, slots=True)
class _DcpKey:
    key: str  # an entry of DCP's state_dict_metadata


@dataclass(frozen=True, slots=True, kw_only=True)
class _Layout:
    """DCP's entries regrouped as shardsafe flattens the same state dict."""

    tensors: dict[str, str]  # shardsafe key -> DCP key
    values: dict[str, Any]  # shardsafe key -> _DcpKey, or a dict tree of them (lists: int keys)
    structure: Any  # shardsafe's JSON nesting tree


def _regroup(entries: dict[str, Any], planner_data: Any) -> _Layout:
    """Rebuild the saved nesting from DCP's planner data (each key's object path) and flatten it
    by shardsafe's rule: a container with no tensor below it is one value leaf, as DCP's
    per-element entries of an optimizer's `param_groups` become one `optim.param_groups` value.

    DCP flattens nested dicts and lists of containers into one entry per leaf; without usable
    planner data (another planner, or flattening turned off) every DCP key stays one flat leaf.
    """
    paths = planner_data if _usable_paths(planner_data, entries) else {k: (k,) for k in entries}
    root: dict[Any, Any] = {}
    for key in entries:
        node = root
        for part in paths[key][:-1]:
            node = node.setdefault(part, {})
        node[paths[key][-1]] = _DcpKey(key)
    tensor_keys = {k for k, v in entries.items() if isinstance(v, TensorStorageMetadata)}
    layout = _Layout(tensors={}, values={}, structure=None)
    return _Layout(
        tensors=layout.tensors, values=layout.values, structure=_walk(root, (), tensor_keys, layout)
    )


def _usable_paths(planner_data: Any, entries: dict[str, Any]) -> bool:
    if not isinstance(planner_data, dict) or set(planner_data) != set(entries):
        return False
    paths = list(planner_data.values())
    ok = all(isinstance(p, tuple) and p and all(type(x) in (str, int) for x in p) for p in paths)
    prefixes = {p[:i] for p in paths if ok for i in range(1, len(p))}
    return ok and len(set(paths)) == len(paths) and not prefixes.intersection(paths)


def _walk(node: Any, path: tuple, tensor_keys: set[str], layout: _Layout) -> Any:
    fqn = ".".join(str(p) for p in path)  # shardsafe's key for a path (checkpoint.state.flatten.fqn_of)
    if isinstance(node, _DcpKey):
        if node.key in tensor_keys:
            layout.tensors[fqn] = node.key
            return {"tensor": fqn}
        layout.values[fqn] = node
        return {"value": fqn}
    if path and not any(k in tensor_keys for k in _leaf_keys(node)):
        layout.values[fqn] = node
        return {"value": fqn}
    if _is_list(node):
        return {"list": [_walk(node[i], path + (i,), tensor_keys, layout) for i in range(len(node))]}
    return {"dict": [[k, _walk(v, path + (k,), tensor_keys, layout)] for k, v in node.items()]}


def _write_shard(
    target: CheckpointStorage,
    name: str,
    specs: dict[str, tuple[str, TensorStorageMetadata]],
    save_id: str,
    reader: Any,
    progress: Callable[[int], None] | None,
) -> tuple[int, dict[str, TensorRecord]]:
    """One shard file, header first, then each tensor as DCP assembles it; returns size and records."""
    metas = {k: md for k, (_, md) in specs.items()}
    dtypes = {k: dtype_name(md.properties.dtype, key=k) for k, md in metas.items()}  # before any write
    shapes = [
        (k, torch.empty(tuple(md.size), dtype=md.properties.dtype, device="meta")) for k, md in metas.items()
    ]
    header, ranges = build_header(shapes, {"format": "shardsafe", "save_id": save_id, "rank": "0"})
    records = {}
    with target.open_write(name) as f:
        f.write(header)
        for (key, (dcp_key, md)), (start, n) in zip(specs.items(), ranges):
            checksums = _write_checksummed(f, _read_tensor(reader, dcp_key, md))
            chunk = ChunkRecord(
                box=full_box(tuple(md.size)),
                file=name,
                key=key,
                offset_bytes=len(header) + start,
                nbytes=n,
                checksums=checksums,
            )
            records[key] = TensorRecord(dtype=dtypes[key], shape=tuple(md.size), chunks=(chunk,))
            if progress is not None:
                progress(n)
    return len(header) + sum(n for _, n in ranges), records


def _write_checksummed(f: Any, tensor: torch.Tensor) -> tuple[int, ...]:
    """Write a tensor's bytes in slices of whole checksum blocks; returns the crc32c of each block."""
    data = tensor_bytes(tensor)
    block = CHECKSUM_BLOCK_BYTES
    step = max(block, WRITE_SLICE_BYTES // block * block)
    checksums = []
    for s in range(0, len(data), step):
        piece = data[s : s + step]
        checksums.extend(crc32c.crc32c(piece[b : b + block]) for b in range(0, len(piece), block))
        f.write(piece)
    return tuple(checksums)
