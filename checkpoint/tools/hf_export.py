"""Export a shardsafe checkpoint as a consolidated Hugging Face safetensors layout.

The output is what `huggingface_hub.save_torch_state_dict` writes: one
`model.safetensors`, or, past `max_shard_size`, `model-0000i-of-0000n.safetensors`
files plus `model.safetensors.index.json` (`metadata.total_size`, `weight_map`),
each file tagged `{"format": "pt"}`. Sizes are decimal (GB = 10**9), as there.

Consolidating must not need the model in memory (the known failure of
consolidation scripts): every tensor's shape and dtype are in the metadata,
so each output file's header is written first, then the tensors one at a
time, each read whole (all its chunks, checksums verified) just before its
bytes go out. Peak memory is about the largest tensor (twice it with a
dtype cast), whatever the model's size. Only tensors are exported; values
and rank-local entries have no place in a weights file and are listed in the
result as skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from checkpoint.load.chunk_reader import ChunkReader
from checkpoint.load.grid import GridResolver
from checkpoint.load.hf_source import INDEX_FILE, SINGLE_FILE
from checkpoint.load.loader import read_metadata
from checkpoint.state.dtypes import dtype_from_name
from planners.boxes import full_box
from planners.errors import CheckpointExistsError, InvalidCheckpointError
from planners.load_plan import LoadTarget
from planners.metadata import Metadata, TensorRecord
from storage.backend import CheckpointStorage
from storage.safetensors_io import WRITE_SLICE_BYTES, build_header, tensor_bytes
from storage.spec import StorageSpec, specs_for

DEFAULT_MAX_SHARD_SIZE = "5GB"
# The metadata huggingface_hub and transformers expect in every file written for torch.
FILE_METADATA = {"format": "pt"}
# Names this module writes; with overwrite=True, exactly these are removed first.
_HF_OUTPUT_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_READ_THREADS = 8
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class HfExportResult:
    """What `export_hf` wrote: file names in order, tensor count, tensor bytes, and what it left out."""

    files: tuple[str, ...]
    tensors: int
    total_bytes: int
    skipped: tuple[str, ...]  # non-tensor and rank-local keys (weights files hold tensors only)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Entry:
    source: str  # key in the checkpoint
    name: str  # key in the Hugging Face files
    record: TensorRecord
    dtype: torch.dtype  # output dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.record.shape:
            numel *= d
        return numel * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or "5GB" / "500MB" (decimal, as huggingface_hub) / "4GiB" (binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE_RE.match(size) if isinstance(size, str) else None
        if match is None:
            raise ValueError(f"max_shard_size {size!r} is not a size such as 5GB, 500MB or 1000000")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_files(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Group entries (by index, in order) into files of at most `max_bytes`; a bigger entry gets its own."""
    files: list[list[int]] = []
    current, used = [], 0
    for i, n in enumerate(sizes):
        if current and used + n > max_bytes:
            files.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current or not files:
        files.append(current)
    return files


