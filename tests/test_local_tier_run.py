"""Issue 23: the local tier belongs to its run, follows its timeline, and never hurts training.

Single-process tests are one node (the tier's own writer process and server, no peers); the
two-node cases run two spawned gloo ranks, each its own "node" (torchrun's GROUP_RANK set per
rank, its own `local_root`, its own real server on loopback), so replicas and peer outages are
real. The torchrun jobs (agents killed mid-write, restarted) are in `tests/test_local_tier.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import checkpoint
from checkpoint.testing.ranks import RankFailures, run_ranks
from checkpoint.tiers import client
from checkpoint.tiers.node import loopback_refusal, node_address, route_to
from checkpoint.tiers.replicate import ReplicaHook
from checkpoint.tiers.server import TOKEN_HEADER
from planners.errors import StorageError
from planners.metadata import METADATA_FILE, SHARD_FILE_RE
from tests.test_cli import _run
from tests.test_tier_server import STEP, _files, _raw, _replicate, source, tier  # noqa: F401

pytestmark = [pytest.mark.timeout(300)]


def _mgr(
    tmp: Path, ckpt, durable: str = "durable", local: str = "local", **kw
) -> checkpoint.CheckpointManager:
    return checkpoint.CheckpointManager(
        str(tmp / durable),
        checkpointer=ckpt,
        interval_steps=5,
        local_root=str(tmp / local),
        local_address="127.0.0.1",
        **kw,
    )


def _state(value: float) -> dict:
    return {"w": torch.full((4, 3), float(value)), "n": int(value)}


def _steps(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("step-"))


def _flip(step_dir: Path) -> None:
    """A flipped bit in the first tensor's bytes of the step's first shard file."""
    shard = next(p for p in sorted(step_dir.iterdir()) if SHARD_FILE_RE.fullmatch(p.name))
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 4] ^= 0x10
    shard.write_bytes(bytes(data))


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


# --- item 1: a fresh run never resumes another run's local steps, nor prunes them --------------------


def test_a_fresh_run_never_resumes_nor_prunes_another_runs_local_steps(tmp_path: Path, ckpt, caplog) -> None:
    with _mgr(tmp_path, ckpt, durable="run-a", local_keep_last=2) as a:
        for step in (1, 2, 3):
            a.save(step, _state(step))
    assert _steps(tmp_path / "local") == ["step-000000002", "step-000000003"]
    caplog.set_level(logging.INFO)
    target = _state(-1)
    with _mgr(tmp_path, ckpt, durable="run-b", local_keep_last=1) as b:
        assert b.load(target) is None  # not run A's step 3
        assert target["n"] == -1 and torch.equal(target["w"], torch.full((4, 3), -1.0))
        assert b.steps() == []
        for step in (1, 2, 3, 4):
            b.save(step, _state(100 + step))
        b.wait_until_finished()
        assert [(r.step, r.tiers) for r in b.steps()] == [(4, ("local",))]
    assert "holds 2 step(s) of another run or without a tag ([2, 3])" in caplog.text
    assert "not of this run" in caplog.text  # B's saves of 2 and 3 skipped: those directories are A's
    # Run A's steps are untouched by B (never deleted without evidence) and A resumes its own step 3.
    assert _steps(tmp_path / "local") == ["step-000000002", "step-000000003", "step-000000004"]
    target = _state(-1)
    with _mgr(tmp_path, ckpt, durable="run-a") as a:
        assert a.load(target) == 3
    assert target["n"] == 3 and torch.equal(target["w"], torch.full((4, 3), 3.0))


# --- item 2: a rollback ends the old timeline; a crash resumes the new one ---------------------------


def test_a_rollback_then_a_crash_resumes_the_new_timeline(tmp_path: Path, ckpt, caplog) -> None:
    with _mgr(tmp_path, ckpt, local_keep_last=2) as mgr:
        for step in range(1, 10):
            mgr.save(step, _state(step))
    assert _steps(tmp_path / "local") == ["step-000000008", "step-000000009"]
    with _mgr(tmp_path, ckpt, local_keep_last=2) as mgr:
        target = _state(-1)
        assert mgr.load(target, step=5) == 5 and target["n"] == 5  # back past a loss spike
        for step in (6, 7):
            mgr.save(step, _state(1000 + step))
        mgr.wait_until_finished()
        assert [(r.step, r.tiers) for r in mgr.steps()] == [
            (5, ("durable",)),
            (6, ("local",)),
            (7, ("local",)),
        ]
    # The old timeline's 8 and 9 are gone; the new 6 and 7 stay.
    assert _steps(tmp_path / "local") == ["step-000000006", "step-000000007"]
    target = _state(-1)
    with _mgr(tmp_path, ckpt) as mgr:  # the restart after a crash
        assert mgr.load(target) == 7
    assert target["n"] == 1007 and torch.equal(target["w"], torch.full((4, 3), 1007.0))


def test_a_step_of_the_abandoned_timeline_on_another_copy_is_never_resumed(tmp_path: Path, ckpt) -> None:
    """A node that missed the rollback (a copy of its old root) still holds 8 and 9: they are fenced."""
    with _mgr(tmp_path, ckpt, local_keep_last=2) as mgr:
        for step in range(1, 10):
            mgr.save(step, _state(step))
    shutil.copytree(tmp_path / "local", tmp_path / "old-local")
    with _mgr(tmp_path, ckpt) as mgr:
        mgr.load(_state(-1), step=5)
        mgr.save(6, _state(1006))
    shutil.rmtree(tmp_path / "local")
    shutil.copytree(tmp_path / "old-local", tmp_path / "local")  # 8 and 9 of the old timeline, tagged
    target = _state(-1)
    with _mgr(tmp_path, ckpt) as mgr:
        assert mgr.load(target) == 5  # from the durable tier: 8 and 9 were abandoned, 6 is not here
        assert [r.step for r in mgr.steps()] == [5]
    assert target["n"] == 5


def test_durable_steps_a_rollback_abandoned_are_never_resumed_and_are_replaced(tmp_path: Path, ckpt) -> None:
    with _mgr(tmp_path, ckpt, local_keep_last=2) as mgr:
        for step in range(1, 13):
            mgr.save(step, _state(step))  # durable 5 and 10; local 11 and 12
    with _mgr(tmp_path, ckpt) as mgr:
        assert mgr.load(_state(-1), step=5) == 5
        for step in (6, 7, 8):
            mgr.save(step, _state(3000 + step))
        mgr.wait_until_finished()
        assert [r.step for r in mgr.steps()] == [5, 7, 8]  # durable 10 is abandoned: not listed
    target = _state(-1)
    with _mgr(tmp_path, ckpt) as mgr:  # a crash, and the restart
        assert mgr.load(target) == 8 and mgr.resumed_from == "local"  # not the abandoned durable 10
        assert target["n"] == 3008
        for step in (9, 10):
            mgr.save(step, _state(3000 + step))  # durable 10 again: replaces the abandoned one
        mgr.wait_until_finished()
    target = _state(-1)
    assert checkpoint.CheckpointManager(str(tmp_path / "durable"), checkpointer=ckpt).load(target) == 10
    assert target["n"] == 3010


# --- item 3: damaged local steps never take the place of new good ones ------------------------------


def test_after_falling_back_past_damaged_local_steps_new_local_steps_are_kept(
    tmp_path: Path, ckpt, caplog
) -> None:
    with _mgr(tmp_path, ckpt, local_keep_last=2) as mgr:
        for step in range(1, 10):
            mgr.save(step, _state(step))
    for step_dir in ("step-000000008", "step-000000009"):
        _flip(tmp_path / "local" / step_dir)
    caplog.set_level(logging.INFO)
    with _mgr(tmp_path, ckpt, local_keep_last=2) as mgr:
        target = _state(-1)
        assert mgr.load(target) == 5 and target["n"] == 5
        for step in (6, 7):
            mgr.save(step, _state(2000 + step))
        mgr.wait_until_finished()
        records = mgr.steps()
    assert "resumed step 5 from the durable tier" in caplog.text
    assert [(r.step, r.tiers, r.complete) for r in records] == [
        (5, ("durable",), True),
        (6, ("local",), True),
        (7, ("local",), True),
    ]
    assert _steps(tmp_path / "local") == ["step-000000006", "step-000000007"]
    target = _state(-1)
    with _mgr(tmp_path, ckpt) as mgr:
        assert mgr.load(target) == 7
    assert target["n"] == 2007


# --- items 4 and 6: a peer outage and a killed save's leftovers cost one local save, never training --


def _as_node(rank: int) -> None:
    os.environ.update(GROUP_RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def _two_nodes(rank: int, world_size: int, base: str) -> dict:
    _as_node(rank)
    ckpt = checkpoint.make_sync_checkpointer()
    root = Path(base)
    mgr = checkpoint.CheckpointManager(
        str(root / "durable"),
        checkpointer=ckpt,
        interval_steps=5,
        local_root=str(root / f"local{rank}"),
        local_address="127.0.0.1",
        replicas=1,
    )
    out: dict = {}
    mgr.save(1, _state(1))
    mgr.wait_until_finished()
    # Item 6: what a save of step 2 killed mid-write leaves on node 0: this run's tag and a truncated
    # shard file of another save id (on main it was replicated, and node 1 refused it: 422).
    planted = "shard-0123456789ab-r00000-000.safetensors"
    if rank == 0:
        step1, step2 = root / "local0" / "step-000000001", root / "local0" / "step-000000002"
        step2.mkdir()
        shutil.copy(step1 / "shardsafe-run.json", step2 / "shardsafe-run.json")
        shard = next(p for p in step1.iterdir() if SHARD_FILE_RE.fullmatch(p.name))
        (step2 / planted).write_bytes(shard.read_bytes()[:100])
    dist.barrier()
    mgr.save(2, _state(2))
    mgr.wait_until_finished()
    out["after_2"] = [r.step for r in mgr.steps()]
    out["planted_anywhere"] = any((root / f"local{n}" / "step-000000002" / planted).exists() for n in (0, 1))
    # Item 4: node 1's server goes away; the local save of step 3 fails (node 0 cannot replicate).
    dist.barrier()
    if rank == 1:
        mgr._local._server.stop()
    dist.barrier()
    mgr.save(3, _state(3))
    mgr.wait_until_finished()  # logged, never raised
    mgr.save(4, _state(4))  # on main: WriterProcessError from the failed local save of step 3
    mgr.save(5, _state(5))  # the durable save of step 5 runs
    mgr.wait_until_finished()
    out["after_5"] = [(r.step, r.tiers) for r in mgr.steps()]
    mgr.close()
    ckpt.close()
    return out


def test_a_peer_outage_and_a_killed_saves_leftovers_never_stop_training(tmp_path: Path) -> None:
    results = run_ranks(_two_nodes, 2, str(tmp_path), timeout_secs=240)
    for rank, out in enumerate(results):
        assert out["after_2"] == [1, 2], (rank, out)
        assert out["planted_anywhere"] is False
        assert out["after_5"][-1] == (5, ("durable",)), (rank, out)
    target = _state(-1)
    ckpt = checkpoint.make_sync_checkpointer()
    assert checkpoint.CheckpointManager(str(tmp_path / "durable"), checkpointer=ckpt).load(target) == 5
    ckpt.close()
    assert target["n"] == 5


# --- item 5: a deleted local_root costs at most one local save --------------------------------------


def test_a_deleted_local_root_is_recreated_with_a_warning(tmp_path: Path, ckpt, caplog) -> None:
    with _mgr(tmp_path, ckpt) as mgr:
        mgr.save(1, _state(1))
        mgr.wait_until_finished()
        shutil.rmtree(tmp_path / "local")  # a /dev/shm or tmp cleaner
        with caplog.at_level(logging.WARNING):
            assert mgr.save(2, _state(2)) is True
        mgr.wait_until_finished()
        assert mgr.save(5, _state(5)) is True
        mgr.wait_until_finished()
        assert [(r.step, r.tiers) for r in mgr.steps()] == [(2, ("local",)), (5, ("durable", "local"))]
    assert f"{tmp_path / 'local'} is gone" in caplog.text
    assert (tmp_path / "local" / "step-000000002" / METADATA_FILE).is_file()


# --- item 14: a local_root shared by nodes is refused ------------------------------------------------


def _shared_root(rank: int, world_size: int, base: str) -> None:
    _as_node(rank)
    ckpt = checkpoint.make_sync_checkpointer()
    try:
        checkpoint.CheckpointManager(
            f"{base}/durable", checkpointer=ckpt, local_root=f"{base}/nfs-local", local_address="127.0.0.1"
        )
    finally:
        ckpt.close()


def test_a_local_root_shared_by_two_nodes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RankFailures) as info:
        run_ranks(_shared_root, 2, str(tmp_path), timeout_secs=120)
    text = str(info.value)
    assert text.count("CheckpointPathError") >= 2 and f"local_root {tmp_path / 'nfs-local'}" in text
    assert "is shared by several nodes of this job" in text
    assert not [n for n in os.listdir(tmp_path / "nfs-local") if n.startswith(".shardsafe-node-")]


# --- item 9: a FIFO named like a shard file never freezes the server ---------------------------------


def test_a_fifo_is_refused_and_never_stalls_other_requests(tier: dict) -> None:  # noqa: F811
    _replicate(tier)
    fifo = "shard-0123456789ab-r00001-000.safetensors"
    os.mkfifo(tier["root"] / STEP / fifo)
    answers: list = []
    thread = threading.Thread(
        target=lambda: answers.append(
            _raw(tier["url"], f"GET /v1/files/{STEP}/{fifo} HTTP/1.1", tier["token"])
        )
    )
    thread.start()
    start = time.monotonic()
    held = client.list_node(tier["url"], tier["token"], node=1)  # answered while the FIFO request is out
    assert list(held) == [7] and time.monotonic() - start < 20
    thread.join(timeout=30)
    assert answers and answers[0][0] == 403 and "not a regular file" in answers[0][1]


# --- item 11: post_commit tries every node and names those that missed the marker --------------------


def test_post_commit_reaches_every_reachable_node_and_names_the_others(tier: dict, tmp_path: Path) -> None:  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    step = tmp_path / STEP
    step.mkdir()
    shutil.copy(tier["source"] / METADATA_FILE, step / METADATA_FILE)
    hook = ReplicaHook(node=0, targets=(), everyone=((1, dead), (2, tier["url"])), token=tier["token"])
    with pytest.raises(StorageError, match=rf"commit marker of {STEP} did not reach node\(s\) \[1\]"):
        hook.post_commit(str(step), rank=0)
    assert (tier["root"] / STEP / METADATA_FILE).read_bytes() == (step / METADATA_FILE).read_bytes()


# --- item 12: the default address is the one that routes to the master -------------------------------


def test_the_default_address_routes_to_the_master_and_the_variable_wins(monkeypatch) -> None:
    monkeypatch.delenv("SHARDSAFE_NODE_ADDR", raising=False)
    assert node_address(None, master="127.0.0.1") == "127.0.0.1"
    outside = route_to("192.0.2.77")  # any address beyond this host: the interface that routes there
    assert node_address(None, master="192.0.2.77") == outside and not outside.startswith("127.")
    monkeypatch.setenv("SHARDSAFE_NODE_ADDR", "10.1.2.3")
    assert node_address(None, master="192.0.2.77") == "10.1.2.3"
    assert node_address("10.9.9.9", master="192.0.2.77") == "10.9.9.9"
    # The refusal, as a rule (this VM cannot make a loopback route to a non-loopback master): a Debian
    # host name resolving to 127.0.1.1 while the master is 10.0.0.5 is refused, same-host loopback is not.
    refusal = loopback_refusal("127.0.1.1", "node-a.example", "10.0.0.5")
    assert (
        refusal is not None
        and "is loopback (127.0.1.1)" in str(refusal)
        and "SHARDSAFE_NODE_ADDR" in str(refusal)
    )
    assert loopback_refusal("127.0.1.1", "localhost", "127.0.0.1") is None
    assert loopback_refusal("10.0.0.7", "node-a.example", "10.0.0.5") is None


# --- item 13: a frozen peer costs a bounded time ------------------------------------------------------


def test_a_frozen_peer_read_ends_within_its_bound(monkeypatch) -> None:
    monkeypatch.setenv("SHARDSAFE_PEER_TIMEOUT_SECS", "1")
    listener = socket.create_server(
        ("127.0.0.1", 0)
    )  # accepts connections (the kernel does) and never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        storage = client.peer_storage(url, "token", STEP)
        start = time.monotonic()
        with pytest.raises(OSError):
            storage.read_bytes(METADATA_FILE)
        assert time.monotonic() - start < 15  # 2 attempts of 1 s and a short backoff; was up to 30 min
        start = time.monotonic()
        with pytest.raises(StorageError, match="cannot be reached"):  # a listing is bounded the same way
            client.list_node_tags(url, "token", node=1)
        assert time.monotonic() - start < 15
    finally:
        listener.close()


# --- item 15: the smaller ones -------------------------------------------------------------------------


def test_refusals_are_401_for_a_non_ascii_token_rate_limited_and_unpadded_steps_refused(
    tier: dict,  # noqa: F811
    caplog,
) -> None:
    host, port = tier["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"GET /v1/steps HTTP/1.1\r\nHost: x\r\n"
            + TOKEN_HEADER.encode()
            + b": \xc3\xa9t\xc3\xa9\r\nConnection: close\r\n\r\n"
        )
        reply = s.recv(65536)
    assert reply.split()[1] == b"401", reply
    with caplog.at_level(logging.WARNING, logger="checkpoint.tiers.server"):
        for _ in range(5):
            assert _raw(tier["url"], "GET /v1/steps HTTP/1.1", "wrong")[0] == 401
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) <= 1
    shard = _files(tier["source"])[0]
    status, body = _raw(tier["url"], f"PUT /v1/files/step-7/{shard} HTTP/1.1", tier["token"])
    assert status == 403 and "'step-7' is not a step directory" in body
    assert not (tier["root"] / "step-7").exists()


def test_replicas_have_the_mode_of_own_files(tier: dict) -> None:  # noqa: F811
    _replicate(tier)
    umask = os.umask(0)
    os.umask(umask)
    for name in _files(tier["source"]):
        assert (tier["root"] / STEP / name).stat().st_mode & 0o777 == 0o644 & ~umask, name


def test_ls_shows_local_world_size_and_time_and_load_of_a_local_only_step(tmp_path: Path, ckpt) -> None:
    with _mgr(tmp_path, ckpt) as mgr:
        for step in (5, 6, 7):
            mgr.save(step, _state(step))
        mgr.wait_until_finished()
        assert mgr.latest_step() == 7
    code, out, _ = _run("ls", str(tmp_path / "durable"), "--local-root", str(tmp_path / "local"), "--json")
    assert code == 0
    local = [s for s in json.loads(out)["steps"] if s["tiers"] == ["local"]]
    assert [s["step"] for s in local] == [6, 7]
    assert all(s["world_size"] == 1 and s["saved_at"] for s in local), local
    target = _state(-1)
    with _mgr(tmp_path, ckpt) as mgr:
        assert mgr.load(target, step=6) == 6  # only the local tier holds step 6
    assert target["n"] == 6 and torch.equal(target["w"], torch.full((4, 3), 6.0))


# --- item 8: recovery reads straight into the targets, from own disk and from peers -----------------


def test_recovery_reads_straight_into_targets_from_own_disk_and_peers(tier: dict) -> None:  # noqa: F811
    from checkpoint.load.loader import load_checkpoint
    from checkpoint.options import LoadOptions
    from checkpoint.tiers.holders import Holder, HolderStorage
    from planners.errors import InvalidCheckpointError
    from storage.local import LocalStorage

    _replicate(tier)
    names = _files(tier["source"])
    own, peer = LocalStorage(str(tier["source"])), client.peer_storage(tier["url"], tier["token"], STEP)
    # The first shard file from this node's disk, the rest (metadata too) from the peer.
    holders = {
        n: [Holder(node=0 if i == 0 else 1, url="", storage=own if i == 0 else peer)]
        for i, n in enumerate(names)
    }
    storage = HolderStorage("local tier step-000000007 (test view)", holders)
    assert callable(storage.read_ranges_into)  # the loader's straight-into-target path, for every file
    target = {"w": torch.zeros(64, 64), "b": torch.zeros(3), "n": None}
    w = target["w"]
    loaded, missing = load_checkpoint(storage, target, rank=0, world_size=1, options=LoadOptions())
    assert missing == [] and loaded["w"] is w  # filled in place
    assert torch.equal(w, tier["state"]["w"]) and torch.equal(loaded["b"], tier["state"]["b"])

    def refuse(index: int, start: int, data: memoryview) -> None:
        raise InvalidCheckpointError("part refused by its check")

    out = memoryview(bytearray(b"\x07" * 256))
    for name in (names[0], names[1]):  # own disk, then the peer: a refused part never lands
        with pytest.raises(InvalidCheckpointError, match="part refused"):
            storage.read_ranges_into(name, [(0, out)], align=1, check=refuse)
        assert bytes(out) == b"\x07" * 256
    storage.close()
