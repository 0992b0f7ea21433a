"""The node-local tier end to end, on real torchrun agents: lose a node, resume from peers, reshard.

A module fixture trains an FSDP2 model on two torchrun agents of 2 ranks
each (`tests/tier_worker.py`, durable saves every 5 steps to a local
directory, local saves every step with one replica on the other node). Once
step 7 is committed, node 1's agent and ranks are SIGKILLed and its local
root deleted (a copy is kept for the tests that need both nodes' replicas),
then node 0's. Each test resumes a new job from private copies of what was
left and checks, in the job, that parameters and AdamW state equal the
expected step's exactly. Where the durable root is unreachable (the job's own
durable path, with a plain file in its place: every read of it fails, none
says "not found"), no byte can have come from it, and the local steps are
trusted as this run's by their tags alone. A fresh durable root is a new run:
another test shows that the same local steps are then never resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from checkpoint.testing.ranks import free_port
from planners.metadata import SHARD_FILE_RE
from tests.test_multinode import JOB_TIMEOUT_SECS, Launched, _env, _kill_tree, _run_job, _tail

pytestmark = [pytest.mark.multiproc, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "tier_worker.py"
STEP7, STEP6 = "step-000000007", "step-000000006"


def _agent(
    name: str,
    node: int,
    nnodes: int,
    nproc: int,
    rdzv: tuple[str, str],
    script: list[str],
    logs: Path,
    local_root: Path,
) -> Launched:
    """One torchrun agent as node `node` at 127.0.0.(2 + node), with its own local root."""
    endpoint, rdzv_id = rdzv
    addr = f"127.0.0.{2 + node}"
    args = ["--nnodes", str(nnodes), "--node-rank", str(node), "--nproc-per-node", str(nproc)]
    args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
    args += ["--local-addr", addr, "--max-restarts", "0"]
    log = logs / f"{name}.log"
    env = _env(SHARDSAFE_NODE_ADDR=addr)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *args,
                str(WORKER),
                *script,
                "--local-root",
                str(local_root),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    return Launched(name=name, proc=proc, log=log)


def _wait_for_commit(fifo: Path, agents: list[Launched], expected: bytes = b"7\n") -> None:
    """Block until the job says step 7 is committed (or an agent exits, or the deadline passes)."""
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # holding a write end too: no EOF before the job writes
    exits = [os.pidfd_open(a.proc.pid) for a in agents]
    try:
        ready, _, _ = select.select([fd, *exits], [], [], JOB_TIMEOUT_SECS)
        if fd not in ready:
            for agent in agents:
                _kill_tree(agent)
            pytest.fail(
                "the training job did not commit step 7\n" + "\n".join(_tail(a) for a in agents),
                pytrace=False,
            )
        assert os.read(fd, 16) == expected
    finally:
        os.close(fd)
        for e in exits:
            os.close(e)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tier")
    out, logs, durable = base / "out", base / "logs", base / "durable"
    for d in (out, logs):
        d.mkdir()
    os.mkfifo(out / "committed.fifo")
    roots = [base / "local-node0", base / "local-node1"]
    endpoint = (f"127.0.0.1:{free_port()}", uuid.uuid4().hex)
    script = ["--phase", "train", "--out", str(out), "--durable", str(durable)]
    agents = [_agent(f"train-node{n}", n, 2, 2, endpoint, script, logs, roots[n]) for n in (0, 1)]
    _wait_for_commit(out / "committed.fifo", agents)
    _kill_tree(agents[1])  # node 1 is lost: its agent, its ranks and their writer processes
    shutil.copytree(roots[1], base / "node1-copy")  # for the tests that need its replicas
    shutil.rmtree(roots[1])
    _kill_tree(agents[0])
    return {"out": out, "durable": durable, "node0": roots[0], "node1": base / "node1-copy"}


@contextlib.contextmanager
def _unreachable(durable: Path):
    """The job's durable root, unreadable for a while: a plain file where its directory was."""
    away = durable.with_name(durable.name + ".away")
    durable.rename(away)
    durable.write_bytes(b"")
    try:
        yield durable
    finally:
        durable.unlink()
        away.rename(durable)


