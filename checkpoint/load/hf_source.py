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
and a key may be claimed once only: a key repeated in the index's
`weight_map` or found in the headers of two shard files is refused, naming
both files. On local disk only regular files are read. Every file of a
Hugging Face cache snapshot (`models--org--name/snapshots/<rev>/`) is a
symbolic link into the repository's `blobs/`, so `hf_read_storage` follows
links, but only to regular files inside the same cache repository (outside
the cache, inside the model directory itself); links that leave it, FIFOs
and devices are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from checkpoint.state.dtypes import dtype_from_code, dtype_name
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
# A Hugging Face cache repository directory (huggingface_hub's cache layout).
CACHE_REPO_RE = re.compile(r"(models|datasets|spaces)--.+")
# The save_id of synthesised metadata; no shardsafe save produces it (ids are random hex).
HF_SAVE_ID = "00000000"
# Header reads in flight at once (one small request each; they matter on object stores).
HEADER_READ_THREADS = 8

KeyMap = Callable[[str], "str | None"] | str | None


def hf_read_storage(storage: CheckpointStorage) -> CheckpointStorage:
    """`storage` as a Hugging Face layout is read from it: on local disk, links are followed only within
    the cache repository the directory is a snapshot of (or within the directory itself)."""
    if not isinstance(storage, LocalStorage):
        return storage  # object stores and remote file systems hold no links
    return LocalStorage(storage.root, links_within=cache_repository(storage.root))


def cache_repository(directory: str) -> str:
    """The cache repository (`.../models--org--name`) of a snapshot directory, else the directory itself."""
    real = os.path.realpath(directory)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and CACHE_REPO_RE.fullmatch(os.path.basename(repo)):
        return repo
    return real


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
            name, a non-regular file, a link out of the cache repository, a key claimed twice
            (in the index or by two shard files), or two keys mapped to one name.
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
    else:
        _refuse_shared_keys(storage.url, headers)
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
    try:
        doc = json.loads(storage.read_bytes(INDEX_FILE), object_pairs_hook=_checked_object)
    except _RepeatedKey as e:
        raise InvalidCheckpointError(
            f"{where}: key {e.key[:200]!r} appears twice, mapped to {str(e.first)[:80]!r} and "
            f"{str(e.second)[:80]!r}; an index must name each key once (fix or re-download it)"
        ) from None
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


class _RepeatedKey(ValueError):
    def __init__(self, key: str, first: object, second: object) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _checked_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are all distinct (json.loads would keep the last of repeated ones)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key, out[key], value)
        out[key] = value
    return out


def _refuse_shared_keys(where: str, headers: dict[str, SafetensorsHeader]) -> None:
    """No tensor key may be in the headers of two shard files: which one holds the weight would be a guess."""
    owner: dict[str, str] = {}
    for name, header in sorted(headers.items()):
        for key in header.tensors:
            first = owner.setdefault(key, name)
            if first != name:
                raise InvalidCheckpointError(
                    f"{where}: key {key[:200]!r} is in both {first} and {name}; a Hugging Face layout "
                    "holds each tensor in one shard file (fix or re-download the model)"
                )


def _read_file_header(storage: CheckpointStorage, name: str) -> SafetensorsHeader:
    try:
        return read_header(storage, name, where=storage.url)
    except FileNotFoundError:
        raise IncompleteCheckpointError(
            f"{storage.url}: shard file {name} named by {INDEX_FILE} is missing; the download is incomplete"
        ) from None


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
