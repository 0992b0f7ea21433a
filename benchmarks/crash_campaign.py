"""A randomized crash campaign: a 2-rank async `CheckpointManager` loop, SIGKILLed at random moments and resumed.

Each iteration starts a fresh job of two real gloo ranks (forkserver children, so a rank starts in well
under a second; each spawns its own async writer process). The job resumes from the run's newest
complete step (`CheckpointManager.load`), checks the values it got bit for bit, then trains: every step
changes the state, saves it (`keep_last=2`) and waits until the save is committed, and only then writes
"saved <step>" to its ledger. The driver SIGKILLs both ranks at a random moment (uniform within
`--window-secs` of the resume, or, every other iteration, of the first step the job was told is saved,
so it lands in staging, writing, the commit, the clean-up or retention);
their writer processes exit on their own once their trainer is gone.

An iteration passes only if:

- the resume found a checkpoint, with exactly the values of its step, no older than the newest step any
  rank was ever told is saved (so no partial checkpoint was selected: a partial one cannot load exactly);
- after the kill, the newest step any rank was told is saved, and every complete step newer than it,
  still verifies (`checkpoint.verify` reads every file its metadata names): nothing committed and
  retained is lost.

Run (each backend gets `--iterations`; S3 uses a SeaweedFS server of its own):

    python -m benchmarks.crash_campaign --iterations 500 --backend disk --backend s3
    python -m benchmarks.crash_campaign --iterations 20 --out benchmarks/results/crash_campaign.json

`tests/test_crash_campaign_sample.py` runs a few iterations of each backend in the suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import checkpoint
from checkpoint import CheckpointerConfig, CheckpointManager
from checkpoint.manager.steps import step_dir_name
from checkpoint.testing.ranks import free_port

WORLD_SIZE = 2
ROWS, COLS = 64, 256  # a small state: the campaign is about the commit sequence, not throughput
START_TIMEOUT_SECS = 120.0  # a job's ranks must have resumed within this (writer start-up included)
CHECK_TIMEOUT_SECS = 120.0


def expected(step: int) -> torch.Tensor:
    """The full tensor a run holds after `step` (0: before the first step)."""
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + step


@dataclass(kw_only=True)
class CampaignResult:
    """Counts of one backend's campaign."""

    backend: str
    iterations: int = 0
    resumes_checked: int = 0
    resumed_from_nothing: int = 0
    resume_older_than_told: int = 0
    resume_wrong_values: int = 0
    committed_lost: int = 0
    jobs_failed: int = 0
    steps_told_saved: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not (
            self.resume_older_than_told or self.resume_wrong_values or self.committed_lost or self.jobs_failed
        )


