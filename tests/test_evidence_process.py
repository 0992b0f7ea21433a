"""The writer process and the trainer's signals (issue 22 case 6), and two first-hour items (issue 25).

Case 6: torchrun forwards SIGTERM to its whole process group and Ctrl-C sends SIGINT to the
foreground group. The writer processes must survive both (the trainer decides what they mean), and
must exit on their own once their trainer is gone. Each check runs a real trainer script in a child
process of its own session, so the signals reach no one else.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

_SIGNALLED_TRAINER = textwrap.dedent(
    """
    import os, signal, sys, threading, time, torch, checkpoint

    class BlockInPreCommit(checkpoint.CommitHook):
        def pre_commit(self, path, **kwargs):
            if path.endswith("/c"):
                print("BLOCKED", os.getpid(), flush=True)
                threading.Event().wait()  # the writer is busy when its trainer is killed

        def post_commit(self, path, **kwargs):
            pass

    def main():
        got = []
        done = threading.Event()
        def on_signal(signum, frame):
            got.append(signal.Signals(signum).name)
            if len(got) == 2:
                done.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        ckpt = checkpoint.make_async_checkpointer(commit_hook=BlockInPreCommit())
        ckpt.save({"w": torch.arange(10.0)}, sys.argv[1] + "/a")[1].result()
        before = ckpt.checkpoint_process.pid
        os.killpg(os.getpgrp(), signal.SIGTERM)  # as torchrun forwards a preemption notice
        os.killpg(os.getpgrp(), signal.SIGINT)  # as Ctrl-C in a terminal
        assert done.wait(30), got
        ckpt.save({"w": torch.arange(10.0) + 1}, sys.argv[1] + "/b")[1].result()
        print("RESULT", before, ckpt.checkpoint_process.pid, sorted(got), flush=True)
        ckpt.save({"w": torch.arange(10.0) + 2}, sys.argv[1] + "/c")
        threading.Event().wait()  # until SIGKILL

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.timeout(180)
def test_writer_ignores_the_trainers_group_signals_and_exits_once_the_trainer_is_gone(tmp_path: Path) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(_SIGNALLED_TRAINER)
    trainer = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,  # its own process group: the signals reach only the trainer and its children
    )
    try:
        assert trainer.stdout is not None
        result = trainer.stdout.readline().split()
        assert result[:1] == ["RESULT"], (result, trainer.wait(30))
        assert result[1] == result[2], result  # the same writer process served the save after the signals
        assert result[3:] == ["['SIGINT',", "'SIGTERM']"], result  # and the trainer got both
        blocked = trainer.stdout.readline().split()
        assert blocked == ["BLOCKED", result[1]], blocked
        fd = os.pidfd_open(int(result[1]))  # before the kill: the pid cannot be reused while we hold it
        trainer.kill()
        trainer.wait(30)
        readable, _, _ = select.select([fd], [], [], 30)  # waits for the writer's exit, no polling
        os.close(fd)
        assert readable, f"writer process {result[1]} still runs 30s after its trainer was killed mid-save"
    finally:
        trainer.kill()
        trainer.wait(30)


_UNGUARDED_SCRIPT = textwrap.dedent(
    """
    import sys, torch, checkpoint
    ckpt = checkpoint.make_async_checkpointer()
    _, write = ckpt.save({"w": torch.arange(10.0)}, sys.argv[1])
    write.result()
    """
)


@pytest.mark.timeout(120)
def test_an_async_checkpointer_without_a_main_guard_says_so_in_a_few_lines(tmp_path: Path) -> None:
    """Issue 25 item 6: one clear error naming the missing guard, not pages of multiprocessing tracebacks."""
    script = tmp_path / "train.py"
    script.write_text(_UNGUARDED_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=100,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 1, text  # the script's own write.result() raised
    last = text.strip().splitlines()[-1]
    assert last.startswith(
        "checkpoint.WriterProcessError: writer process of rank 0 could not start: "
    ), last
    assert f'{script} creates an async checkpointer outside `if __name__ == "__main__":`' in last, last
    assert "bootstrapping phase" not in text, text
    assert len(text.splitlines()) <= 25, text
    assert not (tmp_path / "ckpt").exists()  # the failed save took back the directory it created


_INTERRUPTED_SYNC_SAVE = textwrap.dedent(
    """
    import contextlib, os, sys, threading, torch, checkpoint
    import storage.local as local

    plain_open_write = local.LocalStorage.open_write

    @contextlib.contextmanager
    def open_write(self, name):  # the first write of a shard file stops mid-file until Ctrl-C arrives
        with plain_open_write(self, name) as f:
            class Stream:
                def __getattr__(self, attr):
                    return getattr(f, attr)
                def write(self, data):
                    n = f.write(data)
                    print("WRITING", flush=True)
                    threading.Event().wait()
                    return n
            yield Stream()

    if __name__ == "__main__":
        local.LocalStorage.open_write = open_write
        ckpt = checkpoint.make_sync_checkpointer()
        try:
            ckpt.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, sys.argv[1] + "/fresh/step-1")
        except KeyboardInterrupt:
            print("INTERRUPTED", sorted(os.listdir(sys.argv[1])), flush=True)
    """
)


@pytest.mark.timeout(120)
def test_ctrl_c_during_a_fresh_sync_save_removes_the_directories_it_created(tmp_path: Path) -> None:
    """Issue 25 item 16: a KeyboardInterrupt mid-write takes back the files, marker and new directories."""
    script = tmp_path / "train.py"
    script.write_text(_INTERRUPTED_SYNC_SAVE)
    root = tmp_path / "run"
    root.mkdir()
    child = subprocess.Popen(
        [sys.executable, str(script), str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "WRITING"
        child.send_signal(signal.SIGINT)
        assert child.stdout.readline().strip() == "INTERRUPTED []"
        assert child.wait(60) == 0
    finally:
        child.kill()
        child.wait(30)
    assert list(root.iterdir()) == []  # fresh/ and fresh/step-1/ went, with the partial file and the marker
