"""Jobs that do not fit on one host's assumptions: two torchrun nodes, and 8 ranks on a 2x4 mesh.

The first test starts two real `torchrun` agents on this machine as the two
nodes of one job (c10d rendezvous on loopback, each agent with its own
`--local-addr`, TMPDIR and node tag, 2 ranks each), saves an FSDP2 model with
the sync and the async checkpointer, and loads both on a second job of one node
with 3 ranks (`tests/multinode_worker.py` is the training script). Every
subprocess runs under a deadline; on failure or timeout its whole process tree
is killed and its log is part of the assertion message.

The second runs 8 gloo ranks with DTensors on a 2x4 DeviceMesh (every
combination of Shard and Replicate over two mesh dimensions, uneven and empty
shards), a replicated plain tensor, a `RankLocal` value and plain values;
it loads them into 5 ranks on a 1-D mesh and into one process without a target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import psutil
import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import checkpoint
from checkpoint.testing.ranks import free_port, run_ranks
from planners.errors import RankLocalError
from planners.metadata import METADATA_FILE, SHARD_FILE_RE

# Two jobs per test, each bounded by its own deadline (240 s), above the suite's default 300 s per test.
pytestmark = [pytest.mark.multiproc, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "multinode_worker.py"
# Each torchrun job, start-up of its agents and ranks included (the machine is small and shared).
JOB_TIMEOUT_SECS = 240.0
# Lines of a failed process's log quoted in the assertion message.
LOG_TAIL_LINES = 60


@dataclass(frozen=True, slots=True, kw_only=True)
class Launched:
    """One torchrun agent: its process and the file its stdout and stderr go to."""

    name: str
    proc: subprocess.Popen
    log: Path


def _torchrun(name: str, torchrun_args: list[str], script_args: list[str], env: dict, logs: Path) -> Launched:
    log = logs / f"{name}.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(WORKER), *script_args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    return Launched(name=name, proc=proc, log=log)


def _kill_tree(launched: Launched) -> None:
    """SIGKILL an agent and every descendant (torchrun puts each rank in a session of its own)."""
    try:
        descendants = psutil.Process(launched.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    launched.proc.kill()
    for proc in descendants:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    launched.proc.wait(timeout=10)  # reaped by Popen, so its exit code (-9) shows in the report
    psutil.wait_procs(descendants, timeout=10)


def _tail(launched: Launched) -> str:
    lines = launched.log.read_text(errors="replace").splitlines()
    return f"--- {launched.name} (exit code {launched.proc.returncode}) ---\n" + "\n".join(
        lines[-LOG_TAIL_LINES:]
    )


def _run_job(agents: list[Launched], timeout_secs: float = JOB_TIMEOUT_SECS) -> None:
    """Wait for every agent; the first failure or the deadline kills them all and fails the test."""
    deadline = time.monotonic() + timeout_secs
    exits = {os.pidfd_open(a.proc.pid): a for a in agents}  # readable once the process has exited
    failed = False
    try:
        while exits and not failed and (remaining := deadline - time.monotonic()) > 0:
            for fd in wait(list(exits), timeout=remaining):
                agent = exits.pop(fd)
                os.close(fd)
                failed = failed or agent.proc.wait() != 0
    finally:
        for fd in exits:
            os.close(fd)
        for agent in agents:
            if agent.proc.poll() is None:
                _kill_tree(agent)
    if failed or exits:
        what = "a torchrun agent failed" if failed else f"torchrun did not finish within {timeout_secs:.0f} s"
        pytest.fail(f"{what}\n" + "\n".join(_tail(a) for a in agents), pytrace=False)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _check_two_nodes(out: Path, nodes: dict[str, str]) -> None:
    """Torchrun made two nodes of two ranks each, with the TMPDIR of their own agent."""
    placement = {r: json.loads((out / "ranks" / f"{r}.json").read_text()) for r in range(4)}
    by_node: dict[str, list[int]] = {}
    for rank, p in placement.items():
        by_node.setdefault(p["NODE_TAG"], []).append(rank)
        assert p["LOCAL_WORLD_SIZE"] == "2" and int(p["RANK"]) == rank, p
        assert int(p["RANK"]) == 2 * int(p["GROUP_RANK"]) + int(p["LOCAL_RANK"]), p
        assert p["tempdir"] == nodes[p["NODE_TAG"]], p
    assert sorted(map(sorted, by_node.values())) == [[0, 1], [2, 3]], by_node
    # MASTER_ADDR is the --local-addr of the agent hosting ranks 0 and 1: the commit store is reached there.
    master_node = placement[0]["NODE_TAG"]
    assert {p["MASTER_ADDR"] for p in placement.values()} == {f"127.0.0.{2 + int(master_node[-1])}"}


def test_two_torchrun_nodes_save_sync_and_async_then_one_node_of_3_loads(tmp_path: Path) -> None:
    out, logs = tmp_path / "ckpt", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex
    nodes = {}
    agents = []
    for node in (0, 1):
        tag = f"node{node}"
        nodes[tag] = str(tmp_path / f"tmp-{tag}")
        os.mkdir(nodes[tag])
        args = ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2"]
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
        args += ["--local-addr", f"127.0.0.{2 + node}", "--max-restarts", "0"]
        env = _env(TMPDIR=nodes[tag], NODE_TAG=tag)
        agents.append(_torchrun(f"save-{tag}", args, ["--phase", "save", "--dir", str(out)], env, logs))
    _run_job(agents)
    _check_two_nodes(out, nodes)
    for name in ("sync", "async"):  # both committed, with shard files from the ranks of both nodes
        files = [p.name for p in (out / name).iterdir()]
        writers = {int(m["rank"]) for f in files if (m := SHARD_FILE_RE.fullmatch(f))}
        assert METADATA_FILE in files and writers == {0, 1, 2, 3}, (name, files)

    args = ["--nnodes", "1", "--nproc-per-node", "3", "--rdzv-backend", "c10d"]
    args += ["--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0"]
    _run_job([_torchrun("load", args, ["--phase", "load", "--dir", str(out)], _env(), logs)])
    assert sorted(p.name for p in out.glob("loaded-by-*")) == [f"loaded-by-{r}-of-3" for r in range(3)]


# The 8-rank job's DTensors: key -> placements on the 2x4 mesh, and on the 1-D mesh of the 5-rank load.
MESH_2X4 = (2, 4)
PLACEMENTS_2X4 = {
    "grid": (Shard(0), Shard(1)),  # 10x7: rows 5/5, columns 2/2/2/1
    "rows_twice": (Shard(0), Shard(0)),  # 9 rows split 5/4, then each part over 4 ranks
    "col_replicated": (Replicate(), Shard(0)),  # 5 rows over 4: 2/2/1/0, an empty shard
    "cols_replicated": (Shard(1), Replicate()),
    "replicated": (Replicate(), Replicate()),
}
PLACEMENTS_5 = {
    "grid": (Shard(0),),
    "rows_twice": (Shard(1),),  # 4 columns over 5: an empty shard
    "col_replicated": (Replicate(),),
    "cols_replicated": (Shard(0),),  # 6 rows over 5: 2/2/2/0/0
    "replicated": (Shard(1),),
}
VALUES = {"step": 7, "name": "mesh 2x4", "lr": 0.25, "milestones": [1, 2, 3], "flag": True, "none": None}


def _full_tensors() -> dict[str, torch.Tensor]:
    """The global tensors, the same on every rank and in the test process."""
    g = torch.Generator().manual_seed(11)
    return {
        "grid": torch.randn(10, 7, generator=g),
        "rows_twice": torch.randn(9, 4, generator=g),
        "col_replicated": torch.randint(-1000, 1000, (5, 3), generator=g),
        "cols_replicated": torch.randn(6, 11, generator=g).to(torch.bfloat16),
        "replicated": torch.randn(3, 3, generator=g, dtype=torch.float64),
    }


def _mesh_state(rank: int, mesh_shape: tuple[int, ...], placements: dict, *, zeros: bool) -> dict:
    mesh = init_device_mesh("cpu", mesh_shape)
    full = _full_tensors()
    return {
        "model": {
            # src_data_rank=None: every rank holds the full tensor, so each takes its chunk without a scatter
            key: distribute_tensor(
                torch.zeros_like(t) if zeros else t, mesh, list(placements[key]), src_data_rank=None
            )
            for key, t in full.items()
        },
        "plain": torch.zeros(3, 4, dtype=torch.int64) if zeros else torch.arange(12).reshape(3, 4),
        "rng": checkpoint.RankLocal(torch.full((2,), float(rank))),
        "values": {k: None for k in VALUES} if zeros else dict(VALUES),
    }


def _save_on_2x4(rank: int, world_size: int, path: str) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.save(_mesh_state(rank, MESH_2X4, PLACEMENTS_2X4, zeros=False), path)
    ckpt.close()


def _load_on_5(rank: int, world_size: int, path: str) -> dict[str, list[int]]:
    """Loads into a 1-D mesh; returns each DTensor's local shape, checked against the expected chunk."""
    target = _mesh_state(rank, (world_size,), PLACEMENTS_5, zeros=True)
    ckpt = checkpoint.make_sync_checkpointer()
    with pytest.raises(RankLocalError, match="'rng'.*saved by 8 ranks"):
        ckpt.load(path, state_dict=target)
    del target["rng"]
    loaded = ckpt.load(path, state_dict=target, strict=True)
    ckpt.close()
    expected = _mesh_state(rank, (world_size,), PLACEMENTS_5, zeros=False)
    shapes = {}
    for key, want in expected["model"].items():
        got = loaded["model"][key]
        assert isinstance(got, DTensor) and got.placements == want.placements, key
        assert got.dtype == want.dtype and torch.equal(got.to_local(), want.to_local()), key
        shapes[key] = list(got.to_local().shape)
    assert torch.equal(loaded["plain"], expected["plain"])
    assert loaded["values"] == VALUES
    return shapes


def test_8_ranks_on_2x4_mesh_load_into_5_ranks_and_one_process(tmp_path: Path) -> None:
    path = str(tmp_path / "mesh2x4")
    run_ranks(_save_on_2x4, 8, path, timeout_secs=240)
    shapes = run_ranks(_load_on_5, 5, path, timeout_secs=240)
    # The 5-rank layout has uneven and empty chunks where the 2x4 one had others.
    assert [s["rows_twice"] for s in shapes] == [[9, 1]] * 4 + [[9, 0]]
    assert [s["cols_replicated"] for s in shapes] == [[2, 11]] * 3 + [[0, 11]] * 2

    whole = checkpoint.make_sync_checkpointer().load(path)  # no process group, no target
    full = _full_tensors()
    assert sorted(whole["model"]) == sorted(full)
    for key, tensor in full.items():
        got = whole["model"][key]
        assert type(got) is torch.Tensor and got.dtype == tensor.dtype and torch.equal(got, tensor), key
    assert torch.equal(whole["plain"], torch.arange(12).reshape(3, 4))
    assert len(whole["rng"]) == 8
    for rank, value in enumerate(whole["rng"]):
        assert torch.equal(value, torch.full((2,), float(rank))), rank
    assert whole["values"] == VALUES
