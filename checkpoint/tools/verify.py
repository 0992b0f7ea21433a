"""Checking a whole checkpoint without loading it: `verify(path)` and `python -m checkpoint.tools.verify PATH`.

A load verifies the bytes it happens to read; `verify` reads everything, so a
checkpoint can be vetted before it is needed (after a copy between stores,
before older checkpoints are pruned). It trusts nothing: the metadata is
parsed untrusted (names, bounds, the chunks of every tensor tiling it with no
gap or overlap), every file must exist with exactly its recorded size, every
shard file's safetensors header is parsed untrusted and must agree with the
metadata about each chunk (key, dtype, shape, byte range, save id), and every
checksum block is recomputed. Values are decoded without unpickling anything;
keys that would need `allow_pickle=True` are listed, not run.

Problems are collected rather than raised, so one run reports all of them.
Only "there is no checkpoint here" raises, as a load would.

Command line (exit status 0: verified; 1: problems found; 2: no checkpoint at
the path, or a bad argument):

    python -m checkpoint.tools.verify /ckpts/step-100
    python -m checkpoint.tools.verify s3://bucket/run/step-100 --storage-options '{"anon": false}'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from checkpoint.load.grid import GridResolver
from checkpoint.load.loader import DEFAULT_MAX_METADATA_BYTES, read_metadata
from checkpoint.load.references import verify_referenced
from checkpoint.load.verify_file import ChunkRef, verify_file
from planners.boxes import Box
from planners.errors import CheckpointError, InvalidCheckpointError, PickleNotAllowedError
from planners.leftovers import leftover_names
from planners.metadata import Metadata
from planners.values import decode_value
from storage.backend import CheckpointStorage
from storage.spec import StorageSpec, spec_for

logger = logging.getLogger(__name__)

# Problems shown in the message of `VerifyReport.raise_if_failed`.
_MAX_PROBLEMS_SHOWN = 10

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_NO_CHECKPOINT = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What `verify` found.

    Attributes:
        path: the checkpoint checked.
        save_id: the committed save's id (None when the metadata itself is invalid).
        files_checked: shard files the metadata lists.
        tensors_checked: tensors and rank-local tensors whose chunks were checked.
        bytes_checked: tensor bytes read and checksummed.
        problems: every problem found, each naming the file and key it concerns; empty when verified.
        leftovers: files of an earlier or crashed save at the path (not part of the checkpoint; the
            next save to the path deletes them).
        pickled_keys: keys whose values are pickled and load only with `allow_pickle=True`.
    """

    path: str
    save_id: str | None
    files_checked: int
    tensors_checked: int
    bytes_checked: int
    problems: tuple[str, ...]
    leftovers: tuple[str, ...] = ()
    pickled_keys: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> None:
        """Raise when any problem was found.

        Raises:
            InvalidCheckpointError: naming the checkpoint and its first problems.
        """
        if self.problems:
            shown = "\n  ".join(self.problems[:_MAX_PROBLEMS_SHOWN])
            more = len(self.problems) - _MAX_PROBLEMS_SHOWN
            raise InvalidCheckpointError(
                f"checkpoint {self.path} failed verification with {len(self.problems)} problem(s):\n  {shown}"
                + (f"\n  and {more} more" if more > 0 else "")
            )


