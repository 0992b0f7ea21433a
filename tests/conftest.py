"""Shared fixtures: the real S3 server (SeaweedFS) for the storage suite and the S3 round-trip tests.

The server starts once per session (about 3 s) and each test gets a bucket of its own, so tests never see each
other's objects. Where the server cannot start the S3 tests skip with the reason, except in CI (``CI=true``),
where a missing S3 server must fail the run instead of silently shrinking it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import s3fs

from checkpoint.testing.s3server import S3Endpoint, S3ServerError, SeaweedS3Server


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A SeaweedFS S3 gateway on 127.0.0.1, shared by the session; stopped (whole process group) at the end."""
    server = SeaweedS3Server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        endpoint = server.start()
    except S3ServerError as e:
        server.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"SeaweedFS S3 server did not start (CI=true, so this fails rather than skips): {e}")
        pytest.skip(f"SeaweedFS S3 server did not start: {e}")
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_fs(s3_endpoint: S3Endpoint) -> s3fs.S3FileSystem:
    """An s3fs filesystem for the test server, with no listing cache shared with other instances."""
    return s3fs.S3FileSystem(
        **s3_endpoint.storage_options, skip_instance_cache=True, use_listings_cache=False
    )


@pytest.fixture
def s3_bucket(s3_fs: s3fs.S3FileSystem) -> Iterator[str]:
    """A new, empty bucket for this test, as ``s3://name``; deleted with its contents afterwards."""
    name = f"test-{uuid.uuid4().hex}"
    s3_fs.mkdir(name)
    yield f"s3://{name}"
    # The server allows deleting a non-empty bucket; this also drops the bucket's SeaweedFS collection (volume).
    s3_fs.rmdir(name)