def _rank_main(
    rank: int, port: int, root: str, options: dict | None, ledger: str, started: Any, first_saved: Any
) -> None:
    """One rank of one job: resume, check, then train and save until killed."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE)
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    ckpt = checkpoint.make_async_checkpointer(CheckpointerConfig(storage_options=options))
    mgr = CheckpointManager(root, checkpointer=ckpt, keep_last=2)
    state = {"w": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)]), "step": -1}
    resumed = mgr.load(state)
    full = state["w"].full_tensor()
    exact = resumed is not None and state["step"] == resumed and torch.equal(full, expected(resumed))
    with open(ledger, "a") as f:
        f.write(
            f"resumed {resumed if resumed is not None else 'none'} {'exact' if exact or resumed is None else 'WRONG'}\n"
        )
    # The kill window opens once the writer process is up (its start-up is not what the campaign tests).
    ckpt.checkpoint_process._executor.submit(lambda: None).result()
    started.set()
    step = resumed or 0
    while True:
        step += 1
        state = {"w": distribute_tensor(expected(step), mesh, [Shard(0)]), "step": step}
        mgr.save(step, state)
        mgr.wait_until_finished()  # committed: only now is this rank told the step is saved
        with open(ledger, "a") as f:
            f.write(f"saved {step}\n")
        first_saved.set()


def _read_ledger(path: Path) -> tuple[list[tuple[str, str]], list[int]]:
    resumes, saved = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["resumed"] and len(parts) == 3:
                resumes.append((parts[1], parts[2]))
            elif parts[:1] == ["saved"] and len(parts) == 2:
                saved.append(int(parts[1]))
    return resumes, saved


def _complete_steps(root: str, options: dict | None) -> list[int]:
    reader = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))
    try:
        mgr = CheckpointManager(root, checkpointer=reader)
        steps = [r.step for r in mgr.steps() if r.complete]
        mgr.close()
    finally:
        reader.close()
    return steps


def _kill_job(procs: list[Any]) -> None:
    for proc in procs:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.join(30)


def run_campaign(
    *, backend: str, root: str, options: dict | None, iterations: int, window_secs: float, seed: int
) -> CampaignResult:
    """`iterations` kill-and-resume rounds on one run root; a final resume checks the last kill too."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "checkpoint"])
    rng = random.Random(seed)
    result = CampaignResult(backend=backend)
    ledgers = Path(tempfile.mkdtemp(prefix="shardsafe-crash-ledgers-"))
    told_newest = 0  # the newest step any rank was ever told is saved
    for i in range(iterations + 1):
        last = i == iterations  # the final round only resumes and checks
        ledger_files = [ledgers / f"iter{i}-rank{r}.txt" for r in range(WORLD_SIZE)]
        port = free_port()
        events = [ctx.Event() for _ in range(WORLD_SIZE)]
        first_saved = ctx.Event()
        procs = [
            ctx.Process(
                target=_rank_main, args=(r, port, root, options, str(ledger_files[r]), events[r], first_saved)
            )
            for r in range(WORLD_SIZE)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + START_TIMEOUT_SECS
        started = all(e.wait(max(0.0, deadline - time.monotonic())) for e in events)
        if started and not last:
            # Odd iterations: the window opens at the resume, so kills land in the first save too (its
            # staging, writing, commit); even ones: once a save was told, so every run makes progress
            # however slow the storage is.
            if i % 2 == 0:
                first_saved.wait(START_TIMEOUT_SECS)
            alive = [p.sentinel for p in procs]
            multiprocessing.connection.wait(alive, timeout=rng.uniform(0.0, window_secs))
        _kill_job(procs)
        if not started:
            result.jobs_failed += 1
            result.failures.append(f"iteration {i}: the job did not resume within {START_TIMEOUT_SECS:.0f}s")
            continue
        result.iterations += 0 if last else 1
        read = [_read_ledger(ledger) for ledger in ledger_files]
        for resumes, _ in read:  # checked against what was told before this job started
            for resumed, how in resumes:
                result.resumes_checked += 1
                _check_resume(result, i, resumed, how, told_newest)
        for _, saved in read:
            result.steps_told_saved += len(saved)
            told_newest = max([told_newest, *saved])
        if told_newest:
            lost = _lost_steps(root, options, told_newest)
            result.committed_lost += len(lost)
            result.failures.extend(f"iteration {i}: committed step {s} lost files" for s in lost)
    return result


def _check_resume(result: CampaignResult, i: int, resumed: str, how: str, told_newest: int) -> None:
    if resumed == "none":
        result.resumed_from_nothing += 1
        if told_newest > 0:
            result.resume_older_than_told += 1
            result.failures.append(f"iteration {i}: resumed from nothing after step {told_newest} was saved")
        return
    if int(resumed) < told_newest:
        result.resume_older_than_told += 1
        result.failures.append(f"iteration {i}: resumed step {resumed}, older than saved step {told_newest}")
    if how != "exact":
        result.resume_wrong_values += 1
        result.failures.append(f"iteration {i}: step {resumed} loaded with wrong values")


def _lost_steps(root: str, options: dict | None, told_newest: int) -> list[int]:
    """Steps that must be intact (the newest told saved, and any complete one newer) but do not verify."""
    complete = _complete_steps(root, options)
    must = sorted({told_newest, *(s for s in complete if s > told_newest)})
    lost = []
    for step in must:
        path = f"{root.rstrip('/')}/{step_dir_name(step)}"
        try:
            ok = checkpoint.verify(path, storage_options=options).ok
        except Exception:
            ok = False
        if not ok:
            lost.append(step)
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=500, help="kill-and-resume rounds per backend")
    parser.add_argument("--backend", action="append", choices=("disk", "s3"), help="default: both")
    parser.add_argument("--window-secs", type=float, default=6.0, help="kills land uniformly in this window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the counts as JSON here")
    args = parser.parse_args()
    results = []
    for backend in args.backend or ["disk", "s3"]:
        results.append(_run_backend(backend, args))
        print(json.dumps(asdict(results[-1]) | {"passed": results[-1].passed}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([asdict(r) | {"passed": r.passed} for r in results], indent=1) + "\n")
    raise SystemExit(0 if all(r.passed for r in results) else 1)


def _run_backend(backend: str, args: argparse.Namespace) -> CampaignResult:
    work = Path(tempfile.mkdtemp(prefix="shardsafe-crash-"))
    if backend == "disk":
        return run_campaign(
            backend=backend,
            root=str(work / "run"),
            options=None,
            iterations=args.iterations,
            window_secs=args.window_secs,
            seed=args.seed,
        )
    import s3fs

    from checkpoint.testing.s3server import SeaweedS3Server

    server = SeaweedS3Server(work / "seaweedfs")
    try:
        endpoint = server.start()
        bucket = f"crash-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**endpoint.storage_options, skip_instance_cache=True).mkdir(bucket)
        return run_campaign(
            backend=backend,
            root=f"s3://{bucket}/run",
            options=endpoint.storage_options,
            iterations=args.iterations,
            window_secs=args.window_secs,
            seed=args.seed,
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
