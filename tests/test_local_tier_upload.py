"""A durable save at a step the local tier holds: uploaded from the local files, never staged twice.

Two gloo ranks play two nodes (each its own `GROUP_RANK`, `local_root` and
tier server), save a sharded DTensor every step locally and every second
step durably, and the durable steps must be the local ones byte for byte
(same metadata, so same save id: no second staging), pass `verify`, and load
exactly. A local file with a flipped byte is never uploaded, and a failed
upload is answered with a staged durable save at the next step.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import checkpoint
from checkpoint.config import CheckpointerConfig
from checkpoint.testing.ranks import run_ranks
from checkpoint.tiers.upload import Uploader, UploadJob
from planners.errors import CheckpointExistsError, DistributedCheckpointError, IncompleteCheckpointError
from planners.metadata import METADATA_FILE, SHARD_FILE_RE
from storage.spec import StorageSpec

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]


def _full(step: int) -> torch.Tensor:
    return torch.arange(64 * 40, dtype=torch.float32).reshape(64, 40) * step + step


def _state(step: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return {"w": distribute_tensor(_full(step), mesh, [Shard(0)]), "step": step}


def _as_node(rank: int) -> None:
    """Each rank is one node, as a torchrun agent per rank would make it."""
    os.environ.update(GROUP_RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def _saves_by_upload(rank: int, world: int, tmp: str, durable: str, options: dict | None) -> dict:
    _as_node(rank)
    config = CheckpointerConfig(storage_options=options)
    ckpt = checkpoint.make_async_checkpointer(config)
    local = os.path.join(tmp, f"local-node{rank}")
    mgr = checkpoint.CheckpointManager(
        durable, checkpointer=ckpt, interval_steps=2, local_root=local, local_interval_steps=1,
        local_address="127.0.0.1",
    )  # fmt: skip
    for step in range(1, 5):
        assert mgr.save(step, _state(step)) is True
    mgr.wait_until_finished()
    tiers = {r.step: r.tiers for r in mgr.steps()}
    mgr.close()
    ckpt.close()
    out: dict[str, Any] = {"tiers": tiers}
    if rank == 0:
        durable_step = StorageSpec.resolve(f"{durable}/step-000000004", storage_options=options).open()
        with open(os.path.join(local, "step-000000004", METADATA_FILE), "rb") as f:
            out["same_metadata"] = durable_step.read_bytes(METADATA_FILE) == f.read()
        out["names"] = sorted(durable_step.list_names())
        reports = [checkpoint.verify(f"{durable}/step-00000000{s}", storage_options=options) for s in (2, 4)]
        out["problems"] = [r.problems for r in reports]
        out["files"] = [r.files_checked for r in reports]
    reader = checkpoint.make_sync_checkpointer(config)
    loader = checkpoint.CheckpointManager(durable, checkpointer=reader)  # the durable tier alone
    for step in (2, 4):
        target = _state(0)
        assert loader.load(target, step=step) == step
        out[f"exact{step}"] = torch.equal(target["w"].full_tensor(), _full(step)) and target["step"] == step
    loader.close()
    reader.close()
    return out


def _check_uploaded(results: list[dict]) -> None:
    for r in results:
        assert r["tiers"][4] == ("durable", "local") and r["tiers"][2] == ("durable",)
        assert r["exact2"] is True and r["exact4"] is True
    first = results[0]
    assert first["same_metadata"] is True  # the local save's metadata, so its save id: nothing staged again
    assert first["problems"] == [(), ()] and first["files"] == [2, 2]  # one shard file per rank
    shards = [n for n in first["names"] if SHARD_FILE_RE.fullmatch(n)]
    assert len(shards) == 2 and METADATA_FILE in first["names"]
    assert not [n for n in first["names"] if n.startswith(".inprogress-")]  # the marker was released


def test_durable_steps_are_uploaded_from_the_local_tier_and_load_exactly(tmp_path: Path) -> None:
    results = run_ranks(_saves_by_upload, 2, str(tmp_path), str(tmp_path / "durable"), None, timeout_secs=480)
    _check_uploaded(results)


@pytest.mark.s3
def test_upload_to_an_s3_durable_root(tmp_path: Path, s3_endpoint, s3_bucket: str) -> None:
    options = dict(s3_endpoint.storage_options)
    results = run_ranks(_saves_by_upload, 2, str(tmp_path), f"{s3_bucket}/run", options, timeout_secs=480)
    _check_uploaded(results)


def _corrupt_upload(rank: int, world: int, tmp: str) -> dict:
    local = os.path.join(tmp, "local", "step-000000003")
    ckpt = checkpoint.make_sync_checkpointer()  # a local step is an ordinary checkpoint
    ckpt.save(_state(3), local)
    ckpt.close()
    dist.barrier()
    own = [n for n in os.listdir(local) if (m := SHARD_FILE_RE.fullmatch(n)) and int(m["rank"]) == rank]
    if rank == 1:
        path = os.path.join(local, own[0])
        with open(path, "r+b") as f:  # one flipped byte in the tensor data, near the end of the file
            f.seek(os.path.getsize(path) - 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    done: Future[None] = Future()
    done.set_result(None)
    uploader = Uploader(dist.group.WORLD)
    durable = os.path.join(tmp, "durable", "step-000000003")
    job = UploadJob(step=3, local_dir=local, spec=StorageSpec.resolve(durable), local_write=done)
    try:
        uploader.start(job).result()
        return {"raised": None}
    except DistributedCheckpointError as e:
        return {"raised": type(e).__name__, "failures": e.failures, "file": own[0]}
    finally:
        uploader.close()


def test_a_corrupted_local_file_is_not_uploaded_and_nothing_is_committed(tmp_path: Path) -> None:
    results = run_ranks(_corrupt_upload, 2, str(tmp_path), timeout_secs=240)
    assert [r["raised"] for r in results] == ["DistributedCheckpointError"] * 2
    failures = results[0]["failures"]
    assert list(failures) == [1]
    assert results[1]["file"] in failures[1] and "fails its checks and is not uploaded" in failures[1]
    durable = tmp_path / "durable" / "step-000000003"
    assert not (durable / METADATA_FILE).exists()
    assert results[1]["file"] not in os.listdir(durable)  # the bad file never reached the durable root
    assert not [n for n in os.listdir(durable) if n.startswith(".inprogress-")]
    with pytest.raises(IncompleteCheckpointError):
        checkpoint.verify(str(durable))


def test_a_failed_upload_is_followed_by_a_staged_durable_save(tmp_path: Path, caplog) -> None:
    durable = tmp_path / "durable"
    taken = checkpoint.make_sync_checkpointer()
    taken.save({"w": torch.ones(3), "step": -1}, str(durable / "step-000000002"))  # step 2 is taken
    taken.close()
    ckpt = checkpoint.make_async_checkpointer()
    mgr = checkpoint.CheckpointManager(
        str(durable), checkpointer=ckpt, interval_steps=2, local_root=str(tmp_path / "local"),
        local_interval_steps=1, local_address="127.0.0.1",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="checkpoint.tiers.upload"):
        assert mgr.save(1, {"w": _full(1), "step": 1}) is True
        assert mgr.save(2, {"w": _full(2), "step": 2}) is True  # uploads, and the path is taken
        with pytest.raises(CheckpointExistsError, match="step-000000002"):
            mgr.wait_until_finished()
    assert "the upload of step 2" in caplog.text
    assert mgr.save(3, {"w": _full(3), "step": 3}) is True  # not a durable step: staged after the failure
    mgr.close()
    ckpt.close()
    assert checkpoint.verify(str(durable / "step-000000003")).ok
    target = {"w": torch.zeros(64, 40), "step": 0}
    reader = checkpoint.make_sync_checkpointer()
    reader.load(str(durable / "step-000000003"), target)
    reader.close()
    assert torch.equal(target["w"], _full(3)) and target["step"] == 3
    local_meta = (tmp_path / "local" / "step-000000003" / METADATA_FILE).read_bytes()
    assert (durable / "step-000000003" / METADATA_FILE).read_bytes() != local_meta  # staged: its own save