def verify(
    path: str | StorageSpec,
    *,
    storage_options: Mapping[str, Any] | None = None,
    io_threads: int = 4,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every file, header, checksum and tensor of the checkpoint at `path`.

    Args:
        path: local path or fsspec URL of the checkpoint directory, or a `StorageSpec` resolved earlier.
        storage_options: fsspec options for remote paths (endpoint, credentials).
        io_threads: shard files checked at the same time.
        max_metadata_bytes: a larger metadata file is reported as a problem without being read.
        progress: called with the number of bytes checksummed after each read (from the checking
            threads), e.g. to advance a progress bar.

    Returns:
        The report; `report.ok` is True when nothing is wrong.

    Raises:
        FileNotFoundError: nothing at `path`; `IncompleteCheckpointError` (a subclass) when shard
            files exist but no metadata was committed.
        CheckpointError: `path` is a file, or its backend cannot be opened.

    Example:
        >>> report = checkpoint.verify("/ckpts/step-100")
        >>> report.ok, report.problems
        (True, ())
    """
    storage = spec_for(path, storage_options=storage_options).open()
    try:
        return _verify_storage(storage, io_threads, max_metadata_bytes, progress)
    finally:
        storage.close()


def _verify_storage(
    storage: CheckpointStorage,
    io_threads: int,
    max_metadata_bytes: int,
    progress: Callable[[int], None] | None,
) -> VerifyReport:
    """`verify` once the storage is open; invalid metadata is the report's one problem, not an error."""
    start = time.perf_counter()
    try:
        metadata = read_metadata(storage, max_bytes=max_metadata_bytes)
    except InvalidCheckpointError as e:
        return VerifyReport(
            path=storage.url,
            save_id=None,
            files_checked=0,
            tensors_checked=0,
            bytes_checked=0,
            problems=(str(e),),
        )
    report = _verify_committed(storage, metadata, io_threads=io_threads, progress=progress)
    logger.info(
        "verified %s: %d files, %d tensors, %d bytes, %d problem(s) in %.3fs",
        report.path,
        report.files_checked,
        report.tensors_checked,
        report.bytes_checked,
        len(report.problems),
        time.perf_counter() - start,
    )
    return report


def _verify_committed(
    storage: CheckpointStorage,
    metadata: Metadata,
    *,
    io_threads: int,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    by_file = _chunks_by_file(metadata)
    grid_problems, unlocated = _add_grid_chunks(storage, metadata, by_file)
    names = sorted(metadata.files)

    def one(name: str) -> tuple[list[str], int]:
        refs = by_file.get(name, [])
        return verify_file(storage, metadata, name, metadata.files[name], refs, progress, unlocated=unlocated)

    if io_threads > 1 and len(names) > 1:
        with ThreadPoolExecutor(
            max_workers=min(io_threads, len(names)), thread_name_prefix="shardsafe-verify"
        ) as pool:
            results = list(pool.map(one, names))
    else:
        results = [one(n) for n in names]
    problems = grid_problems + [p for file_problems, _ in results for p in file_problems]
    # Incremental checkpoints: the referenced bytes too, in the checkpoints that hold them.
    ref_problems, ref_files, ref_bytes = verify_referenced(storage, metadata, by_file, progress)
    problems += ref_problems
    value_problems, pickled = _check_values(metadata)
    leftovers = tuple(leftover_names(storage.list_names(), keep={metadata.save_id}))
    rank_local_tensors = sum(t is not None for r in metadata.rank_local.values() for t in r.tensors)
    return VerifyReport(
        path=storage.url,
        save_id=metadata.save_id,
        files_checked=len(names) + ref_files,
        tensors_checked=len(metadata.tensors) + rank_local_tensors,
        bytes_checked=sum(n for _, n in results) + ref_bytes,
        problems=tuple(problems + value_problems),
        leftovers=leftovers,
        pickled_keys=tuple(pickled),
    )


def _chunks_by_file(metadata: Metadata) -> dict[str, list[ChunkRef]]:
    by_file: dict[str, list[ChunkRef]] = defaultdict(list)
    for fqn, record in metadata.tensors.items():
        for chunk in record.chunks:
            by_file[chunk.file].append(ChunkRef(fqn=fqn, dtype=record.dtype, chunk=chunk))
    for fqn, record in metadata.rank_local.items():
        for entry in record.tensors:
            if entry is not None:
                by_file[entry[1].file].append(ChunkRef(fqn=fqn, dtype=entry[0], chunk=entry[1]))
    return by_file


def _add_grid_chunks(
    storage: CheckpointStorage, metadata: Metadata, by_file: dict[str, list[ChunkRef]]
) -> tuple[list[str], frozenset[str]]:
    """Format version 2: every chunk of every grid key, located through its writer's header.

    Chunks are located one by one, so a damaged file is reported (naming it) while the chunks of the
    other keys are still checked. A key stops at its first problem (one missing writer would otherwise
    cost a message per cell); its name is returned with the problems, so that its entries in the
    other, undamaged files are not blamed on them as unaccounted for.
    """
    if not metadata.grids:
        return [], frozenset()
    resolver = GridResolver(storage, metadata)
    problems: dict[str, str] = {}  # one report per distinct cause
    unlocated: set[str] = set()
    for fqn, grid in metadata.grids.items():
        for cell in resolver.index.cells(fqn, Box(offsets=(0,) * len(grid.shape), sizes=grid.shape)):
            try:
                chunk = resolver.chunk(fqn, cell)
            except (CheckpointError, FileNotFoundError) as e:  # reported like any other problem, not raised
                problems.setdefault(str(e), f"grid key {fqn!r} cannot be located: {e}")
                unlocated.add(fqn)
                break
            by_file[chunk.file].append(ChunkRef(fqn=fqn, dtype=grid.dtype, chunk=chunk))
    return list(problems.values()), frozenset(unlocated)


def _check_values(metadata: Metadata) -> tuple[list[str], list[str]]:
    """Decode every value without unpickling: (problems, keys that hold pickled values)."""
    problems, pickled = [], []
    entries = [(fqn, v) for fqn, v in metadata.values.items()]
    entries += [
        (fqn, v)
        for fqn, r in metadata.rank_local.items()
        for t, v in zip(r.tensors, r.values, strict=True)
        if t is None
    ]
    for fqn, value in entries:
        try:
            decode_value(value, key=fqn, allow_pickle=False)
        except PickleNotAllowedError:
            if fqn not in pickled:
                pickled.append(fqn)
        except InvalidCheckpointError as e:
            problems.append(f"value of key {fqn!r}: {e}")
    return problems, pickled


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m checkpoint.tools.verify` command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m checkpoint.tools.verify", description="Verify a shardsafe checkpoint."
    )
    parser.add_argument("path", help="checkpoint directory: local path or fsspec URL")
    parser.add_argument("--storage-options", default=None, help="fsspec storage options as a JSON object")
    parser.add_argument("--io-threads", type=int, default=4, help="shard files checked at the same time")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.storage_options) if args.storage_options else None
        if options is not None and not isinstance(options, dict):
            raise ValueError("it must be a JSON object")
    except ValueError as e:
        parser.error(f"--storage-options: {e}")  # exits with status 2
    try:
        report = verify(args.path, storage_options=options, io_threads=max(1, args.io_threads))
    except (FileNotFoundError, CheckpointError) as e:
        sys.stderr.write(f"{type(e).__name__}: {e}\n")
        return EXIT_NO_CHECKPOINT
    out = sys.stdout
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
    out.write(
        f"{report.path}: {status}: save {report.save_id}, {report.files_checked} files, "
        f"{report.tensors_checked} tensors, {report.bytes_checked} bytes checked\n"
    )
    out.writelines(f"  problem: {p}\n" for p in report.problems)
    out.writelines(f"  leftover (not part of the checkpoint): {n}\n" for n in report.leftovers)
    out.writelines(f"  pickled value (load needs allow_pickle=True): {k}\n" for k in report.pickled_keys)
    return EXIT_OK if report.ok else EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
