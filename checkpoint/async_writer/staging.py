"""Staging: copying a rank's chunks off the training tensors into one reused shared buffer.

An async save blocks training only while this rank's chunks (exactly those the
global plan gives it to write, nothing else) are copied into host memory; the
writer process then streams them to storage from there. The copy lands in one
buffer per layout: an anonymous shared-memory file (`memfd_create`, so it never
appears in `/dev/shm`, is not bounded by that mount's size, and is freed by the
kernel when the last process holding it exits, even after a SIGKILL). The
writer process maps it once, through its file descriptor, and reads the chunks
without another copy or any pickling of tensor data. The buffer is allocated
on the first save and reused by every later save of the same size; one file
descriptor serves all of a rank's tensors.

On a CUDA machine the buffer is also page-locked (`cudaHostRegister`), and
device-to-host copies are issued non-blocking on a dedicated stream that first
waits for the producing (current) stream, so they see every pending update of
the training step; the stage future completes when an event recorded after the
copies fires. Without CUDA the same path copies on the CPU, in a background
thread when async staging is on.

Call order, all on the trainer rank: `staging_layout(files, tensors)`, then
`fits(layout)` (when False the caller lets the writer process unmap the old
buffer first, so at most one buffer exists), then `stage(tensors, layout)`,
once per save and only after the previous save's writer is done reading;
`close()` at the end.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import mmap
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from checkpoint.config import CheckpointStagerConfig
from planners.errors import CheckpointError, InvalidStateDictError
from planners.save_plan import FilePlan

logger = logging.getLogger(__name__)

# Offsets of tensors in the buffer are multiples of this: a cache line, more
# than any dtype's alignment, so every view is aligned and copies run at full speed.
ALIGN_BYTES = 64
# cudaHostRegisterPortable: the pages count as pinned for every CUDA context.
_CUDA_HOST_REGISTER_PORTABLE = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedTensor:
    """Where one chunk lies in the staging buffer (host memory), with the dtype and shape to view it.

    A position in the buffer, not in a shard file: the writer process streams it
    out later, and only then does the storage layer report where its bytes landed
    (`storage.safetensors_io.WrittenTensor`).
    """

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset_bytes: int
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StagingLayout:
    """The chunks a rank writes, in file order, packed into one buffer of `nbytes`."""

    tensors: tuple[StagedTensor, ...]
    nbytes: int

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each chunk as a tensor view into `buffer` (a flat uint8 tensor of at least `nbytes`)."""
        return {
            t.fqn: buffer[t.offset_bytes : t.offset_bytes + t.nbytes].view(t.dtype).view(t.shape)
            for t in self.tensors
        }


def staging_layout(files: Sequence[FilePlan], tensors: Mapping[str, torch.Tensor]) -> StagingLayout:
    """Pack the chunks named in `files` (this rank's part of the global plan) at aligned offsets."""
    staged = []
    offset = 0
    for item in (i for fp in files for i in fp.items):
        t = tensors[item.fqn]
        nbytes = t.numel() * t.element_size()
        staged.append(
            StagedTensor(
                fqn=item.fqn, dtype=t.dtype, shape=tuple(t.shape), offset_bytes=offset, nbytes=nbytes
            )
        )
        offset += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
    return StagingLayout(tensors=tuple(staged), nbytes=offset)


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedBuffer:
    """What the writer process needs to map a staging buffer: its descriptor and size."""

    buffer_id: int  # a new id per allocation, so the writer process knows when to map again
    fd: int | None  # None: not in shared memory, so no other process can read it
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedSave:
    """One save's staged chunks: in `buffer` per `layout` once `future` is done."""

    layout: StagingLayout
    buffer: SharedBuffer | None
    future: Future[None]

    @classmethod
    def failed(cls, layout: StagingLayout, error: BaseException) -> StagedSave:
        """A staging that raised before any copy: the save goes on only to report the error."""
        return cls(layout=layout, buffer=None, future=_finished(error))


