"""What `shardsafe ls` says about a directory that holds no `step-N` directories.

`ls` lists a run: the root `CheckpointManager` saves `step-N` directories
under. Pointed at something else it used to print "no step directories" and
exit 0, which reads as "this run is empty" even when the directory is one
checkpoint (a step directory, a Lightning `epoch=..-step=...ckpt` directory),
a DCP checkpoint, or a folder of checkpoints named otherwise (Lightning's
`checkpoints/`). This module tells those apart from what is on storage and
returns the sentence that says what the directory is and which command fits.
A directory with none of these is an empty run, as before.
"""

from __future__ import annotations

from typing import Any

from checkpoint.load.loader import read_metadata
from planners.metadata import METADATA_FILE
from storage.spec import StorageSpec

# torch.distributed.checkpoint's metadata file (see checkpoint.tools.dcp_import).
DCP_METADATA_FILE = ".metadata"
# Subdirectories probed for a metadata.json: a remote listing of a large folder stays a few requests.
MAX_DIRS_PROBED = 64
# Checkpoint names shown before "... (N in all)".
MAX_NAMES_SHOWN = 5
# Top-level keys only a checkpoint saved through Lightning has (strategy and CheckpointIO plugin).
_LIGHTNING_KEYS = ("lightning", "pytorch-lightning_version")


def explain_not_a_run(spec: StorageSpec, root: str) -> str | None:
    """The reason `root` (holding no step directories) is not a run, or None for an empty run."""
    storage = spec.open()
    try:
        names = storage.list_names()
        if METADATA_FILE in names:
            return _one_checkpoint(storage, root)
        if DCP_METADATA_FILE in names:
            return (
                f"{root} is a torch.distributed.checkpoint (DCP) checkpoint, not a run: "
                f"`shardsafe import-dcp {root} NEW_DIR` converts it"
            )
        found = [n for n in sorted(names)[:MAX_DIRS_PROBED] if storage.exists(f"{n}/{METADATA_FILE}")]
    finally:
        storage.close()
    if not found:
        return None
    shown = ", ".join(found[:MAX_NAMES_SHOWN])
    more = f", ... ({len(found)} in all)" if len(found) > MAX_NAMES_SHOWN else ""
    return (
        f"{root} holds no step-N directories but {len(found)} checkpoint(s) named otherwise ({shown}{more}): "
        f"`shardsafe ls` lists runs saved by CheckpointManager; see one with "
        f"`shardsafe inspect {root.rstrip('/')}/{found[0]}`"
    )


def _one_checkpoint(storage: Any, root: str) -> str:
    """`root` is itself a checkpoint: say which kind, and where its run would be."""
    kind = "a checkpoint"
    try:
        structure = read_metadata(storage).structure
        keys = {k for k, _ in structure.get("dict", [])} if isinstance(structure, dict) else set()
    except Exception:  # unreadable metadata: `inspect`/`verify` report why; here only the kind is at stake
        keys = set()
    if keys & set(_LIGHTNING_KEYS):
        kind = "a Lightning checkpoint"
    parent = root.rstrip("/").rpartition("/")[0] or "."
    return (
        f"{root} is {kind} (it holds {METADATA_FILE}), not a run: `shardsafe inspect {root}` shows it, "
        f"`shardsafe verify {root}` checks it; if it is a step of a run, `shardsafe ls {parent}` lists the run"
    )
