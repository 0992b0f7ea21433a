"""The exceptions of shardsafe (defined in `planners.errors`, re-exported for users)."""

from planners.errors import (
    CheckpointError,
    CheckpointExistsError,
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
    PostCommitHookError,
    RankLocalError,
    StorageError,
    WriterProcessError,
)

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
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
    "PostCommitHookError",
    "RankLocalError",
    "StorageError",
    "WriterProcessError",
]
