"""torchtitan 0.3 saving and resuming through shardsafe (extra `torchtitan`).

torchtitan's trainer builds whichever checkpoint manager `Trainer.Config.checkpoint`
names, through `config.checkpoint.build(dataloader=, model_parts=, optimizers=,
lr_schedulers=, states=, sd_adapter=, base_folder=)`. `ShardsafeCheckpointManager`
is such a manager: it keeps the same states as torchtitan's DCP manager (the
`ModelWrapper` over the model parts, the optimizers and LR schedulers containers,
the dataloader and `train_state`, all `Stateful`) and hands them to shardsafe's
`CheckpointManager`. shardsafe calls their `state_dict()` on save and their
`load_state_dict()` once their tensors are filled on load. So a step directory
(`<folder>/step-000000100`) is a shardsafe checkpoint that loads on any world size,
retention keeps the newest `keep_latest_k` complete steps, and a damaged newest
step is skipped for the one before it.

What this manager does not do, refused in its `Config`: Hugging Face layouts
(`initial_load_in_hf`, `last_save_in_hf`) and a final save cast to another
`export_dtype`.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from checkpoint.integrations import require

require("torchtitan", extra="torchtitan")

from torch import nn  # noqa: E402
from torchtitan.components.checkpointer.base import (  # noqa: E402
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    BaseCheckpointManager,
    ModelWrapper,
)
from torchtitan.tools import filesystem  # noqa: E402

from checkpoint.builder import make_async_checkpointer, make_sync_checkpointer  # noqa: E402
from checkpoint.checkpointer import Checkpointer  # noqa: E402
from checkpoint.config import CheckpointerConfig  # noqa: E402
from checkpoint.manager.manager import CheckpointManager  # noqa: E402

__all__ = ["ShardsafeCheckpointManager"]

logger = logging.getLogger(__name__)


class ShardsafeCheckpointManager(BaseCheckpointManager):
    """A torchtitan checkpoint manager whose steps are shardsafe checkpoints.

    Example (the one-line change in a torchtitan config):
        >>> config.checkpoint = ShardsafeCheckpointManager.Config(enable=True, interval=100, keep_latest_k=3)
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        """torchtitan's checkpoint policies, plus shardsafe's async mode and storage options."""

        async_mode: Literal["disabled", "async"] = "disabled"
        """'async': a save returns once this rank's chunks are staged; a writer process commits it."""

        storage_options: dict[str, Any] | None = None
        """fsspec options (endpoint, credentials) for a remote `folder` or `initial_load_path`."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            if self.async_mode not in ("disabled", "async"):
                raise ValueError(f"async_mode must be 'disabled' or 'async', got {self.async_mode!r}")
            if self.initial_load_in_hf or self.last_save_in_hf:
                raise ValueError(
                    "ShardsafeCheckpointManager does not read or write Hugging Face layouts through torchtitan's "
                    "flags; convert with `shardsafe export-hf`, or use torchtitan's own CheckpointManager"
                )
            if self.export_dtype != "float32":
                raise ValueError(
                    f"export_dtype {self.export_dtype!r}: ShardsafeCheckpointManager saves the model in its own dtype"
                )

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any,
        model_parts: list[nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any = None,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        self.save_future: Future[None] | None = None
        if not self.enable:
            return
        self.config = config
        self.folder = filesystem.join(base_folder, config.folder) if base_folder else config.folder
        self.states = states
        self.states.update(
            {
                MODEL: ModelWrapper(model_parts),
                OPTIMIZER: optimizers,
                DATALOADER: dataloader,
                LR_SCHEDULER: lr_schedulers,
            }
        )
        shardsafe_config = CheckpointerConfig(storage_options=config.storage_options)
        make = make_async_checkpointer if config.async_mode == "async" else make_sync_checkpointer
        self.checkpointer: Checkpointer = make(shardsafe_config)
        self.manager = CheckpointManager(
            self.folder,
            checkpointer=self.checkpointer,
            keep_last=config.keep_latest_k or None,
            interval_steps=config.interval,
        )
        logger.info("shardsafe checkpoints of this run go to %s", self.folder)

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        """Save at the interval, at the first step when asked, and at the last step."""
        if self.config.load_only:
            return False
        first = curr_step == 1 and self.config.enable_first_step_checkpoint
        state = self.states
        if last_step and self.config.last_save_model_only:
            state = {MODEL: self.states[MODEL]}
        saved = self.manager.save(curr_step, state, force=last_step or first)
        if saved and self.config.async_mode == "async":
            self.save_future = Future()  # marks a write in flight; `_wait_for_saving` waits on the manager
        return saved

    def _load(self, step: int = -1) -> bool:
        """Resume from `step` (-1: the newest complete one), else from `initial_load_path`; False if none."""
        if self.manager.latest_step() is not None or step != -1:
            loaded = self.manager.load(self._states_to_load(), step=None if step == -1 else step)
            return loaded is not None
        path = self.config.initial_load_path
        if not path:
            return False
        state = {MODEL: self.states[MODEL]} if self.config.initial_load_model_only else self._states_to_load()
        self.checkpointer.load(path, state, strict=True)
        logger.info("initial load from %s (%s)", path, "model only" if len(state) == 1 else "all states")
        return True

    def _states_to_load(self) -> dict[str, Any]:
        excluded = set(self.config.exclude_from_loading)
        unknown = excluded - set(self.states)
        if unknown:
            raise ValueError(
                f"exclude_from_loading names {sorted(unknown)}, which are not checkpointed states"
            )
        return {k: v for k, v in self.states.items() if k not in excluded and v is not None}

    def _maybe_wait_for_staging(self) -> None:
        """Nothing to wait for: an async save returns once staged."""

    def _wait_for_saving(self) -> None:
        self.save_future = None
        self.manager.wait_until_finished()

    def _close(self) -> None:
        self.save_future = None
        try:
            self.manager.close()
        finally:
            self.checkpointer.close()
