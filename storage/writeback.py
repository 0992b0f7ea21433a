"""Starting the disk's writeback of a shard file while the rest of it is still being written.

A save is durable only after `fdatasync`, and the kernel starts writing a file's dirty pages to the
disk only when it must (dirty ratios, timers); a save that hands the kernel 256 MiB and then calls
`fdatasync` waits for all of it at once, with the disk idle while the bytes were copied and
checksummed. `sync_file_range(SYNC_FILE_RANGE_WRITE)` on each finished stretch of the file starts
that writeback at once and returns without waiting, so the disk writes while the next stretch is
prepared and the final `fdatasync` only waits for the tail. Durability still comes from that
`fdatasync` alone (sync_file_range flushes neither metadata nor the disk's cache). Measured on this
project's 2-core VM (ext4): a 256 MiB file written in 16 MiB pieces and synced took 0.23-0.37 s
plainly and 0.09-0.14 s with a kick every 16 MiB (`dd conv=fdatasync` of the same bytes: 0.23-0.45 s).

Linux only (the call exists since 2.6.17); elsewhere, or when libc lacks it, `Writeback` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Start writeback each time this many bytes were written since the last start: large enough that the
# disk gets long sequential writes, small enough that it starts early.
WRITEBACK_STEP_BYTES = 16 * 1024 * 1024
# sync_file_range flag: start writing the range's dirty pages, do not wait for them (linux/fs.h).
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[..., int] | None:
    """libc's sync_file_range, or None where the platform or its libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Start (not wait for) the writeback of bytes [offset, offset + nbytes) of `fd`; False where unsupported."""
    if _sync_file_range is None:
        return False
    if _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE):
        logger.debug("sync_file_range failed (errno %d); the final fdatasync still syncs", ctypes.get_errno())
        return False
    return True


class Writeback:
    """Tracks how much of one file was written and starts writeback of each new `step_bytes` stretch.

    Call `written(total_bytes)` after each write; it never raises (a failed start is only a lost
    optimisation: the final fdatasync reports any real I/O error). `start` is `start_writeback`
    unless a test records the calls.
    """

    def __init__(
        self,
        fd: int,
        *,
        step_bytes: int = WRITEBACK_STEP_BYTES,
        start: Callable[[int, int, int], bool] = start_writeback,
    ) -> None:
        self._fd = fd
        self._step = step_bytes
        self._start = start
        self._started = 0  # bytes [0, _started) have had their writeback started

    def written(self, total_bytes: int) -> None:
        if total_bytes - self._started < self._step:
            return
        self._start(self._fd, self._started, total_bytes - self._started)
        self._started = total_bytes