def export_hf(
    path: str | StorageSpec,
    out: str | StorageSpec,
    *,
    prefix: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> HfExportResult:
    """Write the tensors of the checkpoint at `path` as a Hugging Face layout in `out`, streaming.

    Args:
        path: a committed shardsafe checkpoint (local path, fsspec URL or `StorageSpec`).
        out: the output directory (local path, fsspec URL or `StorageSpec`); created if needed.
        prefix: export only the keys under this key path, without it (`"model"` or `"model."`:
            `model.0.weight` becomes `0.weight`; `model_ema.w` is not selected). Required when the
            checkpoint holds several top-level subtrees of tensors and one is an optimizer's.
        dtype: cast floating-point tensors to it (e.g. `"bfloat16"`); integer and bool tensors keep theirs.
        max_shard_size: largest output file before splitting, e.g. `"5GB"` (GB = 10**9).
        overwrite: replace an existing Hugging Face layout in `out` (default: refuse).
        storage_options: fsspec options for both paths (those given as strings).
        progress: called as `progress(bytes_just_written, total_bytes)` after each tensor.

    Returns:
        The files written, the tensor count and bytes, and the keys skipped.

    Raises:
        CheckpointExistsError: `out` already holds a Hugging Face layout and `overwrite` is False.
        ValueError: `prefix` selects no tensor; no `prefix` although the tensors are a training state
            (a model's subtree and an optimizer's, see `training_subtrees`); a bad `dtype`/`max_shard_size`.

    Example: `export_hf("/ckpt/step-1000", "/export/hf", prefix="model.", dtype="bfloat16")`.
    """
    max_bytes, cast = parse_size(max_shard_size), _parse_dtype(dtype)
    source, target = (spec.open() for spec in specs_for(path, out, storage_options=storage_options))
    try:
        return _export(source, target, prefix, cast, max_bytes, overwrite=overwrite, progress=progress)
    finally:
        source.close()
        target.close()


def _export(
    source: CheckpointStorage,
    target: CheckpointStorage,
    prefix: str | None,
    cast: torch.dtype | None,
    max_bytes: int,
    *,
    overwrite: bool,
    progress: Callable[[int, int], None] | None,
) -> HfExportResult:
    """`export_hf` once both storages are open: plan the output files, stream them, then the index."""
    metadata = read_metadata(source)
    reader = ChunkReader(source, metadata, verify=True, io_threads=_READ_THREADS)
    entries = _located(reader, _select(metadata, prefix, cast, where=source.url))
    groups = plan_files([e.nbytes for e in entries], max_bytes)
    names = _file_names(len(groups))
    _clear_output(target, overwrite=overwrite)
    total = sum(e.nbytes for e in entries)
    tick = (lambda n: progress(n, total)) if progress is not None else None
    written = False
    try:
        for name, group in zip(names, groups):
            _write_file(target, name, [entries[i] for i in group], reader, tick)
        if len(groups) > 1:
            weight_map = {entries[i].name: name for name, group in zip(names, groups) for i in group}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            target.publish(INDEX_FILE, json.dumps(index, indent=2).encode())
        written = True
    finally:
        if not written:  # a corrupt chunk, a failed write, an interrupt: take back what this export made
            _take_back(target, [*names, INDEX_FILE])
    logger.info(
        "exported %d tensors of %s to %s in %d file(s)", len(entries), source.url, target.url, len(names)
    )
    return HfExportResult(
        files=tuple(names) + ((INDEX_FILE,) if len(groups) > 1 else ()),
        tensors=len(entries),
        total_bytes=total,
        skipped=tuple(sorted(set(metadata.values) | set(metadata.rank_local))),
    )


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    try:
        resolved = (
            dtype
            if isinstance(dtype, torch.dtype)
            else dtype_from_name(dtype.removeprefix("torch."), where="")
        )
    except (InvalidCheckpointError, AttributeError):
        resolved = None
    if resolved is None or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype such as 'bfloat16', got {dtype!r}")
    return resolved


def key_prefix(prefix: str | None) -> str:
    """`prefix` as a key path: `"model"` and `"model."` both select the keys under `model.`."""
    return "" if not prefix else prefix if prefix.endswith(".") else f"{prefix}."


def training_subtrees(metadata: Metadata) -> dict[str, int]:
    """Top-level subtree -> tensor count, when the tensors are a training state rather than one model.

    A training state is several top-level subtrees of tensors, one of which is an optimizer's
    (its keys run `<top>.state.<...>`, as `Optimizer.state_dict()` and DCP's optimizer state dict
    nest them). A plain model's state dict, whose top level is its modules, is not one: empty dict.
    """
    counts: dict[str, int] = {}
    optimizer = False
    for key in metadata.tensors:
        top, _, rest = key.partition(".")
        counts[top] = counts.get(top, 0) + 1
        optimizer = optimizer or rest.startswith("state.")
    return dict(sorted(counts.items())) if optimizer and len(counts) > 1 else {}


def _select(metadata: Metadata, prefix: str | None, cast: torch.dtype | None, *, where: str) -> list[_Entry]:
    if prefix is None and (subtrees := training_subtrees(metadata)):
        listed = ", ".join(f"{top!r} ({n} tensors)" for top, n in subtrees.items())
        raise ValueError(
            f"{where} holds a training state, not one model: its tensors are under {listed}, and one of them "
            "is an optimizer's; pass prefix= (--prefix) naming the model's subtree, e.g. "
            f"--prefix {next(iter(subtrees))}"
        )
    entries = []
    under = key_prefix(prefix)
    for key, record in metadata.tensors.items():
        if not key.startswith(under):
            continue
        dtype = dtype_from_name(record.dtype, where=f"{where}: key {key!r}")
        if cast is not None and dtype.is_floating_point:
            dtype = cast
        entries.append(_Entry(source=key, name=key.removeprefix(under), record=record, dtype=dtype))
    if not entries:
        some = ", ".join(repr(k) for k in list(metadata.tensors)[:5])
        raise ValueError(f"{where}: no tensor key starts with prefix {prefix!r} (keys include {some})")
    return entries


def _located(reader: ChunkReader, entries: list[_Entry]) -> list[_Entry]:
    """`entries` with every chunk located and its bytes known to be in its file, before anything is
    written or allocated: a grid key's chunks come from its writers' shard headers (as a load
    finds them), so a shape the files do not hold is refused here, naming the key and the file.

    Raises:
        InvalidCheckpointError: a file does not hold a chunk as the metadata says.
        FileNotFoundError: a shard file is missing.
    """
    grids = reader.metadata.grids
    resolver = GridResolver(reader.storage, reader.metadata) if grids else None
    out = []
    for e in entries:
        if resolver is not None and e.source in grids:
            e = dataclasses.replace(e, record=resolver.record(e.source, full_box(e.record.shape)))
        for chunk in e.record.chunks:
            reader.require_bytes(e.source, chunk)
        out.append(e)
    return out


def _take_back(target: CheckpointStorage, names: list[str]) -> None:
    """Remove the output files of a failed export and the directories `prepare()` made for it.

    Evidence: `_clear_output` ran first, so any file with these names was either absent or removed
    (overwrite=True) before this export began: each one here is this export's. Directories that
    existed before are never touched (`remove_created_dirs`).
    """
    try:
        target.remove(names)
        target.remove_created_dirs()
    except Exception:  # the export's own error is what the caller needs; this one only goes to the log
        logger.warning("could not remove the partial export at %s", target.url, exc_info=True)


def _file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _clear_output(target: CheckpointStorage, *, overwrite: bool) -> None:
    """Refuse (or, with overwrite, remove) an earlier export, so no stale shard or index survives."""
    stale = [n for n in target.list_names() if _HF_OUTPUT_RE.match(n)]
    if stale and not overwrite:
        raise CheckpointExistsError(
            f"{target.url} already holds a Hugging Face layout ({', '.join(stale[:3])}); "
            "choose another directory or pass overwrite=True (--overwrite)"
        )
    target.prepare()
    target.remove(stale)


def _write_file(
    target: CheckpointStorage,
    name: str,
    entries: list[_Entry],
    reader: ChunkReader,
    progress: Callable[[int], None] | None,
) -> None:
    """One output file: the header (every size is known), then each tensor as it is read."""
    shapes = [(e.name, torch.empty(e.record.shape, dtype=e.dtype, device="meta")) for e in entries]
    header, _ = build_header(shapes, dict(FILE_METADATA))
    with target.open_write(name) as f:
        f.write(header)
        for entry in entries:
            tensor = _read_whole(reader, entry).to(entry.dtype)
            data = tensor_bytes(tensor)
            for start in range(0, len(data), WRITE_SLICE_BYTES):
                f.write(data[start : start + WRITE_SLICE_BYTES])
            del tensor, data
            if progress is not None:
                progress(entry.nbytes)


def _read_whole(reader: ChunkReader, entry: _Entry) -> torch.Tensor:
    """All chunks of one saved tensor, verified, as one plain CPU tensor."""
    record = entry.record  # located, its bytes checked against the files (`_located`)
    dtype = dtype_from_name(record.dtype, where=reader.storage.url)
    dest = torch.empty(record.shape, dtype=dtype)
    lt = LoadTarget(fqn=entry.source, dtype=dtype, global_shape=record.shape, box=full_box(record.shape))
    reader.run([(item, dest) for item in reader.plan(lt, record)])
    return dest
