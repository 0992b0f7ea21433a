"""A small sample of the randomized crash campaign (`benchmarks/crash_campaign.py`), on disk and on S3.

Each iteration is a real two-rank async `CheckpointManager` job SIGKILLed at a random moment and resumed
by the next one; the campaign fails on a resume older than a step any rank was told is saved, on a
resume whose values are not exactly its step's, and on a committed, retained step that lost a file.
The full campaign (500 iterations per backend) is a benchmark, not a test.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from benchmarks.crash_campaign import run_campaign
from checkpoint.testing.s3server import S3Endpoint

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

ITERATIONS = 2
WINDOW_SECS = 3.0


def _assert_passed(result) -> None:
    assert result.failures == [], result
    assert result.passed and result.iterations == ITERATIONS, result
    assert result.resumes_checked == 2 * (ITERATIONS + 1), result  # both ranks of every job resumed
    assert result.jobs_failed == result.committed_lost == result.resume_older_than_told == 0, result
    assert result.steps_told_saved > 0, result  # the even iteration is killed only after a told save


def test_crash_campaign_sample_on_disk(tmp_path: Path) -> None:
    _assert_passed(
        run_campaign(
            backend="disk",
            root=str(tmp_path / "run"),
            options=None,
            iterations=ITERATIONS,
            window_secs=WINDOW_SECS,
            seed=1,
        )
    )


@pytest.mark.s3
def test_crash_campaign_sample_on_s3(s3_endpoint: S3Endpoint, s3_bucket: str) -> None:
    _assert_passed(
        run_campaign(
            backend="s3",
            root=f"{s3_bucket}/{uuid.uuid4().hex}",
            options=s3_endpoint.storage_options,
            iterations=ITERATIONS,
            window_secs=WINDOW_SECS,
            seed=2,
        )
    )
