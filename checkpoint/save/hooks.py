"""Commit hooks: user code that runs around the commit of a save.

`checkpoint.save.pipeline` calls them, in the process that writes (the trainer rank
for a sync save, the rank's writer process for an async one), the same way in
both modes.
"""

from __future__ import annotations

import abc
import logging
from typing import Any

from planners.errors import PostCommitHookError

logger = logging.getLogger(__name__)


class CommitHook(abc.ABC):
    """Runs on every rank (in the process that writes) around the commit.

    `pre_commit` runs after the rank's shard files are written and before the
    coordinator writes the metadata; `post_commit` runs once the checkpoint is
    committed (e.g. to register it in an index or prune old ones). An
    exception from `pre_commit` fails the save and nothing is committed; one
    from `post_commit` is logged and raised as `PostCommitHookError`, which
    says the checkpoint is committed.
    """

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Before the commit; the checkpoint is not loadable yet."""

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """After the commit; the checkpoint is complete and loadable."""


def run_post_commit(hook: CommitHook, path: str, *, rank: int) -> None:
    """Run `hook.post_commit`; its failure becomes a `PostCommitHookError` saying the save is committed."""
    try:
        hook.post_commit(path, rank=rank)
    except Exception as e:
        logger.error("rank %d: post_commit hook failed after %s was committed", rank, path, exc_info=True)
        raise PostCommitHookError(
            f"rank {rank}: the checkpoint at {path} IS committed and loadable, but the post_commit hook "
            f"failed: {type(e).__name__}: {e}"
        ) from e


# The seed's name for `CommitHook`, kept so existing subclasses keep working.
WriterHook = CommitHook
