"""What the benchmark's ranks run: one function per spawn of ranks.

- `save_side`, on the saving ranks: async blocking time (steady state, and
  the first save), durable save time (sync, and async end to end) beside a
  plain copy of the rank's bytes and a `dd` write with fdatasync of as many
  bytes, peak memory during those saves, then planning time for many small
  tensors.
- `load_side`, in fresh ranks of each load world size (a restart): load
  time, and the bytes read from the disk against the bytes the target needs.

Memory rides along with the save runs: an RSS sampler brackets every save.
Each system's first saves run one system after the other, so the trainer
memory each one keeps (staging buffers) and its writer processes are told
apart; in the steady state a save's trainer figure is what the system keeps
plus the save's transient peak, and the writers' figure is the summed RSS
of that system's writer processes.

Every sample is taken after a barrier and is the slowest rank's time: a
training step waits for its slowest rank. The systems alternate which goes
first from one run to the next, so neither always meets a warmer cache.
Each function returns `{(scenario, metric, system, unit): [samples]}`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.config import BenchConfig
from benchmarks.memory import Peaks, RssSampler
from benchmarks.peers import TCKPT_FSYNC
from benchmarks.state import build_state, check_state, local_nbytes, small_tensor_state
from benchmarks.stats import OURS
from benchmarks.systems import make_systems

Key = tuple[str, str, str, str]
Sysm = Any  # OursSystem, DcpSystem or peers.TorchCheckpointingSystem
COPY = "memcpy"
# shardsafe loading with verify=False: the reference of the verification cost.
UNVERIFIED = "shardsafe verify=False"
RAW_WRITE = "dd"
# Block size of the raw write, as one would pass to dd for a disk test.
_RAW_WRITE_BLOCK_BYTES = 16 * 1024 * 1024


class Recorder:
    """Collects samples by (scenario, metric, system, unit)."""

    def __init__(self) -> None:
        self.values: dict[Key, list[float]] = defaultdict(list)

    def add(self, scenario: str, metric: str, system: str, unit: str, value: float) -> None:
        self.values[(scenario, metric, system, unit)].append(float(value))


def _reduce(value: float, op: dist.ReduceOp) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t.item())


def slowest(value: float) -> float:
    return _reduce(value, dist.ReduceOp.MAX)


def summed(value: float) -> float:
    return _reduce(value, dist.ReduceOp.SUM)


def synced(fn: Callable[[], object]) -> float:
    """Seconds `fn` takes on the slowest rank, all ranks starting together."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - start)


def _remove(paths: Sequence[str]) -> None:
    """Rank 0 deletes finished checkpoints (keeps the disk from filling); all ranks wait for it."""
    dist.barrier()
    if dist.get_rank() == 0:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Kept:
    """What a system keeps after its first saves: its writer processes and the trainer memory it holds."""

    writers: set[int]
    held_bytes: float

    def added(self, peaks: Peaks) -> float:
        """Trainer memory this system adds during a save: what it holds plus the save's transient peak."""
        return self.held_bytes + peaks.trainer_bytes - peaks.start_bytes


class _CopyReference:
    """One plain copy of the rank's local shards into buffers allocated beforehand.

    That is the least any staging can cost: the steady-state floor of an async save's blocking time.
    On GPU the buffers are pinned and the copies are device-to-host, non-blocking, then synchronised.
    """

    def __init__(self, state: dict) -> None:
        self._src = [t.to_local() for t in state["model"].values()]
        self._cuda = self._src[0].device.type == "cuda"
        self._dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=self._cuda) for t in self._src]

    def run(self) -> None:
        for dst, src in zip(self._dst, self._src, strict=True):
            dst.copy_(src, non_blocking=self._cuda)
        if self._cuda:
            torch.cuda.synchronize()


def _raw_write(root: str, rank: int, nbytes: int) -> float:
    """Seconds for the slowest rank to write and fdatasync `nbytes` to a file of its own (dd)."""
    os.makedirs(f"{root}/raw", exist_ok=True)
    path = f"{root}/raw/rank{rank}.bin"
    dd = shutil.which("dd")
    dist.barrier()
    start = time.perf_counter()
    if dd is not None:
        subprocess.run(
            [
                dd,
                "if=/dev/zero",
                f"of={path}",
                f"bs={_RAW_WRITE_BLOCK_BYTES}",
                f"count={nbytes}",
                "iflag=count_bytes",
                "conv=fdatasync",
                "status=none",
            ],
            check=True,
        )
    else:
        block = bytes(_RAW_WRITE_BLOCK_BYTES)
        with open(path, "wb", buffering=0) as f:
            for offset in range(0, nbytes, len(block)):
                f.write(block[: min(len(block), nbytes - offset)])
            os.fdatasync(f.fileno())
    seconds = slowest(time.perf_counter() - start)
    os.unlink(path)
    return seconds


