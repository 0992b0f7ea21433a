"""Issue 19, case 3: a foreign client of rank 0's commit store cannot run code or forge a commit.

Two real gloo ranks save asynchronously. In rank 0's writer process, just before its commit, a
foreign `TCPStore` client (a plain client of the store's port, without the save's secret) finds the
save id in the `.inprogress-<id>.json` name, waits for rank 1's gather key and overwrites it. The
save must fail on both ranks, no forged pickle may run, and no metadata may be published. The
coordinator's completeness check is also run on its own, on plans computed in one process.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

import checkpoint
from checkpoint.config import CheckpointerConfig, CheckpointWriterConfig
from checkpoint.save.hooks import CommitHook
from checkpoint.save.lease import MARKER_RE
from checkpoint.save.plan_exchange import draft_plan, rank_plan
from checkpoint.testing.ranks import run_ranks
from planners.errors import IncompleteCheckpointError, WriterProcessError
from planners.global_plan import WorldStructure, structure_of
from planners.metadata import ChunkRecord, shard_file_name
from planners.metadata_build import MetadataDraft, RankWriteResult, WrittenChunk
from planners.placement import Layout
from planners.placement import Shard as PlanShard
from planners.save_plan import plan_local
from planners.write_report import plan_problem, result_from_json, result_to_json

SHAPE = (8, 6)


class _CreatesFile:
    """Unpickling this creates the file at `path` (what a forged pickle could do in the writer)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _forgeries(marker: str) -> dict[str, bytes]:
    omitting = RankWriteResult(rank=1)  # rank 1 "wrote nothing": its files missing from the commit
    return {
        "pickle_runs_code": pickle.dumps(_CreatesFile(marker)),
        "pickle_omits_rank_1": pickle.dumps(omitting),
        "json_omits_rank_1": json.dumps(result_to_json(omitting)).encode(),
    }


class ForgeRankOneResult(CommitHook):
    """In rank 0's writer process, before its commit: a foreign client overwrites rank 1's gather value."""

    def __init__(self, address_file: str, payloads: dict[str, bytes]) -> None:
        self.address_file, self.payloads = address_file, payloads  # by the checkpoint's directory name

    def pre_commit(self, path: str, **kwargs: object) -> None:
        if kwargs["rank"] != 0 or Path(path).name not in self.payloads:
            return
        host, port = json.loads(Path(self.address_file).read_text())
        client = dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=60), wait_for_workers=False)
        save_id = next(m["save_id"] for n in sorted(Path(path).iterdir()) if (m := MARKER_RE.match(n.name)))
        key = f"shardsafe/commit/{save_id}/1/gather/1"  # rank 1's write result, the commit's first exchange
        client.wait([key], timedelta(seconds=60))
        client.set(key, self.payloads[Path(path).name])

    def post_commit(self, path: str, **kwargs: object) -> None:
        pass


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) that listen on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if int(port_hex, 16) == port and state == "0A":
                out.append(address)
    return out


def _forged_saves(rank: int, world_size: int, root: str, payloads: dict[str, bytes]) -> dict[str, Any]:
    """One save per forgery (each must fail), then a clean one (which must commit)."""
    address_file = f"{root}/store-address.json"
    config = CheckpointerConfig(writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=15.0))
    ckpt = checkpoint.make_async_checkpointer(config, commit_hook=ForgeRankOneResult(address_file, payloads))
    out: dict[str, Any] = {}
    if rank == 0:
        host, port = ckpt.checkpoint_process._init.store_address
        Path(address_file).write_text(json.dumps([host, port]))
        out["listening"] = _listening_addresses(port)
    dist.barrier()
    full = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE)
    state = {"w": distribute_tensor(full, init_device_mesh("cpu", (world_size,)), [Shard(0)]), "b": full + 1}
    for name in [*payloads, "clean"]:
        try:
            _, write_future = ckpt.save(state, f"{root}/{name}")
        except WriterProcessError:  # the previous save failed: the next save() reports it once
            _, write_future = ckpt.save(state, f"{root}/{name}")
        error = write_future.exception(timeout=120)
        out[name] = (type(error).__name__, str(error)) if error is not None else None
    ckpt.close()
    return out


def test_forged_gather_values_fail_the_save_and_publish_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "forged-pickle-ran"
    root = tmp_path / "run"
    root.mkdir()
    payloads = _forgeries(str(marker))
    results = run_ranks(_forged_saves, 2, str(root), payloads, timeout_secs=240)

    assert not marker.exists()  # the forged pickle was never loaded
    for forgery in payloads:
        assert not (root / forgery).exists(), forgery  # refused, its files and directory taken back
        with pytest.raises(FileNotFoundError, match="metadata.json not found") as missing:
            checkpoint.make_sync_checkpointer().load(str(root / forgery))
        assert not isinstance(missing.value, IncompleteCheckpointError)
        for rank, out in enumerate(results):
            assert out[forgery] is not None, f"rank {rank} reported the forged save {forgery} as committed"
            kind, message = out[forgery]
            assert kind == "DistributedCheckpointError", (rank, forgery, message)
            assert "rank 1: the value at commit store key shardsafe/commit/" in message, message
            assert "/1/gather/1 is not sealed with this save's secret" in message, message
    assert [out["clean"] for out in results] == [None, None]
    loaded = checkpoint.make_sync_checkpointer().load(str(root / "clean"))
    full = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE)
    assert torch.equal(loaded["w"], full) and torch.equal(loaded["b"], full + 1)
    # run_ranks sets MASTER_ADDR=127.0.0.1: the store listens there only, not on every interface.
    assert results[0]["listening"] == ["0100007F"]


