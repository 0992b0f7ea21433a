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
from planners.errors import RankLocalError
from planners.metadata import METADATA_FILE, SHARD_FILE_RE
from tests.multiproc import free_port, run_ranks

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "multinode_worker.py"
# Each torchrun job, start-up of its agents and ranks included (the machine is small and shared).
JOB_TIMEOUT_S = 240.0
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
        root = psutil.Process(launched.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    launched.proc.wait(timeout=10)


def _tail(launched: Launched) -> str:
    lines = launched.log.read_text(errors="replace").splitlines()
    return f"--- {launched.name} (exit code {launched.proc.returncode}) ---\n" + "\n".join(
        lines[-LOG_TAIL_LINES:]
    )


def _run_job(agents: list[Launched], timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Wait for every agent; the first failure or the deadline kills them all and fails the test."""
    deadline = time.monotonic() + timeout_s
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
        what = "a torchrun agent failed" if failed else f"torchrun did not finish within {timeout_s:.0f} s"
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
