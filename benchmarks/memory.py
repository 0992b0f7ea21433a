"""Peak resident memory of a trainer process and of the writer processes it started.

A background thread samples, every few milliseconds, the RSS of this
process and the summed RSS of the writer processes named for the current
window (shardsafe's and DCP's writers are children of the trainer; the
caller tells them apart by which appeared after which system's first save),
and keeps the peaks of the window. RSS counts a shared-memory page in every
process that touched it, so staging buffers shared by trainer and writer
appear in both figures; their sum is an upper bound on the memory used.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from types import TracebackType

import psutil

# Fine enough to catch a save's peak (saves take seconds); a sample reads two
# small /proc files, so the sampler costs well under 1% of a core.
SAMPLE_INTERVAL_SECS = 0.01
# Helper processes of multiprocessing that are no checkpoint writer.
_NOT_WRITERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _is_writer(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return not any(name in cmdline for name in _NOT_WRITERS)


class RssSampler:
    """Samples RSS in a thread; `window()` brackets one save and returns its peaks.

    Example:
        >>> with RssSampler() as sampler:
        ...     before = sampler.descendants()
        ...     ckpt.save(state, path)  # starts the writer process
        ...     writers = sampler.descendants() - before
        ...     with sampler.window(writers) as peaks:
        ...         ckpt.save(state, path2)
        >>> peaks.trainer_bytes, peaks.writers_bytes
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._peaks: Peaks | None = None
        self._thread = threading.Thread(target=self._loop, name="bench-rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rss(self) -> int:
        """This process's RSS now, in bytes."""
        return self._me.memory_info().rss

    def descendants(self) -> set[int]:
        """Pids of this process's descendants, multiprocessing's helper processes left out."""
        return {c.pid for c in self._me.children(recursive=True) if _is_writer(c)}

    def window(self, writer_pids: Collection[int] = ()) -> Peaks:
        """A context manager whose value holds the peaks seen while it was open.

        Args:
            writer_pids: the processes whose summed RSS is the writers' figure.
        """
        writers = []
        for pid in writer_pids:
            try:
                writers.append(psutil.Process(pid))
            except psutil.Error:  # gone already: it holds no memory
                pass
        return Peaks(self, writers)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_SECS):
            with self._lock:
                if self._peaks is not None:
                    self._peaks.sample()


class Peaks:
    """Peak trainer RSS and peak summed writer RSS within one window, in bytes."""

    def __init__(self, sampler: RssSampler, writers: list[psutil.Process]) -> None:
        self._sampler = sampler
        self._writers = writers
        self.start_bytes = 0
        self.trainer_bytes = 0
        self.writers_bytes = 0

    def sample(self) -> None:
        writers = 0
        for proc in self._writers:
            try:
                writers += proc.memory_info().rss
            except psutil.Error:  # exited: holds nothing any more
                pass
        self.trainer_bytes = max(self.trainer_bytes, self._sampler.rss())
        self.writers_bytes = max(self.writers_bytes, writers)

    def __enter__(self) -> Peaks:
        with self._sampler._lock:
            self.start_bytes = self._sampler.rss()
            self.sample()
            self._sampler._peaks = self
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._sampler._lock:
            self.sample()
            self._sampler._peaks = None
