"""What one benchmark run does: sizes, world sizes, repeats, where files go.

Built once by `benchmarks.run` from the command line and pickled into every
rank, so all ranks and all scenarios of a run agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.state import StateSpec

MiB = 1024**2


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    """One run of the benchmark.

    Attributes:
        spec: the big state dict (size, tensor count, dtype, device).
        root: scratch directory on the disk under test; checkpoints are written and deleted there.
        save_world_size: ranks that save (and hold the training state).
        load_world_sizes: ranks that load each saved checkpoint, in fresh processes (a restart).
        repeats: measured runs of every figure (steady state: after one unmeasured first save).
        memory_repeats: saves sampled for peak RSS, per system.
        small_tensors: tensors of the planning scenario's state dict.
        planning_repeats: measured runs of the planning scenario.
        cold_cache: evict the checkpoint's files from the page cache before every load, so a
            load reads the disk (as a restart on another node does), not memory.
        timeout_secs: deadline of each spawn of ranks.
    """

    spec: StateSpec
    root: str
    save_world_size: int = 2
    load_world_sizes: tuple[int, ...] = (2, 3, 1)
    repeats: int = 5
    memory_repeats: int = 3
    small_tensors: int = 10_000
    planning_repeats: int = 3
    cold_cache: bool = True
    timeout_secs: float = 1200.0

    def __post_init__(self) -> None:
        for name in ("save_world_size", "repeats", "memory_repeats", "small_tensors", "planning_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.load_world_sizes or min(self.load_world_sizes) < 1:
            raise ValueError(
                f"BenchConfig.load_world_sizes must be world sizes >= 1, got {self.load_world_sizes}"
            )