def _settle() -> None:
    """Untimed, between measurements: write back what the previous one left dirty in the page cache.

    torch-checkpointing never fsyncs, so its saves leave about 1 GiB dirty per run; the kernel
    wrote it back during whichever save came next, which made that system's figures depend on
    the order (in the 2026-12-07 00:10 run shardsafe's sync saves took 0.22-0.29 s after `dd`
    and 0.54-0.61 s after the peers, the order alternating run by run). Each measurement now
    starts with no other system's writes pending.
    """
    os.sync()
    dist.barrier()


def save_side(rank: int, world_size: int, cfg: BenchConfig) -> dict[Key, list[float]]:
    """The save scenarios, both systems in these ranks; keeps one checkpoint of each for the loads."""
    mesh = init_device_mesh(cfg.spec.device, (world_size,))
    state = build_state(cfg.spec, mesh)
    systems = make_systems(cfg.spec.device)
    rec = Recorder()
    rec.add("info", "rank_bytes", "-", "bytes", slowest(local_nbytes(state)))
    try:
        with RssSampler() as sampler:
            rec.add("info", "trainer_baseline_bytes", "-", "bytes", slowest(sampler.rss()))
            # One system after the other, so the memory each one keeps is told apart.
            kept = {system.name: _first_saves(cfg, state, system, sampler, rec) for system in systems}
            _measure_saves(rank, cfg, state, systems, rec, sampler, kept)
        for system in systems:  # the checkpoints the load scenario reads, from the saving world size
            system.save(state, f"{cfg.root}/ckpt/{system.name}")
        del state
        _measure_planning(cfg, small_tensor_state(cfg.small_tensors, mesh), systems, rec)
    finally:
        for system in systems:
            system.close()
    return dict(rec.values)


def _first_saves(cfg: BenchConfig, state: dict, system: Sysm, sampler: RssSampler, rec: Recorder) -> _Kept:
    """A system's first sync and first async save; what they leave behind: writer processes, trainer memory."""
    _settle()
    rss, pids = sampler.rss(), sampler.descendants()
    sync_path, async_path = (
        f"{cfg.root}/save/{system.name}-first-sync",
        f"{cfg.root}/save/{system.name}-first-async",
    )
    rec.add("durable_save", "first_sync_s", system.name, "s", synced(partial(system.save, state, sync_path)))
    writers: set[int] = set()
    if system.async_missing is None:
        dist.barrier()
        blocked, committed = system.async_save(state, async_path)
        rec.add("async_blocking", "first_block_s", system.name, "s", slowest(blocked))
        rec.add("durable_save", "first_async_s", system.name, "s", slowest(committed))
        writers = sampler.descendants() - pids
    held = slowest(sampler.rss() - rss)
    rec.add("memory", "trainer_held_bytes", system.name, "bytes", held)
    _remove([sync_path, async_path])
    return _Kept(writers=writers, held_bytes=held)


