"""Staging that starts before the plan agreement, when this rank's plan is the one it staged last.

An async `save()` blocks training for the plan agreement (gloo round trips over the training
job's process group; the coordinator also checks the path and writes the in-progress marker)
and then for the copy of this rank's chunks. In steady state, saves of an unchanged state dict,
the agreement almost always confirms the previous plan, so the copy can start on the previous
layout as soon as this rank has described its state dict, and the agreement runs while the copy
does: training then waits for the longer of the two instead of their sum (issue 26, goal 4: the
agreement was about 5 ms of a 50 ms blocking time for 256 MiB per rank).

The guess is checked, never trusted: once the plan is agreed, the layout staged early must equal
the agreed one. If it does not (another rank's plan changed, so this rank's files did too), the
early copy is awaited and dropped and the rank stages again into the same buffer. Either way the
stage future returned to the caller is the one of the staging that is kept, completed only after
every copy of the tensors (the dropped one included) has finished, so training never changes
its tensors while any copy reads them. A failed agreement also waits for the early copy, so the
next save never finds the buffer still being written. Only a stager whose buffer already fits
the layout is asked to stage early: a new buffer is never allocated on a guess.
"""

from __future__ import annotations

import logging
from concurrent.futures import wait
from dataclasses import dataclass

from checkpoint.async_writer.staging import CheckpointStager, StagedSave, staging_layout
from checkpoint.save.local_plan import LocalSave
from planners.save_plan import FilePlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Early:
    files: tuple[FilePlan, ...]  # the previous save's files, which `staged.layout` packs
    staged: StagedSave


class EarlyStager:
    """Starts a save's staging before its plan is agreed, on the layout of the previous save."""

    def __init__(self, stager: CheckpointStager) -> None:
        self._stager = stager
        self._last: tuple[str, tuple[FilePlan, ...]] | None = None  # (plan fingerprint, files) last staged
        self._early: _Early | None = None
        self.hits = 0  # saves whose early staging was kept (tests read it)

    def start(self, local: LocalSave) -> None:
        """Stage `local` on the previous layout if this rank's plan did not change (the plan step's hook)."""
        self._early = None
        if self._last is None or local.fingerprint != self._last[0]:
            return
        try:
            layout = staging_layout(self._last[1], local.tensors)
            if not self._stager.fits(layout):
                return
            self._early = _Early(files=self._last[1], staged=self._stager.stage(local.tensors, layout))
        except Exception:  # the guess failed to start; the save stages after the agreement as before
            logger.debug("early staging did not start", exc_info=True)

    def take(self, files: tuple[FilePlan, ...]) -> StagedSave | None:
        """The early staging if it staged the agreed `files`; else None, after the early copy ended.

        Same plan (fingerprint) and same files give the same layout, so the agreed layout is not
        computed again on a kept guess (a reused plan hands back the very tuple remembered).
        """
        early, self._early = self._early, None
        if early is None:
            return None
        if early.files == files:
            self.hits += 1
            return early.staged
        wait([early.staged.future])  # its error, if any, belongs to a staging nobody keeps
        return None

    def drop(self) -> None:
        """The save failed before staging: wait for the early copy, so no copy outlives the save() call."""
        early, self._early = self._early, None
        if early is not None:
            wait([early.staged.future])

    def remember(self, local: LocalSave, files: tuple[FilePlan, ...]) -> None:
        """The plan and files this rank staged for the save that just started, for the next save's guess."""
        self._last = (local.fingerprint, files)
