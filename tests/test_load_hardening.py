"""Load-side hardening: the metadata digest, strict metadata JSON, the file-opening rules and the size cap.

Every single-bit flip of a small checkpoint's files is tried: a flip is
either refused, blaming the file that holds it, or changes nothing that is
loaded. Files of a checkpoint must be regular files inside it: links, FIFOs
and devices are refused at once, and the metadata's size is capped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import pytest
import torch

import checkpoint
from checkpoint.config import CheckpointerConfig, CheckpointReaderConfig
from checkpoint.load.direct_read import VERIFIED_WINDOW_BLOCKS
from checkpoint.load.loader import LoadOptions, load_checkpoint
from planners.digest import seal
from planners.errors import CorruptCheckpointError, InvalidCheckpointError
from planners.metadata import CHECKSUM_BLOCK_BYTES, METADATA_FILE
from storage.local import LocalStorage
from tests.damage import flipped_in_place, private_copy, put_file, read_file

STEP, LR = 1234, 0.0003


def _state() -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5},
        "step": STEP,
        "lr": LR,
        "nan": float("nan"),
        "ninf": float("-inf"),
        "cfg": {"betas": (0.9, 0.95), "name": "run"},
    }


def _assert_exact(loaded: dict[str, Any]) -> None:
    expected = _state()
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert (loaded["step"], loaded["lr"], loaded["cfg"]) == (STEP, LR, expected["cfg"])
    assert type(loaded["step"]) is int and type(loaded["cfg"]["betas"]) is tuple
    assert math.isnan(loaded["nan"]) and loaded["ninf"] == float("-inf")


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("hardening") / "ckpt")
    checkpoint.make_sync_checkpointer().save(_state(), path)
    return path


@pytest.fixture
def work(original: str, tmp_path) -> str:
    path = str(tmp_path / "ckpt")
    return private_copy(original, path)


def _shard(path: str) -> str:
    (name,) = [n for n in os.listdir(path) if n.startswith("shard-")]
    return name


# ---- the metadata digest ---------------------------------------------------------------------


def test_typed_values_survive_and_the_metadata_is_sealed(original):
    _assert_exact(checkpoint.make_sync_checkpointer().load(original))
    doc = json.loads(read_file(original, METADATA_FILE))
    assert doc["version"] == 2 and doc["digest"].startswith("sha256:")
    assert checkpoint.verify(original).ok


def test_every_metadata_bit_flip_is_refused_blaming_the_metadata(original, work):
    """Each of the file's bits flipped alone: refused naming metadata.json, or nothing loaded changes."""
    raw, shard = read_file(original, METADATA_FILE), _shard(original)
    ckpt = checkpoint.make_sync_checkpointer()
    refused = 0
    for bit in flipped_in_place(work, METADATA_FILE, raw):
        try:
            loaded = ckpt.load(work)
        except InvalidCheckpointError as e:
            message = str(e)
            assert METADATA_FILE in message and shard not in message, (bit, message)
            refused += 1
            continue
        _assert_exact(loaded)
    # Only flips that keep the content (e.g. a digit's case in an exponent) may load; none here does.
    assert refused == len(raw) * 8


def test_a_flipped_stored_checksum_blames_the_metadata_not_the_shard(work):
    doc = json.loads(read_file(work, METADATA_FILE))
    crc = doc["tensors"]["model.w"]["chunks"][0]["crc32c"][0]
    raw = read_file(work, METADATA_FILE).replace(
        f'"crc32c":[{crc}]'.encode(), f'"crc32c":[{crc ^ 1}]'.encode()
    )
    put_file(work, METADATA_FILE, raw)
    with pytest.raises(CorruptCheckpointError, match="metadata.json: the metadata does not match its digest"):
        checkpoint.make_sync_checkpointer().load(work)
    report = checkpoint.verify(work)
    assert len(report.problems) == 1 and "metadata.json" in report.problems[0]


def test_every_shard_bit_flip_is_refused_blaming_the_shard(original, work):
    """Data flips fail the load; header flips change nothing a load reads; verify reports every flip."""
    shard = _shard(original)
    raw = read_file(original, shard)
    ckpt = checkpoint.make_sync_checkpointer()
    for bit in flipped_in_place(work, shard, raw):
        try:
            _assert_exact(ckpt.load(work))
        except InvalidCheckpointError as e:
            assert shard in str(e), (bit, str(e))
        report = checkpoint.verify(work)
        assert report.problems and all(shard in p for p in report.problems), (bit, report.problems)


def test_an_unsealed_version_2_metadata_is_refused(work):
    doc = json.loads(read_file(work, METADATA_FILE))
    del doc["digest"]
    put_file(work, METADATA_FILE, json.dumps(doc).encode())
    with pytest.raises(CorruptCheckpointError, match="metadata.json: the metadata digest is missing"):
        checkpoint.make_sync_checkpointer().load(work)


def test_a_reformatted_metadata_file_keeps_its_digest(work):
    """The digest covers the canonical JSON, so re-indenting the file by hand keeps it loadable."""
    doc = json.loads(read_file(work, METADATA_FILE))
    put_file(work, METADATA_FILE, json.dumps(doc, indent=2).encode())
    _assert_exact(checkpoint.make_sync_checkpointer().load(work))


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda raw: raw[:-1] + b',"world_size":1}', "key 'world_size' appears twice in one object"),
        (lambda raw: raw.replace(b'"step":1234', b'"step":1234,"step":1334'), "key 'step' appears twice"),
        (lambda raw: raw.replace(b'"lr":0.0003', b'"lr":NaN'), "NaN is not a JSON number"),
        (lambda raw: raw.replace(b'"lr":0.0003', b'"lr":-Infinity'), "-Infinity is not a JSON number"),
    ],
    ids=["duplicate-top", "duplicate-value", "nan", "infinity"],
)
def test_duplicate_keys_and_nan_literals_are_refused(work, edit, pattern):
    raw = read_file(work, METADATA_FILE)
    edited = edit(raw)
    assert edited != raw
    put_file(work, METADATA_FILE, edited)
    with pytest.raises(InvalidCheckpointError, match=f"metadata.json: metadata is not valid JSON: {pattern}"):
        checkpoint.make_sync_checkpointer().load(work)


# ---- overlapping byte ranges -----------------------------------------------------------------


def test_chunks_sharing_file_bytes_are_refused_before_allocating(tmp_path):
    """A 1 MiB file whose 256 chunks all point at the same bytes would load as a 256 MiB tensor."""
    path = str(tmp_path / "amplified")
    n, copies = 256 * 1024, 256
    checkpoint.make_sync_checkpointer().save({"w": torch.ones(n)}, path)
    doc = json.loads(read_file(path, METADATA_FILE))
    (chunk,) = doc["tensors"]["w"]["chunks"]
    # Every chunk's bytes and checksums are real: only the sharing of bytes is wrong.
    doc["tensors"]["w"] = {
        "dtype": "float32",
        "shape": [n * copies],
        "chunks": [dict(chunk, offsets=[i * n]) for i in range(copies)],
    }
    put_file(path, METADATA_FILE, seal(doc))
    assert os.path.getsize(os.path.join(path, chunk["file"])) < 1.1 * 2**20
    pattern = (
        rf"metadata\.json: invalid metadata: file {chunk['file']}: the bytes of key 'w' from offset "
        rf"{chunk['offset_bytes']} overlap those of key 'w'"
    )
    with pytest.raises(InvalidCheckpointError, match=pattern):
        checkpoint.make_sync_checkpointer().load(path)
    with pytest.raises(InvalidCheckpointError, match=pattern):
        checkpoint.make_sync_checkpointer().load(path, {"w": torch.zeros(n * copies)})
    report = checkpoint.verify(path)
    assert len(report.problems) == 1 and "overlap those of key 'w'" in report.problems[0]


# ---- which files a local load opens ----------------------------------------------------------


@pytest.mark.parametrize("verify", [False, True])
def test_a_shard_linked_outside_the_checkpoint_is_refused(work, tmp_path, verify):
    shard = _shard(work)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(os.path.join(work, shard), outside)  # the same bytes: only the link is wrong
    os.remove(os.path.join(work, shard))
    os.symlink(outside, os.path.join(work, shard))
    with pytest.raises(InvalidCheckpointError, match=f"{shard}: is a symbolic link"):
        checkpoint.make_sync_checkpointer().load(work, verify=verify)
    report = checkpoint.verify(work)
    assert len(report.problems) == 1 and "is a symbolic link" in report.problems[0]


def test_a_metadata_file_linked_outside_is_refused(work, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(os.path.join(work, METADATA_FILE), outside)
    os.remove(os.path.join(work, METADATA_FILE))
    os.symlink(outside, os.path.join(work, METADATA_FILE))
    with pytest.raises(InvalidCheckpointError, match="metadata.json: is a symbolic link"):
        checkpoint.make_sync_checkpointer().load(work)
    os.remove(os.path.join(work, METADATA_FILE))
    os.symlink("/dev/zero", os.path.join(work, METADATA_FILE))
    with pytest.raises(InvalidCheckpointError, match="metadata.json: is a symbolic link"):
        checkpoint.make_sync_checkpointer().load(work)
    with pytest.raises(InvalidCheckpointError, match="metadata.json: is a symbolic link"):
        checkpoint.verify(work).raise_if_failed()


def test_a_checkpoint_directory_reached_through_a_link_loads(original, tmp_path):
    link = tmp_path / "latest"
    os.symlink(original, link)
    _assert_exact(checkpoint.make_sync_checkpointer().load(str(link)))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("which", ["metadata", "shard"])
def test_a_fifo_fails_at_once_instead_of_hanging(work, which):
    name = METADATA_FILE if which == "metadata" else _shard(work)
    os.remove(os.path.join(work, name))
    os.mkfifo(os.path.join(work, name))
    with pytest.raises(InvalidCheckpointError, match=f"{name}: is not a regular file"):
        checkpoint.make_sync_checkpointer().load(work)
    report = checkpoint.verify(work)
    assert len(report.problems) == 1 and "is not a regular file" in report.problems[0]


def test_a_metadata_file_over_the_cap_is_refused(work):
    size = os.path.getsize(os.path.join(work, METADATA_FILE))
    small = CheckpointerConfig(reader_config=CheckpointReaderConfig(max_metadata_bytes=size - 1))
    pattern = f"{METADATA_FILE}: holds at least {size} bytes, over the limit of {size - 1} bytes"
    with pytest.raises(InvalidCheckpointError, match=pattern):
        checkpoint.make_sync_checkpointer(small).load(work)
    with pytest.raises(InvalidCheckpointError, match=pattern):
        checkpoint.verify(work, max_metadata_bytes=size - 1).raise_if_failed()
    exact = CheckpointerConfig(reader_config=CheckpointReaderConfig(max_metadata_bytes=size))
    _assert_exact(checkpoint.make_sync_checkpointer(exact).load(work))


def test_the_cap_applies_to_fsspec_storage(original):
    import fsspec

    url = "memory://hardening/capped"
    fs = fsspec.filesystem("memory")
    for name in os.listdir(original):
        fs.pipe_file(f"{url}/{name}", read_file(original, name))
    size = len(read_file(original, METADATA_FILE))
    small = CheckpointerConfig(reader_config=CheckpointReaderConfig(max_metadata_bytes=size - 1))
    try:
        with pytest.raises(InvalidCheckpointError, match=f"{METADATA_FILE}: holds at least {size} bytes"):
            checkpoint.make_sync_checkpointer(small).load(url)
        _assert_exact(checkpoint.make_sync_checkpointer().load(url))
    finally:
        fs.rm(url, recursive=True)


def test_the_cap_must_be_positive():
    with pytest.raises(ValueError, match="max_metadata_bytes must be positive"):
        CheckpointReaderConfig(max_metadata_bytes=0)


# ---- a shard truncated while it is read -------------------------------------------------------


class _TruncatedAfterOpen(LocalStorage):
    """Real local storage; another writer truncates a shard just after the load opened it to read data.

    This is the moment a memory-mapped read died of SIGBUS: the size was checked, then the file shrank.
    """

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.opened: list[str] = []

    def _open_read(self, name: str) -> tuple[int, int]:
        fd, size = super()._open_read(name)
        self.opened.append(name)
        if name.startswith("shard-") and self.opened.count(name) == 2:  # the first open checked its size
            os.truncate(self._path(name), size // 2)
        return fd, size


def test_a_shard_truncated_during_the_load_is_corrupt_not_fatal(tmp_path):
    path = str(tmp_path / "ckpt")
    checkpoint.make_sync_checkpointer().save({"w": torch.arange(1 << 20, dtype=torch.float32)}, path)
    shard = _shard(path)
    storage = _TruncatedAfterOpen(path)
    with pytest.raises(CorruptCheckpointError, match=f"{shard}: the file ended at byte \\d+ while bytes"):
        load_checkpoint(storage, None, rank=0, world_size=1, options=LoadOptions())
    assert storage.opened == [METADATA_FILE, shard, shard]


# ---- reads straight into the target ----------------------------------------------------------


class _ChangedDuringTheLoad(LocalStorage):
    """Real local storage; another writer flips a byte of a shard after the load read its first window.

    A region that lands in its target directly is read once, window by window through a cache-sized
    scratch buffer; each window's blocks are checked there before the window is copied into the target.
    """

    def __init__(self, root: str, shard: str, at: int) -> None:
        super().__init__(root)
        self.shard, self.at, self.reads = shard, at, 0

    def _pread_into(self, fd: int, name: str, offset: int, buffer: memoryview, size: int) -> None:
        if name == self.shard and self.reads == 1:  # the first window landed; the second is read next
            with open(self._path(name), "r+b") as f:
                f.seek(self.at)
                byte = f.read(1)
                f.seek(self.at)
                f.write(bytes([byte[0] ^ 0x10]))
        self.reads += name == self.shard
        super()._pread_into(fd, name, offset, buffer, size)


def test_direct_reads_land_exact_values_and_refuse_bytes_changed_during_the_load(tmp_path):
    path = str(tmp_path / "ckpt")
    window = VERIFIED_WINDOW_BLOCKS * CHECKSUM_BLOCK_BYTES
    w = torch.arange(2 * window // 4, dtype=torch.float32)  # two verified windows
    checkpoint.make_sync_checkpointer().save({"w": w, "b": torch.arange(7, dtype=torch.bfloat16)}, path)
    shard = _shard(path)
    target = {"w": torch.zeros_like(w), "b": torch.zeros(7, dtype=torch.bfloat16)}
    loaded, _ = load_checkpoint(LocalStorage(path), target, rank=0, world_size=1, options=LoadOptions())
    assert torch.equal(loaded["w"], w) and torch.equal(loaded["b"], torch.arange(7, dtype=torch.bfloat16))

    doc = json.loads(read_file(path, METADATA_FILE))
    (chunk,) = doc["tensors"]["w"]["chunks"]
    block = VERIFIED_WINDOW_BLOCKS  # the second window's first block
    storage = _ChangedDuringTheLoad(path, shard, chunk["offset_bytes"] + window + 4 * 1000)
    target = {"w": torch.zeros_like(w)}
    with pytest.raises(
        CorruptCheckpointError, match=f"file {shard}, key 'w': checksum mismatch in block {block}"
    ):
        load_checkpoint(storage, target, rank=0, world_size=1, options=LoadOptions())
    assert storage.reads == 2  # each window read once: the first landed, the changed second was refused
    half = window // 4
    assert torch.equal(target["w"][:half], w[:half])  # verified bytes only
    assert torch.equal(target["w"][half:], torch.zeros(half))  # nothing of the changed window landed
