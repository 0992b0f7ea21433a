"""Async checkpointing: staging buffers, the writer process, the cross-rank commit, failures.

Multi-rank cases run on real gloo ranks (each with its own writer process); several
checks share one spawn because a spawn costs seconds here.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import select
import signal
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import checkpoint
from checkpoint import (
    CheckpointerConfig,
    CheckpointStagerConfig,
    DefaultStager,
    WriterHook,
)
from checkpoint.async_writer.staging import ALIGN_BYTES, staging_layout
from checkpoint.testing.ranks import run_ranks
from planners.errors import (
    DistributedCheckpointError,
    IncompleteCheckpointError,
    WriterProcessError,
)
from tests.dist_states import build_state, check_state
from tests.file_plans import one_file_plan

BIG_SHAPE = (1024, 2048)  # 8 MiB of float32: enough that a leaked copy per save would show in the RSS


def _expected_big(step: int) -> torch.Tensor:
    return torch.arange(BIG_SHAPE[0] * BIG_SHAPE[1], dtype=torch.float32).reshape(BIG_SHAPE) + step


def _big(world_size: int, step: int) -> DTensor:
    return distribute_tensor(_expected_big(step), init_device_mesh("cpu", (world_size,)), [Shard(0)])


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
    return int(kb) * 1024


def _shm_segments() -> list[str]:
    """/dev/shm entries but multiprocessing's semaphores (the tests' own Events, removed asynchronously)."""
    return sorted(n for n in os.listdir("/dev/shm") if not n.startswith("sem."))


# --- the stager on its own ------------------------------------------------------------------------


def test_stager_reuses_one_buffer_and_copies_the_values_of_the_moment() -> None:
    tensors = {
        "a": torch.arange(10, dtype=torch.float32),
        "b": torch.arange(6, dtype=torch.int64).reshape(2, 3)[:, ::2],
    }
    stager = DefaultStager(CheckpointStagerConfig(use_async_staging=True))
    try:
        layout = staging_layout(one_file_plan(tensors), tensors)
        assert [(t.fqn, t.offset_bytes, t.nbytes) for t in layout.tensors] == [
            ("a", 0, 40),
            ("b", ALIGN_BYTES, 32),
        ]
        pointers = []
        for step in range(3):
            staged = stager.stage(tensors, layout)
            staged.future.result(timeout=30)
            views = layout.views(stager.buffer)
            expected_a = torch.arange(10, dtype=torch.float32) + step
            tensors["a"].add_(1)  # the training moves on: the staged copy must not follow
            assert torch.equal(views["a"], expected_a)
            assert torch.equal(views["b"], torch.tensor([[0, 2], [3, 5]]))
            assert staged.buffer is not None and staged.buffer.fd is not None
            pointers.append(stager.buffer.data_ptr())
        assert stager.allocations == 1 and len(set(pointers)) == 1
        bigger = {**tensors, "c": torch.ones(100, dtype=torch.float32)}
        new_layout = staging_layout(one_file_plan(bigger), bigger)
        assert stager.fits(layout) and not stager.fits(new_layout)
        stager.stage(bigger, new_layout).future.result(timeout=30)
        assert stager.allocations == 2 and stager.buffer.numel() == new_layout.nbytes
        assert torch.equal(new_layout.views(stager.buffer)["c"], torch.ones(100))
    finally:
        stager.close()
    assert stager.buffer is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
@pytest.mark.parametrize("option", ["use_pinned_memory", "use_non_blocking_copy"])
def test_cuda_only_options_fail_clearly_without_cuda(option: str) -> None:
    with pytest.raises(ValueError, match=f"CheckpointStagerConfig.{option}=True needs CUDA"):
        DefaultStager(CheckpointStagerConfig(**{option: True}))


def test_async_checkpointer_needs_shared_memory_staging() -> None:
    config = CheckpointerConfig(staging_config=CheckpointStagerConfig(use_shared_memory=False))
    with pytest.raises(ValueError, match="use_shared_memory=False"):
        checkpoint.make_async_checkpointer(config)


# --- one rank, writer process in this test process ------------------------------------------------


class FailOnPath(WriterHook):
    """Raises in pre_commit for paths ending with `suffix` (runs in the writer process)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def pre_commit(self, path: str, **kwargs: object) -> None:
        if path.endswith(self.suffix):
            raise ValueError(f"refusing {os.path.basename(path)}")

    def post_commit(self, path: str, **kwargs: object) -> None:
        pass


