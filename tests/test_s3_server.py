"""Tests of the S3 test server itself: exact bytes through s3fs, ranged reads, multipart uploads, signed requests."""

from __future__ import annotations

import os
import time

import pytest
import s3fs

from checkpoint.testing.s3server import S3Endpoint
from checkpoint.testing.throttle import throttled_link

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]

MiB = 1 << 20


def test_put_then_get_returns_exact_bytes(s3_fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    data = bytes(range(256)) * 64 + b"tail"
    path = f"{s3_bucket}/ckpt/shard-00000.safetensors"

    s3_fs.pipe(path, data)

    assert s3_fs.cat(path) == data
    assert s3_fs.info(path)["size"] == len(data)
    assert s3_fs.ls(f"{s3_bucket}/ckpt", detail=False) == [path.removeprefix("s3://")]


def test_cat_ranges_returns_exact_slices(s3_fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    data = os.urandom(1 * MiB + 123)
    path = f"{s3_bucket}/shard.bin"
    s3_fs.pipe(path, data)
    ranges = [(0, 1), (10, 4096), (MiB - 7, MiB + 100), (len(data) - 5, len(data)), (300, 301)]

    slices = s3_fs.cat_ranges([path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges])

    assert slices == [data[start:end] for start, end in ranges]


def test_multipart_upload_round_trips_exactly(s3_fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    data = os.urandom(12 * MiB + 4321)
    path = f"{s3_bucket}/big/shard.bin"

    # Written in 1 MiB pieces so s3fs sends a 5 MiB part each time its buffer fills: parts of 5, 5 and 2 MiB.
    with s3_fs.open(path, "wb", block_size=5 * MiB) as f:
        for start in range(0, len(data), MiB):
            f.write(data[start : start + MiB])

    info = s3_fs.info(path)
    assert info["size"] == len(data)
    assert info["ETag"].strip('"').endswith("-3")  # an S3 multipart ETag ends with the part count
    assert s3_fs.cat(path) == data
    assert s3_fs.cat_file(path, start=5 * MiB - 10, end=5 * MiB + 10) == data[5 * MiB - 10 : 5 * MiB + 10]


def test_each_test_gets_a_new_empty_bucket(s3_fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    assert s3_bucket.startswith("s3://test-")
    assert s3_fs.ls(s3_bucket, detail=False) == []


def test_missing_key_raises_file_not_found(s3_fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    with pytest.raises(FileNotFoundError):
        s3_fs.cat(f"{s3_bucket}/no-such-shard.safetensors")


def test_requests_are_authenticated(s3_endpoint: S3Endpoint, s3_bucket: str) -> None:
    options = s3_endpoint.storage_options
    wrong_secret = s3fs.S3FileSystem(**{**options, "secret": "not-the-secret"}, skip_instance_cache=True)
    anonymous = s3fs.S3FileSystem(anon=True, client_kwargs=options["client_kwargs"], skip_instance_cache=True)

    with pytest.raises(PermissionError, match="signature we calculated does not match"):
        wrong_secret.ls(s3_bucket)
    with pytest.raises(PermissionError, match="Access Denied"):
        anonymous.ls(s3_bucket)


def test_throttled_link_caps_one_connection_and_keeps_the_bytes(
    s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    data = os.urandom(2 * MiB)
    bytes_per_s = 4e6
    with throttled_link(s3_endpoint.endpoint_url, bytes_per_s) as url:
        options = s3_endpoint.storage_options
        fs = s3fs.S3FileSystem(
            **{**options, "client_kwargs": {**options["client_kwargs"], "endpoint_url": url}},
            skip_instance_cache=True,
        )
        start = time.monotonic()
        fs.pipe(f"{s3_bucket}/slow.bin", data)  # one PUT: one connection
        elapsed = time.monotonic() - start
        assert fs.cat(f"{s3_bucket}/slow.bin") == data

    # 2 MiB at 4 MB/s cannot take less than ~0.52 s, however idle the machine (no upper bound: it may be loaded).
    assert elapsed >= 0.9 * len(data) / bytes_per_s


def test_throttled_link_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="bytes_per_s must be > 0, got 0"):
        with throttled_link("http://127.0.0.1:1", 0):
            pass
