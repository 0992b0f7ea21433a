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

# isort: off
# First, before any sibling package: a user's storage.py or planners/ in their place is named (ImportError).
import checkpoint.shadowing  # noqa: F401

# isort: on
import warnings

from checkpoint.async_writer.async_checkpointer import AsyncCheckpointer
from checkpoint.async_writer.client import CheckpointProcess
from checkpoint.async_writer.staging import CheckpointStager, DefaultStager
from checkpoint.builder import make_async_checkpointer, make_sync_checkpointer
from checkpoint.checkpointer import Checkpointer, SyncCheckpointer
from checkpoint.config import (
    CheckpointerConfig,
    CheckpointProcessConfig,
    CheckpointReaderConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
)
from checkpoint.errors import *  # noqa: F403
from checkpoint.errors import __all__ as _errors
from checkpoint.exit_order import install_exit_handler
from checkpoint.load.reader import CheckpointReader
from checkpoint.manager.manager import CheckpointManager, StepRecord
from checkpoint.options import LoadOptions, SaveOptions
from checkpoint.save.barriers import Barrier, BarrierConfig, DistBarrier, TCPStoreBarrier
from checkpoint.save.hooks import CommitHook, WriterHook
from checkpoint.save.pipeline import SaveStats
from checkpoint.save.writer import CheckpointWriter
from checkpoint.state.flatten import RankLocal
from checkpoint.tools.consolidate import ConsolidateResult, consolidate
from checkpoint.tools.dcp_import import DcpImportResult, import_dcp
from checkpoint.tools.hf_export import HfExportResult, export_hf
from checkpoint.tools.verify import VerifyReport, verify
from checkpoint.types import STATE_DICT, RankInfo

__all__ = [
    "STATE_DICT",
    "StepRecord",
    "AsyncCheckpointer",
    "Barrier",
    "BarrierConfig",
    "CheckpointProcess",
    "CommitHook",
    "CheckpointProcessConfig",
    "CheckpointReader",
    "CheckpointReaderConfig",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "CheckpointManager",
    "Checkpointer",
    "CheckpointerConfig",
    "DcpImportResult",
    "DefaultStager",
    "DistBarrier",
    "HfExportResult",
    "LoadOptions",
    "RankInfo",
    "RankLocal",
    "SaveOptions",
    "SaveStats",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "VerifyReport",
    "WriterHook",
    "export_hf",
    "consolidate",
    "ConsolidateResult",
    "import_dcp",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "verify",
    *_errors,
]

# `python -m checkpoint.tools.verify` runs that module as __main__ after this package imported it for
# `checkpoint.verify()`; the second copy keeps no state, so runpy's warning about it is only noise.
warnings.filterwarnings(
    "ignore", message="'checkpoint.tools.verify' found in sys.modules", category=RuntimeWarning
)

# A gloo worker thread that frees its last work during interpreter finalization aborts the
# process (see checkpoint/exit_order.py); every process that imports shardsafe exits in order.
install_exit_handler()
