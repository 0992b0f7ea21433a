"""CheckpointReader: loading on one rank, into a target layout or whole."""

from __future__ import annotations

from typing import Any

from checkpoint.config import CheckpointReaderConfig
from checkpoint.load.loader import load_checkpoint
from checkpoint.options import LOAD_OPTIONS, LoadOptions
from checkpoint.types import STATE_DICT, RankInfo
from storage.spec import StorageAccess

__all__ = ["LOAD_OPTIONS", "CheckpointReader"]


class CheckpointReader:
    """Reads checkpoints on this rank; needs no collective, so ranks may load independently.

    Example:
        >>> reader = CheckpointReader(RankInfo.detect())
        >>> state, missing = reader.read("/tmp/ckpt/step-1")
    """

    def __init__(
        self,
        rank_info: RankInfo,
        *,
        config: CheckpointReaderConfig | None = None,
        storage: StorageAccess | None = None,
    ) -> None:
        self._rank_info = rank_info
        self._config = config or CheckpointReaderConfig()
        self._storage = storage or StorageAccess()

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """The fsspec options paths are opened with (tools built on a checkpointer reach the same storage)."""
        return self._storage.storage_options

    def read(
        self, path: str, state_dict: STATE_DICT | None = None, *, map_location: Any = None, **kwargs: Any
    ) -> tuple[STATE_DICT, list[str]]:
        """Load the checkpoint at `path`.

        Args:
            path: local path or fsspec URL of a committed checkpoint.
            state_dict: the target; its tensors are filled in place (their shapes and
                placements decide what is read). None loads everything as plain CPU tensors.
            map_location: device (or callable on each tensor) for tensors loaded without a target.
            allow_pickle: allow pickled values to be unpickled (default False: refuse).
            verify: check crc32c of every byte read (default from the reader config).
            strict: True raises `MissingKeysError` when the target asks for keys the checkpoint lacks;
                False loads what matches silently; None (the default) loads what matches and warns.
            key_map: for a Hugging Face layout, a key prefix to strip or a callable renaming
                each key (see `checkpoint.load.hf_source.read_hf_metadata`).

        Raises:
            TypeError: an unknown keyword argument.

        Returns:
            The loaded state dict and the sorted list of target keys the checkpoint lacked.
        """
        options = LoadOptions.from_kwargs(kwargs, defaults=self._defaults(map_location))
        storage = self._storage.resolve(path).open()
        try:
            return load_checkpoint(
                storage,
                state_dict,
                rank=self._rank_info.global_rank,
                world_size=self._rank_info.global_world_size,
                options=options,
            )
        finally:
            storage.close()

    def _defaults(self, map_location: Any) -> LoadOptions:
        """The options of a load that passes no keyword arguments: the reader config's."""
        return LoadOptions(
            map_location=map_location,
            verify=self._config.verify_checksums,
            io_threads=self._config.io_threads,
            max_metadata_bytes=self._config.max_metadata_bytes,
        )
