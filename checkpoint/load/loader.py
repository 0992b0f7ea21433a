"""The load path: read the metadata, plan this rank's reads, fetch, verify, copy.

Loading needs no collective: every rank reads the (small) metadata, plans
the reads its own target needs (planners.load_plan) and fetches only those
byte ranges, several files at once. Every block read from a file is
verified against its checksum before anything from that file is copied into
the target, so a corrupt chunk never reaches it. Nothing is allocated from
sizes the metadata claims until the files are known to hold those bytes.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import torch

from checkpoint.load.chunk_reader import ChunkReader
from checkpoint.load.hf_source import hf_read_storage, read_hf_metadata
from checkpoint.load.key_hints import describe_unloaded
from checkpoint.load.values import ABSENT, SavedValues, rank_local_value
from checkpoint.options import DEFAULT_MAX_METADATA_BYTES, LoadOptions  # noqa: F401 (re-exported)
from checkpoint.state.flatten import FlatStateDict, fill_target, flatten_state_dict
from planners.errors import (
    IncompleteCheckpointError,
    InvalidStateDictError,
    MismatchError,
    MissingKeysError,
    NotADirectoryCheckpointError,
    RankLocalError,
)
from planners.load_plan import (
    LoadTarget,
    ReadItem,
    check_compatible,
)
from planners.metadata import (
    METADATA_FILE,
    SHARD_FILE_RE,
    Metadata,
)
from planners.metadata_parse import parse_metadata
from planners.values import saved_type_name, type_name
from storage.backend import CheckpointStorage
from storage.metadata_file import read_metadata_bytes

logger = logging.getLogger(__name__)

# Keys named in a missing-keys error before "and N more".
_MAX_KEYS_SHOWN = 20
# Keys of each side named in the warning about a load that matched no key.
_MAX_KEYS_SAMPLED = 5
# torch.distributed.checkpoint's metadata file: a directory holding it is a DCP checkpoint, said so by name.
_DCP_METADATA_FILE = ".metadata"
# Target values that never take a saved tensor's place (a None leaf asks for whatever was saved).
_SCALARS = (bool, int, float, str)


def read_metadata(storage: CheckpointStorage, *, max_bytes: int = DEFAULT_MAX_METADATA_BYTES) -> Metadata:
    """The committed metadata; a path with shard files but no metadata is incomplete.

    Raises:
        FileNotFoundError: nothing at the path (`IncompleteCheckpointError` when shard files are there).
        InvalidCheckpointError: the metadata is over `max_bytes`, not a regular file, or malformed.
        CorruptCheckpointError: the metadata does not match its digest.
    """
    try:
        data = read_metadata_bytes(storage, max_bytes=max_bytes)
    except FileNotFoundError:
        names = storage.list_names()
        if any(SHARD_FILE_RE.fullmatch(n) for n in names):
            raise IncompleteCheckpointError(
                f"checkpoint at {storage.url} is incomplete: it has shard files but no {METADATA_FILE} "
                "(the save was interrupted or is still running); load an earlier checkpoint"
            ) from None
        if _DCP_METADATA_FILE in names:
            raise FileNotFoundError(
                f"{storage.url} is a torch.distributed.checkpoint (DCP) checkpoint ({_DCP_METADATA_FILE}, no "
                f"{METADATA_FILE}): convert it once with `shardsafe import-dcp {storage.url} NEW_DIR` "
                "(checkpoint.import_dcp in Python) and load NEW_DIR; code that calls dcp.load can then read "
                "NEW_DIR with storage_reader=checkpoint.integrations.dcp.ShardsafeStorageReader(NEW_DIR)"
            ) from None
        raise FileNotFoundError(f"no checkpoint at {storage.url}: {METADATA_FILE} not found") from None
    except NotADirectoryError:
        raise NotADirectoryCheckpointError(
            f"checkpoint path {storage.url} is a file, not a checkpoint directory"
        ) from None
    return parse_metadata(data, where=storage.url)


def load_checkpoint(
    storage: CheckpointStorage, target: Any, *, rank: int, world_size: int, options: LoadOptions
) -> tuple[Any, list[str]]:
    """Load into `target` (or, when None, the whole checkpoint); returns it and the missing keys."""
    start = time.perf_counter()
    metadata, verify, storage = _read_source(storage, options)
    reader = ChunkReader(storage, metadata, verify=verify, io_threads=options.io_threads)
    if target is None:
        result, missing = (
            _load_everything(metadata, reader, rank=rank, world_size=world_size, options=options),
            [],
        )
    else:
        result, missing = _load_into(
            target, metadata, reader, rank=rank, world_size=world_size, options=options
        )
    logger.info(
        "loaded %s on rank %d: %d bytes read in %.3fs",
        storage.url,
        rank,
        reader.bytes_read,
        time.perf_counter() - start,
    )
    return result, missing


def _read_source(
    storage: CheckpointStorage, options: LoadOptions
) -> tuple[Metadata, bool, CheckpointStorage]:
    """The checkpoint's metadata, or one synthesised from a Hugging Face layout (nothing to verify),
    and the storage to read its files through (for a Hugging Face cache, one that follows its links)."""
    try:
        metadata = read_metadata(storage, max_bytes=options.max_metadata_bytes)
    except FileNotFoundError as e:
        hf_storage = hf_read_storage(storage)
        hf = (
            None
            if isinstance(e, IncompleteCheckpointError)
            else read_hf_metadata(hf_storage, key_map=options.key_map)
        )
        if hf is None:
            raise
        return hf, False, hf_storage
    if options.key_map is not None:
        raise ValueError(
            f"key_map applies to Hugging Face layouts only, and {storage.url} is a shardsafe checkpoint"
        )
    return metadata, options.verify, storage


def _load_into(
    target: Any, metadata: Metadata, reader: ChunkReader, *, rank: int, world_size: int, options: LoadOptions
) -> tuple[Any, list[str]]:
    """Plan every read the target needs, refuse a strict load with missing keys, then read and fill."""
    flat = flatten_state_dict(target, for_load=True)
    jobs, missing = _plan_tensors(flat, metadata, reader)
    saved = SavedValues(metadata, reader, jobs, options)
    new_values = {}
    for fqn, path in flat.value_paths.items():
        _check_value_target(reader.storage.url, fqn, flat.values[fqn], metadata)
        value = saved.at(fqn, path)
        if value is ABSENT:
            missing.append(fqn)
        else:
            new_values[fqn] = value
    for fqn, holder in flat.rank_local.items():
        record = metadata.rank_local.get(fqn)
        if record is None:
            missing.append(fqn)
            continue
        _check_rank_local_world(reader.storage.url, fqn, record.world_size, rank=rank, world_size=world_size)
        new_values[fqn] = rank_local_value(record, rank, holder.value, reader, jobs, fqn, options)
    if options.strict and missing:
        raise _missing_keys_error(reader.storage.url, missing, metadata)
    asked = len(flat.tensors) + len(flat.value_paths) + len(flat.rank_local)
    if missing and len(missing) == asked:
        _warn_nothing_matched(reader.storage.url, metadata, missing)
    elif missing and options.strict is None:  # the caller chose neither: tell them what stayed as it was
        _warn_unloaded(reader.storage.url, metadata, missing, asked=asked, rank=rank, world_size=world_size)
    reader.run(jobs)
    new_values = {fqn: saved.placed(v) if fqn in saved.produced else v for fqn, v in new_values.items()}
    return fill_target(target, flat, new_values), sorted(missing)


def _plan_tensors(
    flat: FlatStateDict, metadata: Metadata, reader: ChunkReader
) -> tuple[list[tuple[ReadItem, torch.Tensor]], list[str]]:
    """The reads that fill the target's tensors, and the tensor keys the checkpoint lacks."""
    where = reader.storage.url
    missing: list[str] = []
    jobs: list[tuple[ReadItem, torch.Tensor]] = []
    for fqn, leaf in flat.tensors.items():
        if leaf.local.device.type == "meta":
            raise InvalidStateDictError(
                f"{where}: target key {fqn!r} is on the meta device; materialise it (e.g. to_empty()) before loading"
            )
        record = metadata.tensors.get(fqn)
        if record is None:
            if fqn in metadata.values:
                raise MismatchError(
                    f"{where}: key {fqn!r}: the checkpoint holds a value of type "
                    f"{saved_type_name(metadata.values[fqn])}, but the target holds a tensor; put a "
                    "value (or None) at this key of the target, or save a tensor under it"
                )
            missing.append(fqn)
            continue
        lt = LoadTarget(fqn=fqn, dtype=leaf.local.dtype, global_shape=leaf.global_shape, box=leaf.box)
        check_compatible(lt, record, where=where)
        jobs += [(item, leaf.local) for item in reader.plan(lt, record)]
    return jobs, missing


