"""Hugging Face safetensors layouts as a load source: `ckpt.load(hf_dir, state_dict=target)`.

A Hugging Face model directory holds either one `model.safetensors` or a
`model.safetensors.index.json` whose `weight_map` names the shard file of
each key. Every tensor in those files is one whole, row-major tensor at a
known byte range, which is exactly a shardsafe chunk that covers its whole
tensor. So instead of a second loader, this module reads the index and the
safetensors headers and synthesises the same in-memory `Metadata` the
shardsafe loader plans from: each rank then reads only the byte ranges its
DTensor shards need, with the usual resharding, strict and dtype/shape
checks and errors. Hugging Face files carry no checksums, so the loader
skips verification for them (the records hold no checksums to check).

Everything read here is untrusted: the index is size-capped JSON, file
names must be plain names inside the directory, each header goes through
`storage.safetensors_io.read_header` (size caps, offsets inside the file),
and on local disk only regular files are read (symlinks to regular files,
as in the Hugging Face cache, are fine).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from checkpoint.dtypes import dtype_from_code, dtype_name
from planners.boxes import full_box
from planners.errors import IncompleteCheckpointError, InvalidCheckpointError
from planners.metadata import CHECKSUM_BLOCK_BYTES, ChunkRecord, FileRecord, Metadata, TensorRecord
from storage.backend import CheckpointStorage
from storage.local import LocalStorage
from storage.safetensors_io import SafetensorsHeader, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Real indexes are a few hundred kilobytes even for 400B-parameter models;
# anything larger is refused before it is read.
MAX_INDEX_BYTES = 64 * 1024 * 1024
# Shard names in a weight_map: plain file names, no directories, no dotfiles.
HF_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}\.safetensors$")
# The save_id of synthesised metadata; no shardsafe save produces it (ids are random hex).
HF_SAVE_ID = "00000000"
# Header reads in flight at once (one small request each; they matter on object stores).
HEADER_READ_THREADS = 8

KeyMap = Callable[[str], "str | None"] | str | None


def read_hf_metadata(storage: CheckpointStorage, *, key_map: KeyMap = None) -> Metadata | None:
    """Loader metadata for the Hugging Face layout at `storage`, or None when there is none.

    Args:
        storage: the directory (any backend).
        key_map: how Hugging Face keys become target keys. A str is a prefix stripped from
            the keys that start with it (`"model."` loads `model.layers.0.w` into a target
            key `layers.0.w`); other keys keep their names. A callable maps each key to its
            target key, or to None to leave it out. None keeps every key.

    Raises:
        InvalidCheckpointError: a malformed index or header, a file name that is not a plain
            name, a non-regular file, or two keys mapped to one name.
        IncompleteCheckpointError: a shard file named by the index is missing (a FileNotFoundError).
    """
    names = set(storage.list_names())
    if INDEX_FILE in names:
        weight_map = _read_index(storage)
    elif SINGLE_FILE in names:
        weight_map = None
    else:
        return None
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    with ThreadPoolExecutor(max_workers=min(HEADER_READ_THREADS, len(files) or 1)) as pool:
        headers = dict(zip(files, pool.map(lambda n: _read_file_header(storage, n), files)))
    if weight_map is None:
        weight_map = {key: SINGLE_FILE for key in headers[SINGLE_FILE].tensors}
    tensors = _tensor_records(storage.url, weight_map, headers, _key_mapper(key_map))
    return Metadata(
        version=1,
        save_id=HF_SAVE_ID,
        world_size=1,
        checksum_block_bytes=CHECKSUM_BLOCK_BYTES,
        tensors=tensors,
        values={},
        rank_local={},
        files={n: FileRecord(nbytes=h.file_bytes, rank=0) for n, h in headers.items()},
        structure={"dict": [[k, {"tensor": k}] for k in tensors]},
    )


def _read_index(storage: CheckpointStorage) -> dict[str, str]:
    where = f"{storage.url}/{INDEX_FILE}"
    size = storage.size(INDEX_FILE)
    if size > MAX_INDEX_BYTES:
        raise InvalidCheckpointError(f"{where}: {size} bytes exceeds the index limit of {MAX_INDEX_BYTES}")
    _require_regular(storage, INDEX_FILE)
    try:
        doc = json.loads(storage.read_bytes(INDEX_FILE))
    except (ValueError, RecursionError) as e:
        raise InvalidCheckpointError(f"{where}: not valid JSON: {e}") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise InvalidCheckpointError(f"{where}: no weight_map object")
    for key, name in weight_map.items():
        if not isinstance(name, str) or HF_FILE_RE.fullmatch(name) is None:
            raise InvalidCheckpointError(
                f"{where}: key {key[:200]!r} maps to {str(name)[:80]!r}, which is not a plain "
                "*.safetensors file name in this directory (paths, '..' and URLs are refused)"
            )
    return weight_map


def _read_file_header(storage: CheckpointStorage, name: str) -> SafetensorsHeader:
    try:
        _require_regular(storage, name)
        return read_header(storage, name, where=storage.url)
    except FileNotFoundError:
        raise IncompleteCheckpointError(
            f"{storage.url}: shard file {name} named by {INDEX_FILE} is missing; the download is incomplete"
        ) from None


def _require_regular(storage: CheckpointStorage, name: str) -> None:
    """On local disk, refuse FIFOs, devices and directories (symlinks to regular files are fine)."""
    if not isinstance(storage, LocalStorage):
        return  # object stores and remote file systems only hold regular objects
    path = os.path.join(storage.root, name)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.url}: {name} is missing") from None
    if not stat.S_ISREG(mode):
        raise InvalidCheckpointError(f"{storage.url}: {name} is not a regular file")


def _tensor_records(
    where: str,
    weight_map: dict[str, str],
    headers: dict[str, SafetensorsHeader],
    mapper: Callable[[str], str | None],
) -> dict[str, TensorRecord]:
    tensors: dict[str, TensorRecord] = {}
    sources: dict[str, str] = {}
    for key, name in weight_map.items():
        entry = headers[name].tensors.get(key)
        if entry is None:
            raise InvalidCheckpointError(
                f"{where}: {INDEX_FILE} puts key {key!r} in {name}, whose header lacks it"
            )
        target = mapper(key)
        if target is None:
            continue
        if not isinstance(target, str):
            raise TypeError(
                f"key_map({key!r}) returned {type(target).__name__}; it must return a str or None"
            )
        if target in sources:
            raise InvalidCheckpointError(
                f"{where}: key_map sends both {sources[target]!r} and {key!r} to {target!r}"
            )
        sources[target] = key
        dtype = dtype_from_code(entry.dtype, where=f"{where}: file {name}, key {key!r}")
        chunk = ChunkRecord(
            box=full_box(entry.shape),
            file=name,
            key=key,
            offset_bytes=entry.offset_bytes,
            nbytes=entry.nbytes,
            checksums=(),
        )
        tensors[target] = TensorRecord(dtype=dtype_name(dtype, key=key), shape=entry.shape, chunks=(chunk,))
    return tensors


def _key_mapper(key_map: KeyMap) -> Callable[[str], str | None]:
    if key_map is None:
        return lambda key: key
    if isinstance(key_map, str):
        return lambda key: key.removeprefix(key_map)
    if callable(key_map):
        return key_map
    raise TypeError(f"key_map must be a str prefix, a callable or None, got {type(key_map).__name__}")
