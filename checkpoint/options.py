"""SaveOptions and LoadOptions: the seed's `**kwargs`, typed once at the API boundary.

`Checkpointer.save(state_dict, path, **kwargs)` and `Checkpointer.load(path,
state_dict, **kwargs)` keep the seed's signatures; the first thing a save or a
load does (`CheckpointWriter.write`, `AsyncCheckpointer._save`,
`CheckpointReader.read`) is to turn those keyword arguments into one of these
frozen records, refusing unknown names with a `TypeError`. Nothing deeper
reads a keyword dictionary.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planners.metadata import DEFAULT_MAX_METADATA_BYTES  # noqa: F401 (importable from here too)


def check_options(kwargs: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    """Raise `TypeError` naming the keyword arguments of `what()` that it does not accept."""
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s) {unknown}; accepted: {sorted(allowed)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveOptions:
    """The keyword arguments of one save.

    Attributes:
        overwrite: replace a complete checkpoint at the path (False: refuse with
            `CheckpointExistsError`).
        allow_pickle: store values that are not JSON-able pickled (False: refuse with
            `PickleNotAllowedError`).
        path_per_node: each node passes its own node-local directory (as the local tier does);
            the ranks then agree on the directory's name only, not its whole path (False: every
            rank must pass the same path, `CheckpointPathError` otherwise).
        incremental: record the XXH3-128 of every chunk, so that a later save can reference this
            one (format: `planners.references`); implied by `base`.
        base: an earlier, committed checkpoint of the same run root (a sibling directory of the
            path): chunks whose bytes equal the base's at the same box are referenced, not written
            (`checkpoint.save.incremental`). None: write everything.
    """

    overwrite: bool = False
    allow_pickle: bool = False
    path_per_node: bool = False
    incremental: bool = False
    base: Any = None  # str or os.PathLike

    def __post_init__(self) -> None:
        if type(self.incremental) is not bool:
            raise TypeError(f"save(incremental=...) must be a bool, got {self.incremental!r}")
        if self.base is not None and not isinstance(self.base, (str, os.PathLike)):
            raise TypeError(
                f"save(base=...) must be a path (str or os.PathLike), got {type(self.base).__name__}"
            )

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> SaveOptions:
        """The options of `save(..., **kwargs)`; `TypeError` for a name save() does not take."""
        check_options(kwargs, SAVE_OPTIONS, "save")
        return cls(**kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadOptions:
    """How one load reads: what `load(..., **kwargs)` asked, with the reader config's defaults.

    Attributes:
        map_location: device (or callable on each tensor) for tensors loaded without a target.
        allow_pickle: unpickle pickled values (False: refuse with `PickleNotAllowedError`).
        verify: check the crc32c of every block read before anything reaches the target.
        strict: True: raise `MissingKeysError` when the target asks for keys the checkpoint lacks;
            False: leave those target keys as they are, silently; None (not chosen): leave them and
            warn, naming up to five of them with the nearest saved keys.
        key_map: Hugging Face layouts only: a key prefix to strip or a callable renaming each
            key (see `checkpoint.load.hf_source.read_hf_metadata`).
        io_threads: files fetched at once (from `CheckpointReaderConfig`).
        max_metadata_bytes: refuse a metadata file larger than this (from `CheckpointReaderConfig`).
    """

    map_location: Any = None
    allow_pickle: bool = False
    verify: bool = True
    strict: bool | None = None
    io_threads: int = 8
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES
    key_map: Any = None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, defaults: LoadOptions) -> LoadOptions:
        """`defaults` with what `load(..., **kwargs)` set; `TypeError` for a name load() does not take."""
        check_options(kwargs, LOAD_OPTIONS, "load")
        return dataclasses.replace(defaults, **kwargs)


SAVE_OPTIONS = frozenset(f.name for f in dataclasses.fields(SaveOptions))
# Keyword arguments of load(); map_location is a named parameter, the rest come from the reader config.
LOAD_OPTIONS = frozenset({"allow_pickle", "verify", "strict", "key_map"})
