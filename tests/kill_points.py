"""SIGKILL at a chosen step of the commit sequence, in the process that commits (helper of the sweep).

`KillAt` is a commit hook. Where it is unpickled (an async writer process) or `install()`ed (a sync
trainer), it wraps the real storage and barrier methods of that process so that, for a save whose
directory is named `kill-<point>`, the process SIGKILLs itself at that point:

- `before_publish`: the coordinator is about to write `metadata.json`;
- `after_publish`: `metadata.json` is written, nothing after it ran (the verdict is not out);
- `during_leftovers`: the old checkpoint's files are being deleted as leftovers (one is gone);
- `during_post_commit`: in the `post_commit` hook;
- `during_barrier`: on entering the barrier after the commit.

Only rank 0's hook (the coordinator) is armed. Nothing is faked: the bytes, the storage and the
commit are the real ones; the only change is the moment the process dies.
"""

from __future__ import annotations

import os
import signal
from pathlib import PurePosixPath
from typing import Any

from checkpoint import CommitHook

POINTS = ("before_publish", "after_publish", "during_leftovers", "during_post_commit", "during_barrier")
_state: dict[str, Any] = {"armed": False, "published": None}


def _point_of(url: str) -> str | None:
    name = PurePosixPath(str(url).rstrip("/")).name
    return name.removeprefix("kill-") if name.startswith("kill-") else None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install() -> None:
    if _state.get("installed"):
        return
    _state["installed"] = True
    from checkpoint.save.barriers import TCPStoreBarrier
    from planners.metadata import METADATA_FILE
    from storage.local import LocalStorage
    from storage.remote import FsspecStorage

    for cls in (LocalStorage, FsspecStorage):
        publish, remove = cls.publish, cls.remove

        def killing_publish(
            self: Any, name: str, data: bytes, *, overwrite: bool = True, _orig=publish
        ) -> None:
            point = _point_of(self.url) if _state["armed"] and name == METADATA_FILE else None
            if point == "before_publish":
                _die()
            _orig(self, name, data, overwrite=overwrite)
            if point == "after_publish":
                _die()
            if point is not None:
                _state["published"] = point

        def killing_remove(self: Any, names: Any, _orig=remove) -> None:
            names = list(names)
            if (
                _state["published"] == "during_leftovers"
                and _point_of(self.url) == "during_leftovers"
                and names
            ):
                _orig(self, names[:1])
                _die()
            _orig(self, names)

        cls.publish, cls.remove = killing_publish, killing_remove

    execute = TCPStoreBarrier.execute_barrier

    def killing_barrier(self: Any, key: str | None = None) -> None:
        if _state["published"] == "during_barrier":
            _die()
        execute(self, key)

    TCPStoreBarrier.execute_barrier = killing_barrier


class KillAt(CommitHook):
    """Armed on rank 0 only; see the module docstring for the points."""

    def __init__(self, *, armed: bool) -> None:
        self.armed = armed

    def install(self) -> None:
        """Arm this process (a sync save's trainer); a writer process arms itself when it unpickles the hook."""
        _state["armed"] = self.armed
        _install()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.install()

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        pass

    def post_commit(self, path: str, **kwargs: Any) -> None:
        if self.armed and _point_of(path) == "during_post_commit":
            _die()
