"""Which files at a checkpoint path are leftovers: written by a save that is not the committed one.

A save writes its shard files under names that carry its save id (`SHARD_FILE_RE`) and commits by publishing
`metadata.json` last, through a temporary `.metadata.json.tmp-*` file on backends without an atomic
no-replace write. So after a crash, an overwrite or a lost commit race, the path may hold shard files of other
saves and temporary metadata files. The commit's cleanup (checkpoint/save/commit.py) deletes them and `verify`
(checkpoint/tools/verify.py) reports them; both decide what is a leftover here, with the same rule: only names
shardsafe itself writes are ever candidates, so a user's own files at the path are never touched.

Which save ids to keep is the caller's decision: `verify` keeps the committed save only; the commit's cleanup
also keeps every save that holds a live in-progress marker (checkpoint/save/lease.py), since that save may still
commit. Pure: names in, names out.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

from planners.metadata import METADATA_FILE, SHARD_FILE_RE

# Prefix of the temporary file a non-atomic publish writes before renaming it to metadata.json.
METADATA_TEMP_PREFIX = f".{METADATA_FILE}.tmp-"


def leftover_names(names: Iterable[str], *, keep: Container[str]) -> list[str]:
    """The names among `names` that are shard files of a save not in `keep`, or temporary metadata files.

    Args:
        names: file names at the checkpoint path (relative, as `list_names` returns them).
        keep: save ids whose shard files are not leftovers (the committed save; saves still in progress).

    Returns:
        The leftover names, in the order of `names`.

    Example:
        >>> leftover_names(["metadata.json", "shard-0a0a0a0a-r00000-000.safetensors"], keep={"1b1b1b1b"})
        ['shard-0a0a0a0a-r00000-000.safetensors']
    """
    return [
        n
        for n in names
        if (m := SHARD_FILE_RE.fullmatch(n))
        and m["save_id"] not in keep
        or n.startswith(METADATA_TEMP_PREFIX)
    ]
