"""The user API: `Checkpointer` and its synchronous implementation.

`Checkpointer` holds the checks every implementation shares (arguments,
closed state) and calls the implementation's `_save` / `_load`; the async
checkpointer (checkpoint.async_writer.async_checkpointer) drops in beside the sync one.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from checkpoint.load.reader import CheckpointReader
from checkpoint.save.writer import CheckpointWriter
from checkpoint.types import STATE_DICT, checkpoint_path
from planners.errors import CheckpointStateError

logger = logging.getLogger(__name__)


class Checkpointer(abc.ABC):
    """Saves and loads state dicts; every rank of the job calls `save` together.

    Call order: any number of `save`/`load` calls, then `close()` once. After
    `close()` every call raises `RuntimeError`.
    """

    _reader: CheckpointReader  # set by each implementation; loading is the same for all

    def __init__(self) -> None:
        self._closed = False

    def save(self, state_dict: STATE_DICT, path: str, **kwargs: Any) -> tuple[Future, Future] | None:
        """Save `state_dict` at `path` (every rank calls it).

        Args:
            state_dict: nested dicts/lists/tuples of tensors, DTensors, JSON-able values,
                `RankLocal` values and objects with `state_dict()`/`load_state_dict()`.
            path: local path (str or `os.PathLike`), `file://` URL or any fsspec URL of the
                checkpoint directory.
            overwrite: replace an existing complete checkpoint (default False: refuse).
            allow_pickle: store non-JSON values pickled (default False: refuse).

        Returns:
            None for a synchronous checkpointer; `(stage_future, write_future)` for an async one.
        """
        self._check_open()
        if isinstance(state_dict, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
            raise TypeError("save() takes (state_dict, path): the arguments are swapped")
        path = checkpoint_path(path)
        if not _is_state(state_dict):
            raise TypeError(
                f"state_dict must be a dict (or list/tuple/stateful object), got {type(state_dict).__name__}"
            )
        return self._save(state_dict, path, **kwargs)

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> STATE_DICT:
        """Load the checkpoint at `path`.

        Args:
            path: the checkpoint directory (local path, `os.PathLike` or fsspec URL).
            state_dict: target whose tensors are filled in place and whose layout
                (shapes, DTensor placements, world size) decides what each rank reads.
                None returns the whole checkpoint as plain CPU tensors, same nesting.
            default_map_location: device (or callable) for tensors loaded without a target;
                `map_location=` is accepted as another name for it (as `torch.load` spells it).
            strict: True raises `MissingKeysError` listing target keys the checkpoint lacks (with
                the nearest saved keys); False leaves them as they are, silently. Not given (None),
                the load is non-strict as the seed's contract says, and warns (`UserWarning`) naming
                up to five target keys left unloaded and the nearest saved key of each.
            allow_pickle: allow pickled values to be unpickled (default False).
            verify: verify checksums of the bytes read (default True).

        Returns:
            The filled target (or the whole checkpoint).

        Raises:
            FileNotFoundError: nothing at `path`; `IncompleteCheckpointError` (a subclass)
                when shard files exist without committed metadata.
            MismatchError: a saved tensor's shape or dtype differs from the target's, or a key
                holds a tensor on one side and a plain value on the other.

        A non-strict load whose target matched no saved key warns (`UserWarning`) naming
        some keys of each side, since it returns the target unchanged.
        """
        self._check_open()
        if _is_state(path) and isinstance(state_dict, (str, os.PathLike)):
            raise TypeError("load() takes (path, state_dict): the arguments are swapped")
        path = checkpoint_path(path)
        if "map_location" in kwargs:
            if default_map_location is not None:
                raise TypeError("load() got both map_location and default_map_location; pass one of them")
            default_map_location = kwargs.pop("map_location")
        return self._load(
            path, state_dict, default_map_location=default_map_location, strict=strict, **kwargs
        )

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """The fsspec options (endpoint, credentials) this checkpointer opens paths with."""
        return self._reader.storage_options

    def close(self) -> None:
        """Release resources; safe to call more than once."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointStateError(f"{type(self).__name__} is closed")

    @abc.abstractmethod
    def _save(self, state_dict: STATE_DICT, path: str, **kwargs: Any) -> tuple[Future, Future] | None: ...

    def _load(
        self,
        path: str,
        state_dict: STATE_DICT | None,
        *,
        default_map_location: Any,
        strict: bool | None,
        **kwargs: Any,
    ) -> STATE_DICT:
        """Loading is synchronous for every checkpointer, through its `CheckpointReader`."""
        loaded, _ = self._reader.read(
            path, state_dict, map_location=default_map_location, strict=strict, **kwargs
        )
        return loaded

    @abc.abstractmethod
    def _close(self) -> None: ...


def _is_state(value: Any) -> bool:
    """A state dict as save() takes one: a dict, list or tuple, or an object with `state_dict()`."""
    return isinstance(value, (Mapping, list, tuple)) or hasattr(value, "state_dict")


class SyncCheckpointer(Checkpointer):
    """Saves and loads in the calling thread: `save` returns once the checkpoint is committed.

    Example:
        >>> ckpt = SyncCheckpointer(writer, reader)
        >>> ckpt.save({"w": torch.ones(3)}, "/tmp/ckpt/step-1")
        >>> ckpt.load("/tmp/ckpt/step-1")["w"]
        tensor([1., 1., 1.])
    """

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader) -> None:
        super().__init__()
        self._writer = writer
        self._reader = reader

    @property
    def last_save(self) -> Any:
        """`SaveStats` of this rank's last save (plan reuse, bytes, `phase_secs`), or None."""
        return self._writer.last_save

    def _save(self, state_dict: STATE_DICT, path: str, **kwargs: Any) -> None:
        self._writer.write(path, state_dict, **kwargs)
        return None

    def _close(self) -> None:
        self._writer.close()
        logger.debug("SyncCheckpointer closed")