# --- the coordinator's completeness check, on plans computed in one process -------------------------

SAVE_ID = "0123456789ab"


def _world() -> tuple[WorldStructure, MetadataDraft]:
    layout = Layout(mesh_shape=(2,), placements=(PlanShard(dim=0),), ranks=(0, 1))
    structure = structure_of(
        [("a", "float32", (4,), None), ("b", "float32", (4,), None), ("g", "float32", (4, 2), layout)], []
    )
    world = WorldStructure(structures=(structure,), rank_structure=(0, 0))
    return world, MetadataDraft(global_plan=draft_plan(world), values={}, structure={"dict": []})


def _honest_results(world: WorldStructure) -> list[RankWriteResult]:
    """What each rank's writer reports after writing exactly its planned files."""
    results = []
    for rank in range(world.world_size):
        plan = rank_plan(world, plan_local(rank, [], other_keys=[]), rank=rank, max_file_bytes=1 << 20)
        files, chunks = {}, []
        for fp in plan.files:
            name, offset = shard_file_name(SAVE_ID, fp.stem), 0
            for item in fp.items:
                if not item.grid:
                    record = ChunkRecord(
                        box=item.box,
                        file=name,
                        key=item.fqn,
                        offset_bytes=offset,
                        nbytes=item.nbytes,
                        checksums=(7,),
                    )
                    chunks.append(
                        WrittenChunk(fqn=item.fqn, dtype=item.dtype, rank_local=False, chunk=record)
                    )
                offset += item.nbytes
            files[name] = offset + 128
        results.append(RankWriteResult(rank=rank, files=files, chunks=tuple(chunks)))
    return results


def test_complete_results_pass_and_survive_their_json_form() -> None:
    world, draft = _world()
    results = _honest_results(world)
    assert {c.fqn for r in results for c in r.chunks} == {"a", "b"} and all(r.files for r in results)
    decoded = [result_from_json(json.loads(json.dumps(result_to_json(r))), rank=r.rank) for r in results]
    assert decoded == results
    assert plan_problem(draft, decoded, save_id=SAVE_ID) is None


def test_results_omitting_a_rank_s_files_do_not_complete_the_plan() -> None:
    world, draft = _world()
    results = _honest_results(world)
    assert [c.fqn for c in results[1].chunks] == ["b"]  # rank 1 writes plain key b and its cell of grid key g
    assert plan_problem(draft, [results[0], RankWriteResult(rank=1)], save_id=SAVE_ID) == (
        "key 'b': the reported chunks do not tile it: chunks cover 0 of 4 elements: there is a gap"
    )
    # Rank 1 keeps b's chunk (moved into rank 0's report) but reports no file of its own: g's cell is missing.
    moved = RankWriteResult(
        rank=0,
        files={**results[0].files},
        chunks=results[0].chunks
        + tuple(
            WrittenChunk(fqn=c.fqn, dtype=c.dtype, rank_local=False, chunk=_in_file(c.chunk, results[0]))
            for c in results[1].chunks
        ),
    )
    assert plan_problem(draft, [moved, RankWriteResult(rank=1)], save_id=SAVE_ID) == (
        "rank 1 writes chunks of grid keys in the plan but reported no shard file (1 such rank(s))"
    )


def _in_file(chunk: ChunkRecord, result: RankWriteResult) -> ChunkRecord:
    (name,) = result.files
    return ChunkRecord(
        box=chunk.box,
        file=name,
        key=chunk.key,
        offset_bytes=16,
        nbytes=chunk.nbytes,
        checksums=chunk.checksums,
    )


def test_results_naming_another_rank_s_or_save_s_files_are_refused() -> None:
    world, draft = _world()
    results = _honest_results(world)
    stolen = RankWriteResult(rank=1, files=dict(results[0].files), chunks=results[0].chunks)
    assert "rank 1 reported file 'shard-0123456789ab-r00000-000.safetensors'" in str(
        plan_problem(draft, [results[0], stolen], save_id=SAVE_ID)
    )
    assert "which is not one of its shard files of save fedcba987654" in str(
        plan_problem(draft, results, save_id="fedcba987654")
    )


def test_a_report_from_the_store_is_read_as_untrusted_json() -> None:
    with pytest.raises(ValueError, match="the report names rank 0"):
        result_from_json(
            {"rank": 0, "files": {}, "chunks": [], "rank_local_values": {}, "error": None}, rank=1
        )
    with pytest.raises(ValueError, match="has size -1"):
        result_from_json(
            {"rank": 1, "files": {"x": -1}, "chunks": [], "rank_local_values": {}, "error": None}, rank=1
        )
    with pytest.raises(ValueError, match="not a JSON object"):
        result_from_json(["rank", 1], rank=1)


def test_a_chunk_with_another_size_or_checksum_count_is_refused() -> None:
    world, draft = _world()
    results = _honest_results(world)
    (chunk,) = results[1].chunks
    for change, problem in (
        ({"nbytes": 8, "checksums": (7,)}, "of 8 bytes; its box holds 16"),
        ({"checksums": ()}, "of 16 bytes with 0 block checksums"),
    ):
        record = dataclasses.replace(chunk.chunk, **change)
        bad = dataclasses.replace(results[1], chunks=(dataclasses.replace(chunk, chunk=record),))
        assert plan_problem(draft, [results[0], bad], save_id=SAVE_ID) == (
            f"rank 1 reported a chunk of key 'b' in 'shard-0123456789ab-r00001-000.safetensors' {problem}"
        )
