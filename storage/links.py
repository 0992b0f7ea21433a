"""Reading through a symbolic link only when it stays inside a given directory (Hugging Face caches).

A Hugging Face cache snapshot is a folder of links into the repository's `blobs/`. shardsafe's own
checkpoints follow no link (`READ_FLAGS` carries `O_NOFOLLOW`), but such a snapshot must be readable,
so `LocalStorage(links_within=...)` follows a link only to a file inside that directory, checking
where the opened descriptor really points after opening.
"""

from __future__ import annotations

import os

from planners.errors import InvalidCheckpointError

# Reads never follow a link at the file's own name and never block on a FIFO.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def open_link_within(path: str, root: str) -> int:
    """Open the file the link `path` leads to, if that file lies inside `root` (both resolved).

    The link is resolved first and refused if it leaves `root`; the target is then opened without
    following a link at its own name, and where the descriptor really points is checked again after
    opening (a directory on the way swapped for a link in between would show there). The caller's
    `fstat` then refuses anything but a regular file.

    Raises:
        FileNotFoundError: the link dangles (an incomplete download).
        InvalidCheckpointError: the link leaves `root`, or loops.
    """
    target = os.path.realpath(path)
    if not _inside(target, root):
        raise InvalidCheckpointError(
            f"{path}: is a symbolic link to {target}, outside {root}; only links to files inside the same "
            "cache repository are followed"
        )
    try:
        fd = os.open(target, READ_FLAGS)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: is a symbolic link to {target}, which does not exist") from None
    except OSError as e:
        raise InvalidCheckpointError(
            f"{path}: the symbolic link cannot be followed: {e.strerror or e}"
        ) from e
    opened = _opened_path(fd, target)
    if not _inside(opened, root):
        os.close(fd)
        raise InvalidCheckpointError(f"{path}: the opened file {opened} lies outside {root}; it was replaced")
    return fd


def _opened_path(fd: int, fallback: str) -> str:
    """Where descriptor `fd` points (Linux: /proc/self/fd), or `fallback` where that cannot be read."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback
