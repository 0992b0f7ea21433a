"""One storage suite, run against every backend: local disk, `memory://` and a real S3 server (SeaweedFS).

As fsspec's `tests/abstract` does for file systems, each test states a rule of the `CheckpointStorage`
protocol once, and the `backend` fixture runs it on each implementation, so a backend cannot quietly differ
(a missing file must be `FileNotFoundError` everywhere, a failed write must leave nothing everywhere). The S3
backend is configured with small parts so that multipart uploads and split range reads happen on test-sized
data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pytest

from planners.errors import CheckpointError, InvalidCheckpointError, NotADirectoryCheckpointError
from storage import CheckpointStorage, RetryPolicy, TransferConfig, open_storage
from storage.local import LocalStorage
from storage.remote import FsspecStorage

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
# 5 MiB parts (the S3 minimum) and 1 MiB read parts: 12 MiB of data is a 3-part upload and a split read.
SMALL_TRANSFER = TransferConfig(
    upload_part_bytes=5 * MiB,
    max_parts_in_flight=2,
    read_part_bytes=1 * MiB,
    retry=RetryPolicy(max_attempts=3, initial_backoff_secs=0.01, max_backoff_secs=0.05),
)
DATA = os.urandom(12 * MiB + 4321)


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    """Opens storages under one root of one backend."""

    kind: str
    root: str
    storage_options: dict | None = None

    def open(self, sub: str = "ckpt") -> CheckpointStorage:
        return open_storage(
            f"{self.root}/{sub}", storage_options=self.storage_options, transfer=SMALL_TRANSFER
        )


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, tmp_path) -> Iterator[Backend]:
    if request.param == "local":
        yield Backend(kind="local", root=str(tmp_path))
    elif request.param == "memory":
        root = f"memory://conformance-{uuid.uuid4().hex}"
        yield Backend(kind="memory", root=root)
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        yield Backend(
            kind="s3", root=request.getfixturevalue("s3_bucket"), storage_options=endpoint.storage_options
        )


@pytest.fixture
def storage(backend: Backend) -> Iterator[CheckpointStorage]:
    storage = backend.open()
    storage.prepare()
    yield storage
    storage.close()


def _write(storage: CheckpointStorage, name: str, data: bytes, *, piece: int = 3 * MiB + 1) -> None:
    with storage.open_write(name) as f:
        for start in range(0, len(data), piece):
            f.write(data[start : start + piece])


def test_backend_class_and_protocol(backend: Backend, storage: CheckpointStorage) -> None:
    expected = LocalStorage if backend.kind == "local" else FsspecStorage
    assert type(storage) is expected
    assert isinstance(storage, CheckpointStorage)
    assert storage.url.endswith("/ckpt")


def test_prepared_directory_is_empty(storage: CheckpointStorage) -> None:
    assert storage.list_names() == []
    assert storage.exists("metadata.json") is False


def test_list_names_of_a_missing_directory_is_empty(backend: Backend) -> None:
    assert backend.open("never-created").list_names() == []


def test_streamed_file_round_trips_exactly(storage: CheckpointStorage) -> None:
    _write(storage, "shard-a.safetensors", DATA)

    assert storage.read_bytes("shard-a.safetensors") == DATA
    assert storage.size("shard-a.safetensors") == len(DATA)
    assert storage.exists("shard-a.safetensors") is True
    assert storage.list_names() == ["shard-a.safetensors"]


def test_read_bytes_refuses_a_file_over_the_cap(storage: CheckpointStorage) -> None:
    _write(storage, "metadata.json", b"0123456789")

    with pytest.raises(
        InvalidCheckpointError, match=r"metadata\.json: holds at least 10 bytes, over the limit of 9 bytes"
    ):
        storage.read_bytes("metadata.json", max_bytes=9)
    assert storage.read_bytes("metadata.json", max_bytes=10) == b"0123456789"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("absent.json", max_bytes=10)


def test_small_and_empty_files(storage: CheckpointStorage) -> None:
    _write(storage, "small", b"0123456789")
    _write(storage, "empty", b"")

    assert storage.read_bytes("small") == b"0123456789"
    assert storage.read_bytes("empty") == b""
    assert storage.size("empty") == 0
    assert [bytes(v) for v in storage.read_ranges("empty", [(0, 0)])] == [b""]
    assert storage.list_names() == ["empty", "small"]


def test_read_ranges_returns_exact_writable_slices(storage: CheckpointStorage) -> None:
    _write(storage, "f", DATA)
    # Zero-length, one byte, across a read part boundary, longer than several read parts, the file's end.
    ranges = [(5, 0), (0, 1), (MiB - 10, 20), (3 * MiB + 7, 4 * MiB + 3), (len(DATA) - 9, 9)]

    views = storage.read_ranges("f", ranges)

    assert [bytes(v) for v in views] == [DATA[o : o + n] for o, n in ranges]
    assert [v.readonly for v in views] == [False] * len(ranges)


def test_read_past_the_end_is_invalid(storage: CheckpointStorage) -> None:
    _write(storage, "f", b"x" * 100)

    with pytest.raises(InvalidCheckpointError, match="/ckpt/f"):
        storage.read_ranges("f", [(95, 10)])
    with pytest.raises(InvalidCheckpointError, match="/ckpt/f"):
        storage.read_ranges("f", [(200, 5)])


def test_missing_file_is_file_not_found(storage: CheckpointStorage) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors") as read:
        storage.read_bytes("missing.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors") as stat:
        storage.size("missing.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors") as ranges:
        storage.read_ranges("missing.safetensors", [(0, 4)])

    assert [type(e.value) for e in (read, stat, ranges)] == [FileNotFoundError] * 3


def test_failed_write_leaves_nothing(storage: CheckpointStorage) -> None:
    # 6 MiB: on S3 the multipart upload has started (one 5 MiB part sent) when the producer fails.
    with pytest.raises(RuntimeError, match="producer failed"):
        with storage.open_write("shard-b.safetensors") as f:
            f.write(DATA[: 6 * MiB])
            raise RuntimeError("producer failed")

    assert storage.exists("shard-b.safetensors") is False
    assert storage.list_names() == []


def test_rewriting_a_file_replaces_it(storage: CheckpointStorage) -> None:
    _write(storage, "f", DATA)
    assert bytes(storage.read_ranges("f", [(0, 4)])[0]) == DATA[:4]  # local: the file is now memory-mapped

    _write(storage, "f", b"new")

    assert storage.read_bytes("f") == b"new"
    assert [bytes(v) for v in storage.read_ranges("f", [(0, 3)])] == [b"new"]


def test_publish_replaces_whole_and_leaves_no_temporary(storage: CheckpointStorage) -> None:
    storage.publish("metadata.json", b'{"v": 1}')
    storage.publish("metadata.json", b'{"v": 2, "longer": true}')

    assert storage.read_bytes("metadata.json") == b'{"v": 2, "longer": true}'
    assert storage.list_names() == ["metadata.json"]


def test_remove_ignores_absent_files(storage: CheckpointStorage) -> None:
    _write(storage, "a", b"a")
    _write(storage, "b", b"b")

    storage.remove(["a", "never-written"])

    assert storage.list_names() == ["b"]
    assert storage.exists("a") is False


def test_prepare_refuses_a_file(backend: Backend, storage: CheckpointStorage) -> None:
    _write(storage, "taken", b"a file, not a checkpoint directory")
    on_file = backend.open("ckpt/taken")

    with pytest.raises(CheckpointError, match="is a file, not a directory") as e:
        on_file.prepare()

    assert type(e.value) is NotADirectoryCheckpointError and isinstance(e.value, NotADirectoryError)
    assert "ckpt/taken" in str(e.value)


def test_remove_created_dirs_keeps_what_holds_files_or_existed_before(
    backend: Backend, storage: CheckpointStorage
) -> None:
    _write(storage, "kept", b"abc")
    again = backend.open()  # the directory exists: this one created nothing
    again.prepare()
    again.remove_created_dirs()
    assert storage.read_bytes("kept") == b"abc"
    fresh = backend.open("fresh/deeper")
    fresh.prepare()
    _write(fresh, "f", b"x")
    fresh.remove_created_dirs()  # not empty: stays
    assert fresh.read_bytes("f") == b"x"
    fresh.remove(["f"])
    fresh.remove_created_dirs()  # empty now: local disk removes both levels it made
    assert fresh.exists("f") is False
    if backend.kind == "local":
        assert not os.path.exists(os.path.join(backend.root, "fresh"))


def test_close_is_idempotent(storage: CheckpointStorage) -> None:
    _write(storage, "f", b"abc")
    assert bytes(storage.read_ranges("f", [(1, 2)])[0]) == b"bc"

    storage.close()
    storage.close()

    assert storage.read_bytes("f") == b"abc"  # closing drops cached handles, not the ability to read