class CheckpointStager(abc.ABC):
    """Copies a rank's chunks into host memory that the writer process can read.

    Call order (trainer rank): `fits(layout)`, then `stage(tensors, layout)` once per
    save, after the previous save's writer is done with the buffer; `close()` last.
    """

    @abc.abstractmethod
    def fits(self, layout: StagingLayout) -> bool:
        """Whether `stage(..., layout)` reuses the current buffer (False: it allocates a new one)."""

    @abc.abstractmethod
    def stage(self, tensors: Mapping[str, torch.Tensor], layout: StagingLayout) -> StagedSave:
        """Start copying the chunks of `layout` from `tensors`; they may change once the future is done."""

    @abc.abstractmethod
    def close(self) -> None:
        """Wait for running copies and release every buffer."""


class _Buffer:
    """One allocation: the flat uint8 tensor, and the shared file and pinning behind it."""

    def __init__(self, buffer_id: int, nbytes: int, *, shared: bool, pinned: bool) -> None:
        self.fd: int | None = None
        self._map: mmap.mmap | None = None
        self._registered = False
        if shared:
            self.fd = _anonymous_shared_fd(nbytes)
            # MAP_POPULATE sets up every page now, so the first copy does not fault page by page.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            try:
                self._map = mmap.mmap(self.fd, nbytes, flags=flags)
            except OSError as e:  # the descriptor would outlive this failed allocation otherwise
                os.close(self.fd)
                self.fd = None
                raise CheckpointError(
                    f"cannot map {nbytes} bytes of shared memory for staging this rank's chunks: {e}"
                ) from e
            self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        else:
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        if shared and pinned:
            code = int(
                torch.cuda.cudart().cudaHostRegister(
                    self.tensor.data_ptr(), nbytes, _CUDA_HOST_REGISTER_PORTABLE
                )
            )
            if code != 0:
                self.release()
                raise CheckpointError(
                    f"cudaHostRegister of a {nbytes}-byte staging buffer failed with CUDA error {code}"
                )
            self._registered = True
        self.handle = SharedBuffer(buffer_id=buffer_id, fd=self.fd, nbytes=nbytes)

    def release(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False
        del self.tensor
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: the GC unmaps it later
                self._map.close()
            self._map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _anonymous_shared_fd(nbytes: int) -> int:
    """A shared-memory file of `nbytes` with no name anywhere; its pages are reserved now.

    Reserving up front turns a shortage of memory into this clear error instead
    of a SIGBUS in the middle of a copy.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("shardsafe-staging", os.MFD_CLOEXEC)
    else:  # no memfd (macOS): an unlinked temporary file
        fd, name = tempfile.mkstemp(
            prefix="shardsafe-staging-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        os.unlink(name)
    try:
        os.ftruncate(fd, nbytes)
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        os.close(fd)
        raise CheckpointError(
            f"cannot reserve {nbytes} bytes of shared memory for staging this rank's chunks: {e}; "
            "free host memory or raise the memory limit of the job"
        ) from e
    return fd


def _finished(error: BaseException | None = None) -> Future[None]:
    future: Future[None] = Future()
    future.set_running_or_notify_cancel()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future


class DefaultStager(CheckpointStager):
    """Stages into one shared (and, with CUDA, pinned) buffer per layout, reused across saves.

    Attributes:
        allocations: buffers allocated so far (1 after any number of saves of one layout).

    Example:
        >>> stager = DefaultStager(CheckpointStagerConfig(use_async_staging=False))
        >>> layout = staging_layout(prepared.files, tensors)
        >>> staged = stager.stage(tensors, layout)
        >>> staged.future.result()  # the training may now change `tensors`
        >>> stager.close()

    Raises:
        ValueError: at construction, a CUDA-only option is True on a machine without CUDA.
    """

    def __init__(self, config: CheckpointStagerConfig | None = None) -> None:
        config = config or CheckpointStagerConfig()
        cuda = torch.cuda.is_available()
        for option in ("use_pinned_memory", "use_non_blocking_copy"):
            if getattr(config, option) and not cuda:
                raise ValueError(
                    f"CheckpointStagerConfig.{option}=True needs CUDA, which is not available here; "
                    "leave it None (on where CUDA is available) or set it to False"
                )
        self._pinned = cuda if config.use_pinned_memory is None else config.use_pinned_memory
        self._non_blocking = cuda if config.use_non_blocking_copy is None else config.use_non_blocking_copy
        self._shared = config.use_shared_memory
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardsafe-stage")
            if config.use_async_staging
            else None
        )
        self._streams: dict[torch.device, Any] = {}
        self._buffer: _Buffer | None = None
        self._views: tuple[StagingLayout, dict[str, torch.Tensor]] | None = None  # made once per layout
        self.allocations = 0

    @property
    def buffer(self) -> torch.Tensor | None:
        """The current staging buffer (flat uint8), or None before the first save."""
        return self._buffer.tensor if self._buffer is not None else None

    def fits(self, layout: StagingLayout) -> bool:
        return self._buffer is not None and self._buffer.handle.nbytes == _capacity(layout)

    def stage(self, tensors: Mapping[str, torch.Tensor], layout: StagingLayout) -> StagedSave:
        if not self.fits(layout):
            self._release()
            self._buffer = _Buffer(
                self.allocations, _capacity(layout), shared=self._shared, pinned=self._pinned
            )
            self.allocations += 1
            logger.debug(
                "allocated a %d-byte staging buffer (allocation %d)", _capacity(layout), self.allocations
            )
        if self._views is None or self._views[0] != layout:
            self._views = (layout, layout.views(self._buffer.tensor))
        pairs = []
        for dst, entry in zip(self._views[1].values(), layout.tensors, strict=True):
            src = tensors[entry.fqn]
            if src.dtype != dst.dtype or tuple(src.shape) != tuple(dst.shape):
                raise InvalidStateDictError(
                    f"key {entry.fqn!r}: tensor is {src.dtype} {list(src.shape)} but the staging layout "
                    f"expects {dst.dtype} {list(dst.shape)}; compute the layout from the same tensors"
                )
            pairs.append((dst, src))
        return StagedSave(layout=layout, buffer=self._buffer.handle, future=self._copy(pairs))

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Future[None]:
        on_host = [(d, s) for d, s in pairs if not s.is_cuda]
        on_cuda = [(d, s) for d, s in pairs if s.is_cuda]
        events = self._issue_cuda_copies(on_cuda) if self._non_blocking else []
        if not self._non_blocking:
            on_host += on_cuda  # blocking copies on the current stream

        def finish() -> None:
            for dst, src in on_host:
                dst.copy_(src)
            for event in events:
                event.synchronize()

        if self._executor is None:
            finish()
            return _finished()
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()  # staging cannot be cancelled once save() returned

        def run() -> None:
            try:
                finish()
                future.set_result(None)
            except Exception as e:
                logger.exception("staging copies failed")
                future.set_exception(e)

        self._executor.submit(run)
        return future

    def _issue_cuda_copies(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
        """Queue device-to-host copies on a staging stream per device; an event per device marks their end."""
        events = []
        for device in {s.device for _, s in pairs}:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            # The training step's kernels on the current stream produce these values: copy after them.
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for dst, src in ((d, s) for d, s in pairs if s.device == device):
                    dst.copy_(src, non_blocking=True)
                    # The caller may free `src` before the copy ran: keep its memory from reuse until then.
                    src.record_stream(stream)
                event = torch.cuda.Event()
                event.record(stream)
            events.append(event)
        return events

    def _release(self) -> None:
        self._views = None  # views keep the mapping alive: drop them first
        if self._buffer is not None:
            self._buffer.release()
            self._buffer = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._release()


def _capacity(layout: StagingLayout) -> int:
    return max(layout.nbytes, ALIGN_BYTES)  # a rank with nothing to write still maps a (tiny) buffer