def test_single_rank_failure_reaches_futures_then_close_releases_everything(tmp_path: Path) -> None:
    shm_before = _shm_segments()
    ckpt = checkpoint.make_async_checkpointer(commit_hook=FailOnPath("bad"))
    state = {"w": torch.arange(6, dtype=torch.float32), "step": 3}
    stage_future, write_future = ckpt.save(state, str(tmp_path / "good"))
    stage_future.result(timeout=30)
    state["w"].zero_()
    write_future.result(timeout=60)
    loaded = ckpt.load(str(tmp_path / "good"))
    assert torch.equal(loaded["w"], torch.arange(6, dtype=torch.float32)) and loaded["step"] == 3

    _, write_future = ckpt.save(state, str(tmp_path / "bad"))
    error = write_future.exception(timeout=60)
    assert type(error) is DistributedCheckpointError
    assert "pre_commit hook failed: ValueError: refusing bad" in str(error)
    assert isinstance(error.__cause__, WriterProcessError) and "DistributedCheckpointError" in str(
        error.__cause__
    )
    assert not (tmp_path / "bad").exists()  # the writer took back the failed save's files and directory
    with pytest.raises(FileNotFoundError, match="metadata.json not found") as missing:
        ckpt.load(str(tmp_path / "bad"))
    assert not isinstance(missing.value, IncompleteCheckpointError)

    with pytest.raises(
        WriterProcessError, match=r"previous async save to .*bad failed, so the save to .*again did not"
    ):
        ckpt.save(state, str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
    _, write_future = ckpt.save(state, str(tmp_path / "again"))
    write_future.result(timeout=60)
    assert torch.equal(ckpt.load(str(tmp_path / "again"))["w"], torch.zeros(6))

    pid = ckpt.checkpoint_process.pid
    assert pid is not None and os.path.exists(f"/proc/{pid}")
    ckpt.close()
    assert not os.path.exists(f"/proc/{pid}")
    assert ckpt.checkpoint_process.pid is None
    assert _shm_segments() == shm_before
    with pytest.raises(RuntimeError, match="AsyncCheckpointer is closed"):
        ckpt.save(state, str(tmp_path / "late"))


@pytest.mark.s3
def test_single_rank_async_save_to_s3(s3_endpoint, s3_bucket: str) -> None:
    config = CheckpointerConfig(storage_options=s3_endpoint.storage_options)
    with checkpoint.make_async_checkpointer(config) as ckpt:
        state = {"w": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "cfg": {"lr": 0.5}}
        _, write_future = ckpt.save(state, f"{s3_bucket}/step-1")
        write_future.result(timeout=60)
        loaded = ckpt.load(f"{s3_bucket}/step-1")
    assert torch.equal(loaded["w"], torch.arange(12, dtype=torch.bfloat16).reshape(3, 4))
    assert loaded["cfg"] == {"lr": 0.5}


# --- two and four gloo ranks ----------------------------------------------------------------------

LOOP_SAVES = 10


class BlockOnRank(WriterHook):
    """In `rank`'s writer process: signals `reached`, then blocks in pre_commit, for paths ending `suffix`."""

    def __init__(self, rank: int, suffix: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.rank, self.suffix = rank, suffix
        self.reached, self.never = ctx.Event(), ctx.Event()  # travel to the writer process when it is spawned

    def pre_commit(self, path: str, **kwargs: object) -> None:
        if kwargs["rank"] == self.rank and path.endswith(self.suffix):
            self.reached.set()
            self.never.wait()

    def post_commit(self, path: str, **kwargs: object) -> None:
        pass


def _two_ranks(rank: int, world_size: int, root: str) -> dict:
    """Round trip, sync twin, ten saves in a row, then rank 1's writer is killed mid-save (tests below)."""
    hook = BlockOnRank(1, "killed")
    ckpt = checkpoint.make_async_checkpointer(commit_hook=hook)
    out = {}
    state = build_state("row", world_size)
    state["big"] = _big(world_size, 0)
    stage_future, write_future = ckpt.save(state, f"{root}/async")
    stage_future.result(timeout=60)
    for t in (
        state["model"]["w"],
        state["model"]["b"],
        state["ints"][0],
        state["nested"]["x.y"],
        state["big"],
    ):
        t.to_local().fill_(-1)  # right after staging: the checkpoint must keep the values of save()
    state["scalar"].fill_(-1)
    write_future.result(timeout=120)

    sync = checkpoint.make_sync_checkpointer()
    reference = build_state("row", world_size)
    reference["big"] = _big(world_size, 0)
    sync.save(reference, f"{root}/sync")
    sync.close()

    process, stager = ckpt.checkpoint_process, ckpt.checkpoint_stager
    pointers, out["rss"], out["store_keys"] = [], [], []
    for step in range(1, LOOP_SAVES + 1):
        state["big"].to_local().copy_(_expected_big(step).chunk(world_size)[rank])
        stage_future, write_future = ckpt.save(state, f"{root}/loop", overwrite=True)
        stage_future.result(timeout=60)
        write_future.result(timeout=120)
        pointers.append(stager.buffer.data_ptr())
        out["rss"].append(_rss_bytes(process.pid))
        if rank == 0:
            out["store_keys"].append(process._store.num_keys())  # keys of finished saves are deleted
    out["allocations"], out["pointers"] = stager.allocations, len(set(pointers))

    _, write_future = ckpt.save(state, f"{root}/killed")
    old_pid = process.pid
    if rank == 1:
        assert hook.reached.wait(timeout=60)  # shard files written, commit not yet begun
        os.kill(old_pid, signal.SIGKILL)
    start = time.monotonic()
    error = write_future.exception(timeout=60)
    out["waited"] = time.monotonic() - start
    out["error"], out["message"] = type(error).__name__, str(error)
    # Both ranks took back their files (rank 1's trainer stood in for its dead writer): nothing is left.
    out["killed_left"] = os.path.exists(f"{root}/killed")
    loaded = ckpt.load(f"{root}/loop")  # the previous checkpoint still loads
    assert torch.equal(loaded["big"], _expected_big(LOOP_SAVES))

    with pytest.raises(WriterProcessError, match="previous async save to .*killed failed"):
        ckpt.save(state, f"{root}/after")
    _, write_future = ckpt.save(state, f"{root}/after")
    write_future.result(timeout=120)
    assert torch.equal(ckpt.load(f"{root}/after")["big"], _expected_big(LOOP_SAVES))
    out["restarted"] = process.pid != old_pid
    ckpt.close()
    return out


def _shard_bytes(directory: Path) -> tuple[str, dict[str, bytes]]:
    """The metadata and shard files with the save id replaced, so two saves can be compared byte for byte."""
    meta = (directory / "metadata.json").read_text()
    save_id = re.search(r'"save_id":\s*"([0-9a-f]+)"', meta).group(1)
    files = {
        p.name.replace(save_id, "ID"): p.read_bytes().replace(save_id.encode(), b"ID")
        for p in sorted(directory.glob("shard-*.safetensors"))
    }
    # The digest covers the save id too, so it differs between saves; loads check it.
    meta = re.sub(r'"digest":\s*"sha256:[0-9a-f]{64}",', "", meta)
    return meta.replace(save_id, "ID"), files


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("async2")
    return root, run_ranks(_two_ranks, 2, str(root), timeout_secs=240)


def test_two_ranks_async_equals_sync_byte_for_byte(two_ranks: tuple[Path, list[dict]]) -> None:
    root, _ = two_ranks
    async_meta, async_files = _shard_bytes(root / "async")
    sync_meta, sync_files = _shard_bytes(root / "sync")
    assert len(async_files) == 2 and sorted(async_files) == sorted(sync_files)
    assert async_files == sync_files
    assert async_meta == sync_meta


def test_two_ranks_checkpoint_holds_values_of_save_time(two_ranks: tuple[Path, list[dict]]) -> None:
    root, _ = two_ranks
    with checkpoint.make_sync_checkpointer() as ckpt:
        loaded = ckpt.load(str(root / "async"))
        check_state(loaded)
        assert torch.equal(loaded["big"], _expected_big(0))
        assert torch.equal(ckpt.load(str(root / "loop"))["big"], _expected_big(LOOP_SAVES))


def test_ten_saves_reuse_buffers_and_writer_memory_stays_flat(two_ranks: tuple[Path, list[dict]]) -> None:
    _, results = two_ranks
    for r in results:
        assert r["allocations"] == 1 and r["pointers"] == 1
        assert r["rss"][-1] - r["rss"][1] < 4 * 1024 * 1024, r[
            "rss"
        ]  # a leaked 4 MiB shard per save would show
    keys = results[0]["store_keys"]
    assert len(keys) == LOOP_SAVES and len(set(keys[1:])) == 1, keys


def test_writer_killed_mid_save_fails_every_rank_promptly_and_restarts(
    two_ranks: tuple[Path, list[dict]],
) -> None:
    rank0, rank1 = two_ranks[1]
    assert rank1["error"] == "WriterProcessError"
    assert re.search(
        r"writer process of rank 1 \(pid \d+\) died from signal SIGKILL while writing", rank1["message"]
    )
    # Rank 1's trainer commits in its dead writer's place: the coordinator fails at once, not at its timeout.
    assert rank0["error"] == "DistributedCheckpointError"
    assert "rank 1: WriterProcessError: writer process of rank 1" in rank0["message"]
    assert rank0["waited"] < 20.0 and rank1["waited"] < 20.0  # far below the 600 s barrier timeout
    assert rank1["restarted"] is True and rank0["restarted"] is False
    assert rank0["killed_left"] is False  # the coordinator removed the directory once both ranks had cleaned


def _four_ranks(rank: int, world_size: int, root: str) -> int:
    ckpt = checkpoint.make_async_checkpointer()
    _, write_future = ckpt.save(build_state("grid", world_size), f"{root}/ws4")
    write_future.result(timeout=120)
    return ckpt.checkpoint_process.pid  # not closed: the writer process must go when this rank exits


def _exits_within(pid: int, timeout_secs: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout_secs)[0])
    finally:
        os.close(fd)


def test_four_ranks_save_async_then_load_on_one(tmp_path: Path) -> None:
    root = tmp_path
    shm_before = _shm_segments()
    pids = run_ranks(_four_ranks, 4, str(root), timeout_secs=240)
    assert [_exits_within(pid, 30) for pid in pids] == [True] * 4
    assert _shm_segments() == shm_before
    with checkpoint.make_sync_checkpointer() as ckpt:
        check_state(ckpt.load(str(root / "ws4")))  # 4 -> 1 rank; the 2-rank one was loaded on 1 above


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_staging_is_ordered_after_pending_work_and_pinned(tmp_path: Path) -> None:
    stager = DefaultStager()  # pinned + non-blocking copies on a staging stream where CUDA is available
    try:
        t = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
        torch.cuda.synchronize()
        t.mul_(2)  # still queued on the current stream when staging starts: the copy must see it
        tensors = {"t": t}
        layout = staging_layout(one_file_plan(tensors), tensors)
        staged = stager.stage(tensors, layout)
        staged.future.result(timeout=60)
        t.fill_(-1)
        assert stager.buffer.is_pinned()
        assert torch.equal(layout.views(stager.buffer)["t"], torch.arange(1 << 20, dtype=torch.float32) * 2)
    finally:
        stager.close()
    with checkpoint.make_async_checkpointer() as ckpt:
        state = {"w": torch.arange(8, dtype=torch.bfloat16, device="cuda")}
        stage_future, write_future = ckpt.save(state, str(tmp_path / "gpu"))
        stage_future.result(timeout=60)
        state["w"].zero_()
        write_future.result(timeout=60)
        assert torch.equal(ckpt.load(str(tmp_path / "gpu"))["w"], torch.arange(8, dtype=torch.bfloat16))
