"""The exceptions of shardsafe (defined in `planners.errors`, re-exported for users).

Users catch them as `checkpoint.MismatchError`, so that is the name a traceback prints: each class's
`__module__` is set to this package below. `planners` stays free of any import of ours (it only
defines them); pickle, which also goes by `__module__`, finds every class at `checkpoint.<name>`,
and a process that unpickles one (another rank, the writer process) imports `checkpoint` anyway.
"""

from planners.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointPathError,
    CheckpointStateError,
    CheckpointTimeoutError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    IncompleteCheckpointError,
    InvalidCheckpointError,
    InvalidStateDictError,
    MismatchError,
    MissingKeysError,
    MissingReferenceError,
    NotADirectoryCheckpointError,
    PickleNotAllowedError,
    PlanCoverageError,
    PostCommitHookError,
    RankLocalError,
    StorageError,
    TierPathError,
    WriterProcessError,
)

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointPathError",
    "CheckpointStateError",
    "CheckpointTimeoutError",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "IncompleteCheckpointError",
    "InvalidCheckpointError",
    "InvalidStateDictError",
    "MismatchError",
    "MissingKeysError",
    "MissingReferenceError",
    "NotADirectoryCheckpointError",
    "PickleNotAllowedError",
    "PlanCoverageError",
    "PostCommitHookError",
    "RankLocalError",
    "StorageError",
    "TierPathError",
    "WriterProcessError",
]


# The public name in tracebacks and reprs (`checkpoint.MismatchError`, not `planners.errors.MismatchError`).
for _name in __all__:
    globals()[_name].__module__ = "checkpoint"
del _name
