"""What shardsafe's Lightning integrations share, whichever package the user installed.

Lightning ships as two packages with the same classes under two names: the unified `lightning`
(`import lightning.pytorch as pl`, what Lightning's docs use) and `pytorch_lightning`. A
`Trainer` of one refuses a strategy or plugin subclassing the other's classes, so each has its
own module here (`checkpoint.integrations.lightning`, `checkpoint.integrations.pytorch_lightning`)
declaring the same two class names over its own bases; the behaviour lives once, in the two
mixins below, which import neither package.

- `StrategyCheckpoints` (for `ModelParallelStrategy`, FSDP2 / TP): Lightning hands every rank
  the whole checkpoint dict; the model and optimizer states go to shardsafe as DTensor state
  dicts (`state_dict`, `optimizer_<i>`), and the rest of the dict (loops, callbacks, epoch,
  global step, hyperparameters, LR schedulers) goes into the same checkpoint under `lightning`,
  as typed JSON: pickle only for values JSON cannot hold, and only with `allow_pickle=True`.
  `load_checkpoint` reshards into the live model and optimizers, so `trainer.fit(ckpt_path=...)`
  resumes on another number of processes. With the strategy's defaults on one node every rank's
  `data_parallel` sub-mesh is itself and holds a whole copy (sub-mesh replicas): each tensor is
  written once all the same. With `asynchronous=True`, a save returns once this rank's chunks
  are staged and the writer process finishes it; the next save, a load, and teardown wait for it.
- `CheckpointIOFiles` (for `CheckpointIO`, DDP and single device), where Lightning saves on
  global rank 0 only: the whole checkpoint dict as one single-rank shardsafe checkpoint, loaded
  back as plain tensors.

Mappings Lightning uses (`AttributeDict`, `OrderedDict`) are saved as plain dicts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import fsspec
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from checkpoint.builder import make_async_checkpointer, make_sync_checkpointer
from checkpoint.checkpointer import Checkpointer
from checkpoint.config import CheckpointerConfig
from checkpoint.types import RankInfo

logger = logging.getLogger(__name__)

# The key of the checkpoint that holds what Lightning keeps besides model and optimizer state.
LIGHTNING_KEY = "lightning"


class StrategyCheckpoints:
    """The checkpoint methods of `ShardsafeModelParallelStrategy`; mixed in before `ModelParallelStrategy`."""

    def __init__(
        self,
        *,
        asynchronous: bool = False,
        allow_pickle: bool = False,
        storage_options: dict[str, Any] | None = None,
        config: CheckpointerConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("save_distributed_checkpoint") is False:
            raise ValueError(
                f"{type(self).__name__} always saves sharded shardsafe checkpoints; "
                "drop save_distributed_checkpoint=False (use ModelParallelStrategy for one consolidated file)"
            )
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self._asynchronous = asynchronous
        self._allow_pickle = allow_pickle
        self._config = _with_storage(config, storage_options)
        self._checkpointer: Checkpointer | None = None
        self._pending: Future[None] | None = None

    def _shardsafe(self) -> Checkpointer:
        """This rank's checkpointer, made at first use (collective: the process group is up by then)."""
        if self._checkpointer is None:
            make = make_async_checkpointer if self._asynchronous else make_sync_checkpointer
            self._checkpointer = make(self._config)
        return self._checkpointer

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Save Lightning's checkpoint dict at `filepath` (every rank calls it)."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported: "
                f"pass storage_options to {type(self).__name__}(...) instead"
            )
        path = str(self.broadcast(str(filepath)))
        state = {"state_dict": checkpoint.pop("state_dict")}
        for i, optim_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = optim_state
        state[LIGHTNING_KEY] = plain(checkpoint)
        self.wait_for_save()
        futures = self._shardsafe().save(state, path, overwrite=True, allow_pickle=self._allow_pickle)
        if futures is not None:  # asynchronous: the training may go on once this rank is staged
            stage, self._pending = futures
            stage.result()

    def wait_for_save(self) -> None:
        """Block until the last asynchronous save is committed; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Reshard the checkpoint into the live model and optimizers; return the rest of Lightning's dict."""
        self.wait_for_save()
        path = str(self.broadcast(str(checkpoint_path)))
        assert self.model is not None and self.lightning_module is not None  # restore runs after setup
        strict = self.lightning_module.strict_loading
        optimizers = [getattr(o, "_optimizer", o) for o in self.optimizers]
        target: dict[str, Any] = {"state_dict": get_model_state_dict(self.model)}
        for i, optim in enumerate(optimizers):
            target[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, optim)
        target[LIGHTNING_KEY] = None  # the whole saved subtree
        loaded = self._shardsafe().load(path, target, strict=strict, allow_pickle=self._allow_pickle)
        set_model_state_dict(self.model, loaded["state_dict"], options=StateDictOptions(strict=strict))
        for i, optim in enumerate(optimizers):
            set_optimizer_state_dict(self.model, optim, optim_state_dict=loaded[f"optimizer_{i}"])
        logger.info("restored %s into %d optimizer(s)", path, len(optimizers))
        return dict(loaded[LIGHTNING_KEY])

    def teardown(self) -> None:
        try:
            self.wait_for_save()
        finally:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            super().teardown()


class CheckpointIOFiles:
    """The methods of `ShardsafeCheckpointIO`; mixed in before Lightning's `CheckpointIO`."""

    def __init__(
        self,
        *,
        allow_pickle: bool = False,
        storage_options: dict[str, Any] | None = None,
        config: CheckpointerConfig | None = None,
    ) -> None:
        super().__init__()
        self._allow_pickle = allow_pickle
        self._config = _with_storage(config, storage_options)
        self._checkpointer: Checkpointer | None = None

    def _shardsafe(self) -> Checkpointer:
        if self._checkpointer is None:  # one rank on its own, whatever the job's process group
            self._checkpointer = make_sync_checkpointer(self._config, rank_info=RankInfo(0, 1))
        return self._checkpointer

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "ShardsafeCheckpointIO.save_checkpoint(..., storage_options=...) is not supported: "
                "pass storage_options to ShardsafeCheckpointIO(...) instead"
            )
        self._shardsafe().save(plain(checkpoint), str(path), overwrite=True, allow_pickle=self._allow_pickle)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return self._shardsafe().load(
            str(path), default_map_location=map_location, allow_pickle=self._allow_pickle
        )

    def remove_checkpoint(self, path: Any) -> None:
        fs, root = fsspec.core.url_to_fs(str(path), **(self._config.storage_options or {}))
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def teardown(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None


def plain(value: Any) -> Any:
    """`value` with every mapping a plain dict (Lightning's `AttributeDict`, `OrderedDict`), tensors untouched."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if type(value) is list:
        return [plain(v) for v in value]
    if type(value) is tuple:
        return tuple(plain(v) for v in value)
    return value


def _with_storage(
    config: CheckpointerConfig | None, storage_options: dict[str, Any] | None
) -> CheckpointerConfig:
    config = config or CheckpointerConfig()
    if storage_options is None:
        return config
    return dataclasses.replace(config, storage_options=storage_options)
