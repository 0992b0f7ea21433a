"""The one exception hierarchy of shardsafe.

Every error the library raises on purpose is a `CheckpointError`. Each narrow
subclass also subclasses the built-in exception it refines, so callers that
already catch `ValueError` or `FileNotFoundError` keep working. The module
lives in `planners` because it is the one package that every other package
may import (`planners` itself imports nothing of ours).
"""

from __future__ import annotations

from collections.abc import Mapping


class CheckpointError(Exception):
    """Base class of every error raised on purpose by shardsafe."""


class InvalidStateDictError(CheckpointError, ValueError):
    """A state dict cannot be saved as given (unsupported leaf, clashing keys, mismatch between ranks)."""


class PlanCoverageError(CheckpointError, ValueError):
    """The ranks' chunks of a tensor leave a gap or overlap: the save would not be loadable."""


class MissingKeysError(CheckpointError, KeyError, RuntimeError):
    """`strict=True` load: the target asks for keys the checkpoint does not have.

    A `RuntimeError` as well, as the seed API documents for this case; a `KeyError` as before.
    """

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])

    def __reduce__(self):  # errors cross process boundaries between ranks
        return (type(self), (self.args[0], self.missing))


class MismatchError(CheckpointError, ValueError):
    """A saved tensor does not fit its load target (shape or dtype differ)."""


class InvalidCheckpointError(CheckpointError, ValueError):
    """The checkpoint's metadata or a shard file is malformed or unsafe to read."""


class CorruptCheckpointError(InvalidCheckpointError):
    """Bytes read back do not match the checksum recorded when they were written."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """The path holds shard files but no committed metadata: the save never finished."""


class MissingReferenceError(CheckpointError, FileNotFoundError):
    """An incremental checkpoint references a shard file of another checkpoint that is gone."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A complete checkpoint already exists at the path and overwrite was not asked for."""


class PickleNotAllowedError(CheckpointError, ValueError):
    """A value needs pickle (to save or to load) and the caller did not opt in."""


class RankLocalError(CheckpointError, ValueError):
    """A rank-local value cannot go back to its rank (the world size changed)."""


class CheckpointPathError(CheckpointError, ValueError):
    """A path does not fit the call: the ranks of one save or load passed different paths, or a
    `CheckpointManager` root is itself a checkpoint (its `metadata.json` is there)."""


class NotADirectoryCheckpointError(CheckpointError, NotADirectoryError):
    """The checkpoint path names a file (e.g. `.../metadata.json`), not a checkpoint directory."""


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """A wait across ranks or processes ran out of time."""


class WriterProcessError(CheckpointError, RuntimeError):
    """The background writer process failed or died."""


class CheckpointStateError(CheckpointError, RuntimeError):
    """The call does not fit the current state: the checkpointer is closed, or no process group is
    initialised although the rank info names several ranks."""


class PostCommitHookError(CheckpointError, RuntimeError):
    """A `post_commit` hook raised after the checkpoint was committed: the checkpoint IS complete and loadable.

    The hook's own exception is the `__cause__`; retrying the save is not needed.
    """


class StorageError(CheckpointError, OSError):
    """The storage backend refused a request (no such bucket, access denied) or kept failing it through every retry."""


class TierPathError(CheckpointError, PermissionError):
    """A request to a node's local tier server named something outside it (`..`, an absolute path, a
    symbolic link, a name that is not a step directory and a checkpoint file): refused."""


class DistributedCheckpointError(CheckpointError, RuntimeError):
    """One or more ranks failed a collective save or load step.

    Every rank raises the same error, so no rank hangs waiting for another.
    `failures` maps each failing rank to its error text.
    """

    def __init__(self, message: str, failures: Mapping[int, str]) -> None:
        detail = "\n".join(f"  rank {rank}: {text}" for rank, text in sorted(failures.items()))
        super().__init__(f"{message}\n{detail}" if detail else message)
        self.message = message
        self.failures = dict(failures)

    def __reduce__(self):  # errors cross process boundaries between ranks
        return (type(self), (self.message, self.failures))