def _resume(
    tmp: Path, trained: dict[str, Path], roots: list[Path | None], nproc: int, *, expect: int, durable: bool
) -> str:
    """Resume on one node per entry of `roots` (None: an empty local root); returns the jobs' logs."""
    out, logs = tmp / "out", tmp / "logs"
    out.mkdir(parents=True)
    logs.mkdir()
    shutil.copy(trained["out"] / "expected.pt", out / "expected.pt")
    local = []
    for node, root in enumerate(roots):
        local.append(tmp / f"local-node{node}")
        if root is not None:
            shutil.copytree(root, local[-1])
    with contextlib.ExitStack() as stack:
        where = (
            shutil.copytree(trained["durable"], tmp / "durable")
            if durable
            else stack.enter_context(_unreachable(trained["durable"]))
        )
        script = ["--phase", "resume", "--out", str(out), "--durable", str(where), "--expect", str(expect)]
        endpoint = (f"127.0.0.1:{free_port()}", uuid.uuid4().hex)
        agents = [
            _agent(f"resume-node{n}", n, len(roots), nproc, endpoint, script, logs, local[n])
            for n in range(len(roots))
        ]
        _run_job(agents)
    world = nproc * len(roots)
    assert sorted(p.name for p in out.glob("resumed-*")) == sorted(
        f"resumed-{r}-of-{world}.json" for r in range(world)
    )
    return "\n".join(a.log.read_text(errors="replace") for a in agents)


def test_lost_node_resumes_on_two_nodes_from_the_local_tier_without_the_durable_root(
    tmp_path: Path, trained
) -> None:
    assert not trained["node1"].samefile(trained["node0"])
    logs = _resume(tmp_path, trained, [trained["node0"], None], 2, expect=7, durable=False)
    assert "resumed step 7 from the local tier" in logs and "from the durable tier" not in logs
    # Which tier a resume came from, without INFO logging (the README's example prints it).
    resumed = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("resumed-*"))]
    assert resumed == [{"step": 7, "resumed_from": "local"}] * 4
    # Node 1 started empty; its rank read node 0's copies over HTTP (a peer's server).
    assert "loaded local tier step-000000007 (node 1's view)" in logs


def test_lost_node_resumes_on_one_node_of_three_ranks_resharded(tmp_path: Path, trained) -> None:
    logs = _resume(tmp_path, trained, [trained["node0"]], 3, expect=7, durable=False)
    assert "resumed step 7 from the local tier" in logs


def _flip(root: Path, step_dir: str, name: str) -> None:
    path = root / step_dir / name
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 10] ^= 0x04  # the first tensor's data
    path.write_bytes(bytes(data))


def _first_shard(root: Path, step_dir: str) -> str:
    return sorted(p.name for p in (root / step_dir).iterdir() if SHARD_FILE_RE.fullmatch(p.name))[0]


def test_a_damaged_replica_is_quarantined_and_the_other_copy_used(tmp_path: Path, trained) -> None:
    roots = [tmp_path / "src0", tmp_path / "src1"]
    shutil.copytree(trained["node0"], roots[0])
    shutil.copytree(trained["node1"], roots[1])
    name = _first_shard(roots[0], STEP7)
    _flip(roots[0], STEP7, name)
    logs = _resume(tmp_path / "job", trained, roots, 1, expect=7, durable=False)
    assert f"node 0's copy of {name} of step 7 failed its checksum; quarantined" in logs
    assert "resumed step 7 from the local tier" in logs
    kept = os.listdir(tmp_path / "job" / "local-node0" / STEP7)
    assert name not in kept and any(n.startswith(f"{name}.quarantined-") for n in kept)


def test_every_copy_damaged_falls_back_to_the_durable_step(tmp_path: Path, trained) -> None:
    roots = [tmp_path / "src0", tmp_path / "src1"]
    shutil.copytree(trained["node0"], roots[0])
    shutil.copytree(trained["node1"], roots[1])
    for step_dir in (STEP7, STEP6):
        name = _first_shard(roots[0], step_dir)
        for root in roots:
            _flip(root, step_dir, name)
    logs = _resume(tmp_path / "job", trained, roots, 1, expect=5, durable=True)
    assert "step 7 cannot be rebuilt from verified copies" in logs
    assert "step 6 cannot be rebuilt from verified copies" in logs
    assert "resumed step 5 from the durable tier" in logs


def test_both_local_roots_gone_resumes_from_the_durable_step(tmp_path: Path, trained) -> None:
    logs = _resume(tmp_path, trained, [None, None], 1, expect=5, durable=True)
    assert "resumed step 5 from the durable tier" in logs
    resumed = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("resumed-*"))]
    assert resumed == [{"step": 5, "resumed_from": "durable"}] * 2


