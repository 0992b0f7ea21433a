"""Lightning (the unified `lightning` package, `import lightning.pytorch as pl`) saving and resuming through shardsafe (extra `lightning`).

`ShardsafeModelParallelStrategy` replaces `ModelParallelStrategy` (FSDP2 / TP) and
`ShardsafeCheckpointIO` is a `CheckpointIO` plugin for DDP and single-device runs; what they do
is `checkpoint.integrations.lightning_common`'s, the same for both Lightning packages. This module
serves `lightning.pytorch`; a user with both packages installed picks by import.
"""

from __future__ import annotations

from checkpoint.integrations import require

require("lightning.pytorch", extra="lightning")

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from checkpoint.integrations.lightning_common import (  # noqa: E402
    LIGHTNING_KEY,
    CheckpointIOFiles,
    StrategyCheckpoints,
    plain,
)

__all__ = ["LIGHTNING_KEY", "ShardsafeCheckpointIO", "ShardsafeModelParallelStrategy", "plain"]


class ShardsafeModelParallelStrategy(StrategyCheckpoints, ModelParallelStrategy):
    """`ModelParallelStrategy` whose checkpoints are shardsafe checkpoints.

    Args:
        asynchronous: save through a writer process per rank; a save returns once staged.
        allow_pickle: store (and load) values of the Lightning checkpoint that JSON cannot hold.
        storage_options: fsspec options for remote checkpoint paths.
        config: shardsafe tunables (its `storage_options` are replaced by the argument when given).
        **kwargs: `ModelParallelStrategy`'s own arguments (`data_parallel_size`, ...); its defaults
            ("auto": one data-parallel rank per node) work too.

    Example:
        >>> trainer = Trainer(strategy=ShardsafeModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    """


class ShardsafeCheckpointIO(CheckpointIOFiles, CheckpointIO):
    """A `CheckpointIO` plugin writing each checkpoint as a single-rank shardsafe checkpoint.

    Lightning calls it on global rank 0 only (DDP, single device), so it never takes part in
    a collective. Loading returns the dict Lightning saved, tensors as plain CPU tensors
    moved by `map_location`.

    Args:
        allow_pickle: store (and load) values JSON cannot hold, pickled.
        storage_options: fsspec options for remote checkpoint paths.
        config: shardsafe tunables (its `storage_options` are replaced by the argument when given).

    Example:
        >>> trainer = Trainer(strategy="ddp", plugins=[ShardsafeCheckpointIO()])
    """
