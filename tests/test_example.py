"""The README's demo: the FSDP2 example trains on 2 torchrun ranks and resumes exactly on 3."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from checkpoint.testing.ranks import free_port

pytestmark = pytest.mark.multiproc

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "fsdp2_resume.py"
)


def _torchrun(nproc: int, phase: str, directory: str) -> str:
    port = str(free_port())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        port,
    ]
    result = subprocess.run(
        [*cmd, EXAMPLE, "--phase", phase, "--dir", directory], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_fsdp2_example_resumes_on_three_ranks_exactly(tmp_path):
    train = _torchrun(2, "train", str(tmp_path))
    assert "[train] 2 ranks: saved" in train
    resume = _torchrun(3, "resume", str(tmp_path))
    assert "[resume] 3 ranks:" in resume
    assert "parameters and AdamW state match exactly=True" in resume
    assert "match exactly=True; parameter drift" in resume
