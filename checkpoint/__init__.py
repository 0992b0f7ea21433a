"""shardsafe's user API: sharded checkpoints of PyTorch state dicts.

Every rank of a job calls `save` together; each writes its shards as
safetensors files and the coordinator commits the metadata last. `load`
reshards to whatever layout the target has.

Example:
    >>> import checkpoint
    >>> ckpt = checkpoint.make_sync_checkpointer()
    >>> ckpt.save({"w": torch.ones(4)}, "/tmp/run/step-1")
    >>> ckpt.load("/tmp/run/step-1")["w"]
    tensor([1., 1., 1., 1.])
"""

from checkpoint.barriers import Barrier, BarrierConfig, DistBarrier, TCPStoreBarrier
from checkpoint.builder import make_sync_checkpointer
from checkpoint.checkpointer import Checkpointer, SyncCheckpointer
from checkpoint.config import CheckpointerConfig, CheckpointReaderConfig, CheckpointWriterConfig
from checkpoint.errors import *  # noqa: F403
from checkpoint.errors import __all__ as _errors
from checkpoint.hooks import WriterHook
from checkpoint.reader import CheckpointReader
from checkpoint.types import STATE_DICT, RankInfo
from checkpoint.writer import CheckpointWriter
from planners.flatten import RankLocal

__all__ = [
    "STATE_DICT",
    "Barrier",
    "BarrierConfig",
    "CheckpointReader",
    "CheckpointReaderConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "DistBarrier",
    "RankInfo",
    "RankLocal",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "WriterHook",
    "make_sync_checkpointer",
    *_errors,
]