def _check_value_target(where: str, fqn: str, current: Any, metadata: Metadata) -> None:
    """A target leaf holding a plain value (not None) is not given a saved tensor in its place."""
    if fqn in metadata.tensors and type(current) in _SCALARS:
        record = metadata.tensors[fqn]
        raise MismatchError(
            f"{where}: key {fqn!r}: the checkpoint holds a tensor (shape {list(record.shape)}, "
            f"{record.dtype}), but the target holds a value of type {type_name(current)}; put a tensor "
            "(or None, to get the saved tensor) at this key of the target"
        )


def _warn_nothing_matched(where: str, metadata: Metadata, missing: list[str]) -> None:
    """A non-strict load whose target matched no saved key returns it unchanged: say so, loudly."""
    saved = _saved_keys(metadata)

    def sample(keys: list[str]) -> str:
        more = f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SAMPLED else ""
        return ", ".join(repr(k) for k in keys[:_MAX_KEYS_SAMPLED]) + more

    warnings.warn(
        f"load from {where} matched none of the target's {len(missing)} key(s), so nothing was loaded "
        f"and the target is unchanged. Target keys: {sample(sorted(missing))}; saved keys: "
        f"{sample(saved)}. Nest the target as the state was saved (e.g. {{'model': model}} only if it "
        "was saved that way), or pass strict=True to raise instead",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def _saved_keys(metadata: Metadata) -> list[str]:
    return sorted([*metadata.tensors, *metadata.values, *metadata.rank_local])


def _warn_unloaded(
    where: str, metadata: Metadata, missing: list[str], *, asked: int, rank: int, world_size: int
) -> None:
    """A load with strict left unset that filled only part of the target: name what kept its old value.

    The seed's contract is a non-strict load; a caller who passed `strict=False` chose it and hears
    nothing, one who passed nothing might not know (`dcp.load` raises here), so it warns.
    """
    on_rank = f" on rank {rank}" if world_size > 1 else ""
    warnings.warn(
        f"load from {where}{on_rank} left {len(missing)} of the target's {asked} key(s) unloaded; they keep "
        f"the values they had: {describe_unloaded(missing, _saved_keys(metadata))}. Pass strict=True to "
        "raise instead, or strict=False to load what matches without this warning",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """The stack level of the first frame outside shardsafe's `checkpoint` package (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("checkpoint."):
        frame, level = frame.f_back, level + 1
    return level


def _check_rank_local_world(where: str, fqn: str, saved_by: int, *, rank: int, world_size: int) -> None:
    """A rank-local entry goes back only to the world size that saved it (one entry per rank)."""
    if saved_by != world_size:
        raise RankLocalError(
            f"{where}: rank-local key {fqn!r} was saved by {saved_by} ranks and cannot go back to "
            f"rank {rank} of {world_size}; load it with the saving world size, or drop it from the target"
        )


def _missing_keys_error(where: str, missing: list[str], metadata: Metadata) -> MissingKeysError:
    shown = ", ".join(repr(k) for k in sorted(missing)[:_MAX_KEYS_SHOWN])
    more = f" and {len(missing) - _MAX_KEYS_SHOWN} more" if len(missing) > _MAX_KEYS_SHOWN else ""
    return MissingKeysError(
        f"checkpoint at {where} lacks {len(missing)} key(s) the target asks for: {shown}{more}. "
        f"Nearest saved keys: {describe_unloaded(missing, _saved_keys(metadata))}. Fix the target's "
        "keys, or load with strict=False to fill only what matches",
        sorted(missing),
    )


def _load_everything(
    metadata: Metadata, reader: ChunkReader, *, rank: int, world_size: int, options: LoadOptions
) -> Any:
    jobs: list[tuple[ReadItem, torch.Tensor]] = []
    saved = SavedValues(metadata, reader, jobs, options)
    result = saved.subtree(metadata.structure)
    reader.run(jobs)
    return saved.placed(result)
