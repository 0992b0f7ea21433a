"""`CheckpointManager(incremental=True)`: which base each save of the run references.

The manager hands its checkpointer to `IncrementalSaves`, which adds the incremental save
options (`checkpoint.save.incremental`) to each save under the run root and passes everything
else through. A chain starts with a full save; each of the next `full_every - 1` saves names as
its base the newest step this wrapper saw committed (a sync save that returned, an async one
whose write finished without error, checked at the next save), so references reach back at most `full_every - 1` saves,
a restore stays one hop, and a save never references one in flight or failed. A save that
replaces a step (`overwrite=True`, a damaged step saved again), a failed save or a new process
(after a resume) starts the chain again with a full save. Every save of the chain records its
chunk hashes, so the next can compare against it.

Retention keeps what kept steps reference (`checkpoint.run.sweep`); the base of the next
save is the newest committed step, which retention always keeps.
"""

from __future__ import annotations

import threading
from typing import Any

from checkpoint.run.steps import join, parse_step_dir


def incremental_saves(
    checkpointer: Any, root: str, incremental: bool, full_every: int, local_root: str | None
) -> Any:
    """The checkpointer the manager saves through: `IncrementalSaves` around it when `incremental`.

    Raises:
        ValueError: `full_every` is not an int >= 1, or `incremental` is combined with a node-local
            tier (`local_root`): the tier's uploads bypass the checkpointer, so the chain could not
            know which step is the newest committed one; not supported yet.
    """
    if type(incremental) is not bool:
        raise ValueError(f"incremental must be a bool, got {incremental!r}")
    if not incremental:
        return checkpointer
    if local_root is not None:
        raise ValueError(
            "incremental=True cannot be combined with a node-local tier (local_root) yet: "
            "leave one of them out"
        )
    return IncrementalSaves(checkpointer, root, full_every)


class IncrementalSaves:
    """A checkpointer whose saves under `root` reference the previous committed step (see module docstring)."""

    def __init__(self, checkpointer: Any, root: str, full_every: int) -> None:
        if type(full_every) is not int or full_every < 1:
            raise ValueError(f"full_every must be an int >= 1, got {full_every!r}")
        self._ckpt = checkpointer
        self._root = root.rstrip("/")
        self.full_every = full_every
        self._lock = threading.Lock()
        self.base: str | None = None  # the newest committed step directory of the current chain
        self._chain = 0  # saves committed in the chain, the full one included
        self._pending: tuple[str, Any] | None = (
            None  # an async save in flight: (step directory, write future)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ckpt, name)

    def save(self, state_dict: Any, path: Any, **kwargs: Any) -> Any:
        self._settle()
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        if parse_step_dir(name) is None or join(self._root, name) != str(path).rstrip("/"):
            self._restart()  # not a step of this run (the local tier's): the next durable save is whole
            return self._ckpt.save(state_dict, path, **kwargs)
        with self._lock:
            base = self.base if 0 < self._chain < self.full_every and not kwargs.get("overwrite") else None
            if base is None:
                self.base, self._chain = None, 0
        options = {"incremental": True, **({"base": join(self._root, base)} if base is not None else {})}
        try:
            result = self._ckpt.save(state_dict, path, **kwargs, **options)
        except BaseException:
            self._restart()
            raise
        if result is None:  # sync: committed
            self._committed(name)
        else:  # async: committed once its write future succeeded, checked at the next save
            self._pending = (name, result[1])
        return result

    def _settle(self) -> None:
        """The async save in flight, if finished: its step becomes the base, or the chain restarts.

        Checked here, in the caller's thread, rather than in a future callback, so the next save
        never starts from a base older than the step that just committed.
        """
        if self._pending is None:
            return
        name, future = self._pending
        if not future.done():
            self._restart()  # still writing: never a base; the next save is whole
            return
        self._pending = None
        if future.exception() is None:
            self._committed(name)
        else:
            self._restart()

    def _committed(self, name: str) -> None:
        with self._lock:
            self._chain = 1 if self.base is None else self._chain + 1
            self.base = name

    def _restart(self) -> None:
        with self._lock:
            self.base, self._chain = None, 0
