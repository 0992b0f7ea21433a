"""Checkpoint operations on hostile input, run in a child process under a memory and a time budget.

A hostile metadata file that makes the library allocate without bound must not take the test
run (or the machine) down with it, so each operation runs in a long-lived worker process whose
address space is capped (`resource.RLIMIT_AS`, `ADDRESS_SPACE_BUDGET_BYTES` beyond what the
worker holds once torch and the library are imported) and which is killed when one operation
runs past its time budget. The worker is reused across operations (starting one costs about a
second of torch import) and restarted after it dies or is killed.

Each request is one JSON line {"op", "path"}; each answer one JSON line: "ok" with the result,
or "error" with the exception's class names (its MRO) and message, and the seconds it took.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Address space a worker may add to what it holds after its imports (about 0.7 GiB with torch).
ADDRESS_SPACE_BUDGET_BYTES = 3 << 29  # 1.5 GiB
# Wall-clock seconds one operation may take before its worker is killed.
TIME_BUDGET_SECONDS = 10.0
# Seconds a fresh worker may take to import torch and the library (a loaded CI machine is slow).
_START_SECONDS = 120.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one operation ended in: "ok", "error" (raised), "timeout" (killed) or "died" (worker exited)."""

    kind: str
    classes: tuple[str, ...] = ()  # the exception's class and its bases, most derived first
    message: str = ""
    result: Any = None
    seconds: float = 0.0


class LimitedWorker:
    """A worker process evaluating operations one at a time; restarted whenever it dies or is killed."""

    def __init__(self, *, time_budget: float = TIME_BUDGET_SECONDS) -> None:
        self.time_budget = time_budget
        self._proc: subprocess.Popen | None = None

    def run(self, op: str, path: str) -> Outcome:
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"op": op, "path": path}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:  # the worker died after its last answer
            self.close()
            return Outcome(kind="died", message="the worker exited before the request")
        start = time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], self.time_budget)
        if not ready:
            self.close()
            return Outcome(kind="timeout", seconds=time.monotonic() - start)
        line = proc.stdout.readline()
        if not line:
            self.close()
            return Outcome(kind="died", message=f"exit status {proc.wait()}")
        answer = json.loads(line)
        return Outcome(
            kind=answer["kind"],
            classes=tuple(answer.get("classes", ())),
            message=answer.get("message", ""),
            result=answer.get("result"),
            seconds=answer["seconds"],
        )

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.limited_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        ready, _, _ = select.select([self._proc.stdout], [], [], _START_SECONDS)
        if not ready or self._proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"the limited worker did not start within {_START_SECONDS} s")
        return self._proc

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            with contextlib.suppress(BrokenPipeError):  # unflushed bytes for a dead worker
                self._proc.stdin.close()
            self._proc.stdout.close()
            self._proc = None


def _operation(op: str, path: str) -> Any:
    """Run one operation on the checkpoint (or run root) at `path`; its JSON-able result."""
    import tempfile

    import torch

    import checkpoint
    from checkpoint.load.loader import read_metadata
    from checkpoint.tools.cli import inspect_document
    from checkpoint.tools.diff import diff_checkpoints
    from checkpoint.tools.hf_export import export_hf
    from storage.spec import StorageSpec

    if op == "load":
        checkpoint.make_sync_checkpointer().load(path)
        return None
    if op == "verify":
        checkpoint.verify(path).raise_if_failed()
        return None
    if op == "diff":
        return diff_checkpoints(path, path).identical
    if op == "export":
        with tempfile.TemporaryDirectory() as out:
            return export_hf(path, out).total_bytes
    if op == "inspect":
        storage = StorageSpec.resolve(path).open()
        try:
            doc = inspect_document(storage.url, read_metadata(storage), None, None)
        finally:
            storage.close()
        return {t["key"]: [t["chunks"], t["nbytes"]] for t in doc["tensors"]}
    if op == "resume":  # a run root: the manager resumes from the newest step that loads
        mgr = checkpoint.CheckpointManager(path, checkpointer=checkpoint.make_sync_checkpointer())
        try:
            return mgr.load({"w": torch.zeros(4)})
        finally:
            mgr.close()
    raise ValueError(f"unknown operation {op!r}")


def _serve() -> None:
    """The worker's loop: cap the address space once imported, then answer requests until stdin closes."""
    import resource

    import psutil

    import checkpoint  # noqa: F401  (imported before the cap: the budget counts only what an operation adds)
    import checkpoint.tools.cli  # noqa: F401
    import checkpoint.tools.hf_export  # noqa: F401

    limit = psutil.Process().memory_info().vms + ADDRESS_SPACE_BUDGET_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        try:
            answer = {"kind": "ok", "result": _operation(request["op"], request["path"])}
        except Exception as e:  # reported to the parent, which judges the class
            answer = {
                "kind": "error",
                "classes": [c.__name__ for c in type(e).__mro__],
                "message": str(e)[:2000],
            }
        answer["seconds"] = time.perf_counter() - start
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
