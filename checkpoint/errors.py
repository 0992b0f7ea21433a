"""The exceptions of shardsafe (defined in `planners.errors`, re-exported for users)."""

from planners.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointStateError,
    CheckpointTimeoutError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    IncompleteCheckpointError,
    InvalidCheckpointError,
    InvalidStateDictError,
    MismatchError,
    MissingKeysError,
    PickleNotAllowedError,
    PlanCoverageError,
    RankLocalError,
    StorageError,
    WriterProcessError,
)

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointStateError",
    "CheckpointTimeoutError",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "IncompleteCheckpointError",
    "InvalidCheckpointError",
    "InvalidStateDictError",
    "MismatchError",
    "MissingKeysError",
    "PickleNotAllowedError",
    "PlanCoverageError",
    "RankLocalError",
    "StorageError",
    "WriterProcessError",
]
