"""Commit hooks: user code that runs around the commit of a save."""

from __future__ import annotations

import abc
from typing import Any


class WriterHook(abc.ABC):
    """Runs on every rank (in the process that writes) around the commit.

    `pre_commit` runs after the rank's shard files are written and before the
    coordinator writes the metadata; `post_commit` runs once the checkpoint is
    committed (e.g. to register it in an index or prune old ones). An
    exception from `pre_commit` fails the save and nothing is committed.
    """

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Before the commit; the checkpoint is not loadable yet."""

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """After the commit; the checkpoint is complete and loadable."""
