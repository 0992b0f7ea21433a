"""Reading incremental checkpoints: the files a checkpoint references live in its sibling checkpoints.

A format-version-3 checkpoint (`planners.references`) lists, besides its own shard files, files of
other checkpoints of the same run root, each named by that checkpoint's directory name. Every
reader (a load's `ChunkReader`, `verify`, `diff`, `export_hf`, the DCP reader) reads shard bytes
through one `CheckpointStorage` by file name; `follow_references` wraps that storage so the
referenced names open `<run root>/<checkpoint>/<file>` instead, and everything above it reads
them as it reads the checkpoint's own files (same range checks, same block checksums, which this
checkpoint's metadata records). Only the referenced files are reached this way, one hop: the
referenced checkpoint's metadata is never read, so it may already be gone (retention deletes
metadata before it sweeps files, `checkpoint.run.sweep`).

A referenced file that is gone raises `MissingReferenceError` naming the file, the checkpoint that
held it and the checkpoint being read.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from planners.errors import InvalidCheckpointError, MissingReferenceError
from planners.metadata import Metadata
from storage.backend import CheckpointStorage
from storage.local import LocalStorage
from storage.remote import FsspecStorage


def follow_references(storage: CheckpointStorage, metadata: Metadata) -> CheckpointStorage:
    """`storage`, or a view of it that opens referenced files in their own checkpoints."""
    refs = metadata.references
    if refs is None or not refs.files or isinstance(storage, ReferencingStorage):
        return storage
    return ReferencingStorage(storage, {n: f.checkpoint for n, f in refs.files.items()})


def sibling_storage(storage: CheckpointStorage, name: str) -> CheckpointStorage:
    """The storage of checkpoint directory `name` beside `storage`'s directory (same backend and options).

    Raises:
        InvalidCheckpointError: `storage` is of a kind that has no sibling directories (a Hugging Face
            cache view, a tier's peer holders): incremental checkpoints are read from their run root.
    """
    if isinstance(storage, LocalStorage):
        return LocalStorage(os.path.join(os.path.dirname(storage.root), name))
    if isinstance(storage, FsspecStorage):
        root, url = storage.root.rpartition("/")[0], storage.url.rpartition("/")[0]
        return FsspecStorage(
            storage.fs,
            f"{root}/{name}",
            url=f"{url}/{name}",
            transfer=storage.transfer,
            redact=storage._redact,
        )
    raise InvalidCheckpointError(
        f"{storage.url}: this checkpoint references files of checkpoint {name!r}, which cannot be reached "
        f"through {type(storage).__name__}; read it from its run root (or consolidate it first)"
    )


class ReferencingStorage:
    """A checkpoint's storage in which referenced file names open in the checkpoint that holds them.

    Every method taking a file name first routes by that name; the rest (url, list_names, close)
    are the checkpoint's own. Methods the wrapped storage lacks are lacking here too, so readers
    that probe for a capability (`read_ranges_into`, `reading`) see the same backend.
    """

    def __init__(self, storage: CheckpointStorage, files: dict[str, str]) -> None:
        self.storage = storage
        self.url = storage.url
        self.files = files  # referenced file name -> checkpoint directory name
        self._siblings: dict[str, CheckpointStorage] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ReferencingStorage({self.url!r}, {len(self.files)} referenced files)"

    def holder(self, name: str) -> CheckpointStorage:
        """The storage that holds file `name` (this checkpoint's own, or the referenced checkpoint's)."""
        checkpoint = self.files.get(name)
        if checkpoint is None:
            return self.storage
        with self._lock:
            if checkpoint not in self._siblings:
                self._siblings[checkpoint] = sibling_storage(self.storage, checkpoint)
            return self._siblings[checkpoint]

    def where(self, name: str) -> str:
        """Where file `name` lies, for messages."""
        return f"{self.holder(name).url}/{name}"

    def __getattr__(self, attr: str) -> Any:
        method = getattr(self.storage, attr)  # AttributeError when the backend lacks it, as it should
        if not callable(method) or attr in ("list_names", "close", "prepare", "remove_created_dirs"):
            return method

        def routed(*args: Any, **kwargs: Any) -> Any:
            if not args or not isinstance(args[0], str) or args[0] not in self.files:
                return method(*args, **kwargs)
            name = args[0]
            try:
                return getattr(self.holder(name), attr)(*args, **kwargs)
            except FileNotFoundError as e:
                raise self.missing(name) from e

        return routed

    def missing(self, name: str) -> MissingReferenceError:
        checkpoint = self.files[name]
        return MissingReferenceError(
            f"{self.url}: shard file {name}, referenced from checkpoint {checkpoint!r} "
            f"({self.holder(name).url}), is missing; this incremental checkpoint cannot be read: restore the "
            f"file, or load a checkpoint that does not reference {checkpoint!r}"
        )

    def close(self) -> None:
        for s in self._siblings.values():
            s.close()
        self.storage.close()


def verify_referenced(
    storage: CheckpointStorage,
    metadata: Metadata,
    chunks_by_file: dict[str, list[Any]],
    progress: Any = None,
) -> tuple[list[str], int, int]:
    """`verify`'s check of the bytes this checkpoint references: (problems, files checked, bytes checked).

    Each referenced file must exist in its checkpoint with the size this checkpoint recorded, and
    every block of every referenced chunk (`chunks_by_file[name]`, `ChunkRef`s) must match the
    checksums this checkpoint's metadata holds. The file's header belongs to its own save and is
    not this checkpoint's to judge: only the bytes referenced are.
    """
    from checkpoint.load.verify_file import _checksum_problem

    refs = metadata.references
    if refs is None or not refs.files:
        return [], 0, 0
    routed = follow_references(storage, metadata)
    problems: list[str] = []
    checked = 0
    for name, f in sorted(refs.files.items()):
        where = f"referenced file {name} (checkpoint {f.checkpoint!r})"
        try:
            size = routed.size(name)
        except MissingReferenceError:
            problems.append(f"{where}: missing; loads of this checkpoint fail until it is restored")
            continue
        except InvalidCheckpointError as e:
            problems.append(f"{where}: {e}")
            continue
        if size != f.nbytes:
            problems.append(
                f"{where}: {size} bytes where {f.nbytes} were recorded; it was replaced or truncated"
            )
            continue
        for ref in chunks_by_file.get(name, []):
            problem = _checksum_problem(routed, name, ref, metadata.checksum_block_bytes, progress)
            if problem is not None:
                problems.append(f"{problem} (referenced from checkpoint {f.checkpoint!r})")
            checked += ref.chunk.nbytes
    return problems, len(refs.files), checked
