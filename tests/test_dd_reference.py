"""benchmarks/dd_reference.py deletes only what it made: its own temporary directory, made by mkdtemp.

A directory with the same prefix that someone else made (a name is not evidence) and any other
file of the working directory survive; the process exits 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dd_reference_removes_its_own_directory_and_nothing_else(tmp_path: Path) -> None:
    foreign = tmp_path / "dd-reference-someone-else"
    foreign.mkdir()
    (foreign / "file.bin").write_bytes(b"keep")
    (tmp_path / "notes.txt").write_text("keep")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.dd_reference", "--mib", "16", "--repeats", "1"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "python, random, writeback every 16 MiB" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dd-reference-someone-else", "notes.txt"]
    assert (foreign / "file.bin").read_bytes() == b"keep"