def _measure_saves(
    rank: int,
    cfg: BenchConfig,
    state: dict,
    systems: list[Sysm],
    rec: Recorder,
    sampler: RssSampler,
    kept: dict[str, _Kept],
) -> None:
    """Steady state: `cfg.repeats` runs of every system's async and sync save, and the references.

    The references sit in shardsafe's slot: the plain copy just before and just after its async
    save (their mean: the copy's own time drifts by up to 2x between runs on the shared cores),
    the `dd` write right before its sync save. This VM's disk slows down after a few GB of writes (a
    burst allowance: 256 MiB took 0.25 s from `dd` at the start of a run and 1 s after 4 GB), so a
    reference taken at the start of each run, before every system wrote, flattered the reference:
    shardsafe's sync saves took 0.22 s when its turn came first and 1.1-1.2 s when it came last.
    """
    copy = _CopyReference(state)
    nbytes = local_nbytes(state)
    for i in range(cfg.repeats):
        paths = []
        for system in systems if i % 2 == 0 else systems[::-1]:
            _settle()
            mine = kept[system.name]
            before = synced(copy.run) if system.name == OURS else 0.0
            if system.async_missing is None:
                path = f"{cfg.root}/save/{system.name}-async-{i}"
                dist.barrier()
                with sampler.window(mine.writers) as peaks:
                    blocked, committed = system.async_save(state, path)
                rec.add("async_blocking", "block_s", system.name, "s", slowest(blocked))
                rec.add("durable_save", "async_s", system.name, "s", slowest(committed))
                rec.add("memory", "async_trainer_bytes", system.name, "bytes", slowest(mine.added(peaks)))
                rec.add("memory", "async_writers_bytes", system.name, "bytes", slowest(peaks.writers_bytes))
                paths.append(path)
            if system.name == OURS:  # the copy's mean of just before and just after the async save
                rec.add("async_blocking", "block_s", COPY, "s", (before + synced(copy.run)) / 2)
                _settle()
                rec.add("durable_save", "sync_s", RAW_WRITE, "s", _raw_write(cfg.root, rank, nbytes))
                _settle()
            path = f"{cfg.root}/save/{system.name}-sync-{i}"
            with sampler.window() as peaks:
                seconds = synced(partial(system.save, state, path))
            rec.add("durable_save", "sync_s", system.name, "s", seconds)
            rec.add("memory", "sync_trainer_bytes", system.name, "bytes", slowest(mine.added(peaks)))
            paths.append(path)
        _remove(paths)


def _measure_planning(cfg: BenchConfig, small: dict, systems: list, rec: Recorder) -> None:
    for system in systems:  # warm the caches that a repeated save reuses
        system.repeat_save(small, f"{cfg.root}/plan/{system.name}-warm")
    _remove([f"{cfg.root}/plan"])
    for i in range(cfg.planning_repeats):
        for system in systems if i % 2 == 0 else systems[::-1]:
            first = f"{cfg.root}/plan/{system.name}-first-{i}"
            repeat = f"{cfg.root}/plan/{system.name}-repeat-{i}"
            rec.add(
                "planning", "first_save_s", system.name, "s", synced(partial(system.first_save, small, first))
            )
            rec.add(
                "planning",
                "repeat_save_s",
                system.name,
                "s",
                synced(partial(system.repeat_save, small, repeat)),
            )
        _remove([f"{cfg.root}/plan"])


def _read_bytes() -> int:
    """Bytes this process (all its threads) caused to be fetched from the block device, readahead included."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["read_bytes"])


def _evict(path: str) -> None:
    """Drop a checkpoint's (clean, fsync'd) pages from the page cache, so the next load reads the disk."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_side(rank: int, world_size: int, cfg: BenchConfig) -> dict[Key, list[float]]:
    """Load every system's checkpoint into targets of this world size; the last load of each is checked.

    Each run loads cold (page cache evicted, unless `cfg.cold_cache` is off) and then again warm into
    the same target; shardsafe also loads warm with `verify=False`, right after its verified warm load,
    so the cost of verification is a ratio of the same run.
    """
    mesh = init_device_mesh(cfg.spec.device, (world_size,))
    systems = [
        s
        for s in make_systems(cfg.spec.device)
        if s.name != TCKPT_FSYNC and s.load_missing(cfg.save_world_size, world_size) is None
    ]  # torch-checkpointing+fsync reads as torch-checkpointing does
    rec = Recorder()
    tag = f"ws{cfg.save_world_size}to{world_size}"
    try:
        for i in range(cfg.repeats):
            for system in systems if i % 2 == 0 else systems[::-1]:
                target = build_state(cfg.spec, mesh, zeros=True)
                path = f"{cfg.root}/ckpt/{system.name}"
                if cfg.cold_cache and rank == 0:
                    _evict(path)
                dist.barrier()
                before = _read_bytes()
                seconds = synced(partial(system.load, path, target))
                rec.add("load", f"{tag}_s", system.name, "s", seconds)
                rec.add("load", f"{tag}_read_bytes", system.name, "bytes", summed(_read_bytes() - before))
                rec.add("load", f"{tag}_needed_bytes", system.name, "bytes", summed(local_nbytes(target)))
                rec.add("load", f"{tag}_warm_s", system.name, "s", synced(partial(system.load, path, target)))
                if system.name == OURS:
                    unverified = partial(system.load, path, target, verify=False)
                    rec.add("load", f"{tag}_warm_s", UNVERIFIED, "s", synced(unverified))
                if i == cfg.repeats - 1:
                    check_state(
                        cfg.spec, target, mesh, what=f"{system.name} load of {path} on {world_size} ranks"
                    )
    finally:
        for system in systems:
            system.close()
    return dict(rec.values)