def test_three_nodes_ring_replicas_commit_and_a_lost_middle_node_is_rebuilt(tmp_path: Path) -> None:
    """3 nodes x 1 rank: node n's files go to node n+1, and to node 0 (the coordinator checks them there)."""
    out, logs, durable = tmp_path / "out", tmp_path / "logs", tmp_path / "durable"
    for d in (out, logs):
        d.mkdir()
    os.mkfifo(out / "committed.fifo")
    roots = [tmp_path / f"local-node{n}" for n in range(3)]
    rdzv = (f"127.0.0.1:{free_port()}", uuid.uuid4().hex)
    script = ["--phase", "train", "--out", str(out), "--durable", str(durable)]
    agents = [_agent(f"train-node{n}", n, 3, 1, rdzv, script, logs, roots[n]) for n in range(3)]
    _wait_for_commit(out / "committed.fifo", agents)
    for agent in agents:
        _kill_tree(agent)
    writers = {
        n: {int(m["rank"]) for p in (roots[n] / STEP7).iterdir() if (m := SHARD_FILE_RE.fullmatch(p.name))}
        for n in range(3)
    }
    assert writers == {0: {0, 1, 2}, 1: {0, 1}, 2: {1, 2}}, writers
    assert all((root / STEP7 / "metadata.json").is_file() for root in roots)

    shutil.rmtree(roots[1])  # node 1 lost: its files survive on node 2 (ring) and node 0
    job = tmp_path / "job"
    logs = _resume(
        job, {"out": out, "durable": durable}, [roots[0], None, roots[2]], 1, expect=7, durable=False
    )
    assert "resumed step 7 from the local tier" in logs


def _plant_killed_write(root: Path) -> None:
    """What a SIGKILL during the local write of the step after node 0's newest commit leaves, made certain:
    the step directory with this run's tag and a truncated shard file of another save id (on main the
    next save replicated it, the peer refused it, and every restart crashed at that save)."""
    committed = sorted(p for p in root.glob("step-*") if (p / "metadata.json").is_file())
    newest = committed[-1]
    nxt = root / f"step-{int(newest.name.split('-')[1]) + 1:09d}"
    nxt.mkdir(exist_ok=True)
    if (newest / "shardsafe-run.json").is_file():  # the tag a killed save writes first (b3b5572 had none)
        shutil.copy(newest / "shardsafe-run.json", nxt / "shardsafe-run.json")
    shard = next(p for p in newest.iterdir() if SHARD_FILE_RE.fullmatch(p.name))
    (nxt / "shard-0123456789ab-r00000-000.safetensors").write_bytes(shard.read_bytes()[:100])


def test_kills_during_local_writes_never_make_a_crash_loop(tmp_path: Path) -> None:
    """Issue 23 item 7: kill during a local write, restart three times; training goes on each time."""
    out, logs, durable = tmp_path / "out", tmp_path / "logs", tmp_path / "durable"
    for d in (out, logs):
        d.mkdir()
    os.mkfifo(out / "committed.fifo")
    roots = [tmp_path / "local-node0", tmp_path / "local-node1"]
    kills, until = [2, 4, 6], 8
    for run, kill_at in enumerate([*kills, 0]):
        script = ["--phase", "loop", "--out", str(out), "--durable", str(durable)]
        script += ["--kill-at", str(kill_at), "--until", str(until), "--attempt", str(run)]
        rdzv = (f"127.0.0.1:{free_port()}", uuid.uuid4().hex)
        agents = [_agent(f"loop{run}-node{n}", n, 2, 1, rdzv, script, logs, roots[n]) for n in (0, 1)]
        if kill_at:
            _wait_for_commit(out / "committed.fifo", agents, f"{kill_at}\n".encode())
            for agent in agents:
                _kill_tree(agent)
            _plant_killed_write(roots[0])
        else:
            _run_job(agents)
    resumed = [json.loads((out / f"loop-{run}-0.json").read_text())["resumed"] for run in range(4)]
    assert resumed[0] is None
    for run, kill_at in enumerate(kills, start=1):
        assert resumed[run] is not None and kill_at - 1 <= resumed[run] <= kill_at, resumed
    # The last run trained to the end: its last local step committed on both nodes.
    assert all((root / f"step-{until:09d}" / "metadata.json").is_file() for root in roots)
