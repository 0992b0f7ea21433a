"""Hostile and bad checkpoint files: every one is refused with a clear error before it can do harm.

The metadata file and the safetensors headers are untrusted input. Each
hand-made hostile case must fail with the project's own error type naming
the checkpoint, before any allocation sized by the hostile field; hypothesis
then mutates and truncates real files: every outcome is a clean load or an
error from `planners.errors`, never another exception, a hang or a huge
allocation. Pickled values never run without the caller's opt-in.
"""

from __future__ import annotations

import base64
import copy
import fractions
import itertools
import json
import os
import pickle
import struct
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoint
from planners.digest import seal
from planners.errors import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    PickleNotAllowedError,
)
from planners.metadata import FORMAT_VERSION, METADATA_FILE, Metadata
from planners.metadata_parse import parse_metadata
from storage.backend import open_storage
from storage.safetensors_io import MAX_HEADER_BYTES, SafetensorsHeader, read_header
from tests.damage import private_copy

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _state() -> dict:
    return {
        "model": {
            "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.bfloat16),
        },
        "rng": checkpoint.RankLocal(torch.arange(3, dtype=torch.int64)),
        "pos": checkpoint.RankLocal({"epoch": 2}),
        "step": 7,
        "cfg": {"betas": (0.9, 0.95)},
    }


def _check_state(loaded: dict) -> None:
    expected = _state()
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert torch.equal(loaded["model"]["b"], expected["model"]["b"])
    assert torch.equal(loaded["rng"][0], expected["rng"].value)
    assert loaded["pos"] == [{"epoch": 2}]
    assert (loaded["step"], loaded["cfg"]) == (7, {"betas": (0.9, 0.95)})


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("hostile") / "ckpt")
    checkpoint.make_sync_checkpointer().save(_state(), path)
    return path


@pytest.fixture
def work(original: str, tmp_path) -> str:
    """A private copy of the original checkpoint for the test to damage."""
    return private_copy(original, str(tmp_path / "ckpt"))


def _doc(path: str) -> dict:
    with open(os.path.join(path, METADATA_FILE)) as f:
        return json.load(f)


def _shard_name(path: str) -> str:
    (name,) = _doc(path)["files"]
    return name


def _write(path: str, data: bytes) -> None:
    with open(os.path.join(path, METADATA_FILE), "wb") as f:
        f.write(data)


def _load(path: str) -> Any:
    return checkpoint.make_sync_checkpointer().load(path)


def _rename_file(doc: dict, new: str) -> None:
    old = next(iter(doc["files"]))
    doc["files"] = {new: doc["files"][old]}
    doc["tensors"]["model.w"]["chunks"][0]["file"] = new


def _w(doc: dict) -> dict:
    return doc["tensors"]["model.w"]


def _w_chunk(doc: dict) -> dict:
    return doc["tensors"]["model.w"]["chunks"][0]


def _set(field: str, value: Any) -> Callable[[dict], None]:
    return lambda doc: doc.__setitem__(field, value)


def _allocation_attack(doc: dict) -> None:
    """Shape, chunk and file size agree with each other on 1 TiB; only the real file disagrees."""
    n = 1 << 38
    (name,) = doc["files"]
    real_end = doc["files"][name]["nbytes"]  # past every other chunk, so no bytes are claimed twice
    doc["files"][name]["nbytes"] = 1 << 50
    doc["checksum_block_bytes"] = 1 << 40  # one checksum for the whole chunk keeps this file small
    _w(doc)["shape"] = [n]
    _w_chunk(doc).update(offsets=[0], sizes=[n], offset_bytes=real_end, nbytes=4 * n, crc32c=[0])


HOSTILE_METADATA: dict[str, tuple[Callable[[dict], None], str]] = {
    "parent-dir": (
        lambda d: _rename_file(d, "../shard-0123456789ab-r00000-000.safetensors"),
        "is not a shard file name",
    ),
    "absolute": (lambda d: _rename_file(d, "/etc/passwd"), r"'/etc/passwd' is not a shard file name"),
    "url": (
        lambda d: _rename_file(d, "s3://bucket/shard-0123456789ab-r00000-000.safetensors"),
        "is not a shard file name",
    ),
    "subdir": (
        lambda d: _rename_file(d, "sub/shard-0123456789ab-r00000-000.safetensors"),
        "is not a shard file name",
    ),
    "offset-past-file": (
        lambda d: _w_chunk(d).update(offset_bytes=10**6),
        r"key 'model\.w': bytes \[1000000, 1000024\) lie outside file",
    ),
    "nbytes-vs-shape": (
        lambda d: _w_chunk(d).update(nbytes=28),
        r"key 'model\.w': nbytes 28 != 6 elements x 4 bytes",
    ),
    "negative-shape": (
        lambda d: _w(d).update(shape=[-2, 3]),
        r"'model\.w' shape must be an integer in \[0, ",
    ),
    "overflowing-shape": (
        lambda d: _w(d).update(shape=[1 << 40, 1 << 40]),
        r"key 'model\.w': shape \[1099511627776, 1099511627776\] is too large",
    ),
    "too-many-dims": (lambda d: _w(d).update(shape=[1] * 65), "must be a list of at most 64 integers"),
    "float-shape": (lambda d: _w(d).update(shape=[2.0, 3]), r"'model\.w' shape must be an integer"),
    "unknown-dtype": (lambda d: _w(d).update(dtype="float128"), r"key 'model\.w': unknown dtype 'float128'"),
    "newer-version": (
        _set("version", FORMAT_VERSION + 1),
        rf"format version {FORMAT_VERSION + 1} is newer than this reader \({FORMAT_VERSION}\); upgrade shardsafe",
    ),
    "version-zero": (_set("version", 0), r"version must be an integer in \[1, "),
    "version-string": (_set("version", "1"), "version must be an integer"),
    "other-format": (_set("format", "dcp"), "not a shardsafe metadata file"),
    "block-size": (_set("checksum_block_bytes", 1), r"checksum_block_bytes must be an integer in \[4096, "),
    "checksum-count": (
        lambda d: _w_chunk(d).update(crc32c=[1, 2]),
        r"key 'model\.w': expected 1 block checksums",
    ),
    "checksum-range": (
        lambda d: _w_chunk(d).update(crc32c=[1 << 32]),
        r"'model\.w' crc32c must be an integer in \[0, 4294967295\]",
    ),
    "chunk-outside-shape": (
        lambda d: _w_chunk(d).update(offsets=[1, 0]),
        r"key 'model\.w': chunk \[1, 0\]\+\[2, 3\] lies outside shape \[2, 3\]",
    ),
    "file-rank": (
        lambda d: next(iter(d["files"].values())).update(rank=1),
        r"\.rank must be an integer in \[0, 0\]",
    ),
    "rank-local-length": (
        lambda d: d["rank_local"]["pos"].append({"value": 1}),
        r"rank_local\['pos'\] must list one entry per saving rank \(1\)",
    ),
    "structure-unhashable": (
        lambda d: d["structure"]["dict"].append(["x", {"tensor": ["model.w"]}]),
        "names no saved key",
    ),
    "structure-unknown-key": (
        lambda d: d["structure"]["dict"].append(["x", {"value": "nope"}]),
        r"structure leaf value:'nope' names no saved key",
    ),
    "allocation": (
        _allocation_attack,
        r"file shard-\w+-r00000-000\.safetensors, key 'model\.w': chunk bytes \[\d+, \d+\) lie outside the file of \d+ bytes",
    ),
    "deep-value": (
        lambda d: d["values"].__setitem__("step", json.loads("[" * 80 + "]" * 80)),
        "key 'step': value nested deeper than 64 levels",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_METADATA))
def test_hostile_metadata_is_refused_naming_the_checkpoint(work, case):
    mutate, pattern = HOSTILE_METADATA[case]
    doc = _doc(work)
    mutate(doc)
    _write(work, seal(doc))  # re-sealed, as an attacker would: the validation itself must refuse it
    with pytest.raises(InvalidCheckpointError, match=pattern) as info:
        _load(work)
    assert str(info.value).startswith(f"{work}: ")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"\x00\xff garbage", "metadata is not valid JSON"),
        (b'{"format": "shardsafe", "version": 1, "files": {', "metadata is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "metadata is not valid JSON"),
        (
            b'{"version": 1' + b"0" * 5000 + b"}",
            "metadata is not valid JSON",
        ),  # an integer past Python's digit limit
        (b"[]", "not a shardsafe metadata file"),
    ],
    ids=["binary", "truncated", "deep", "huge-int", "list"],
)
def test_malformed_metadata_bytes_are_refused(work, data, pattern):
    _write(work, data)
    with pytest.raises(InvalidCheckpointError, match=pattern):
        _load(work)


def _safetensors(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


HOSTILE_HEADERS: dict[str, tuple[bytes, str]] = {
    "short-file": (b"\x01\x00\x00", "3 bytes is too short for a safetensors header"),
    "length-past-file": (_safetensors({}, length=1000), r"header length 1000 exceeds the file \(10 bytes\)"),
    "length-huge": (
        _safetensors({}, length=(1 << 64) - 1),
        r"header length 18446744073709551615 exceeds the file",
    ),
    "length-past-limit": (_safetensors({}, b"\x00" * 16, length=MAX_HEADER_BYTES + 1), "exceeds the file"),
    "not-utf8": (_safetensors(b"\xff\xfe{}"), "safetensors header is not valid JSON"),
    "not-json": (_safetensors(b"{nope"), "safetensors header is not valid JSON"),
    "not-object": (_safetensors([1, 2]), "safetensors header must be a JSON object"),
    "metadata-values": (_safetensors({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
    "unknown-dtype": (
        _safetensors({"t": _entry("F128", [1], [0, 16])}, b"\x00" * 16),
        "unknown safetensors dtype 'F128'",
    ),
    "negative-shape": (
        _safetensors({"t": _entry("F32", [-1], [0, 4])}, b"\x00" * 4),
        r"tensor 't': shape \[-1\] must be a list",
    ),
    "bool-shape": (
        _safetensors({"t": _entry("F32", [True], [0, 4])}, b"\x00" * 4),
        r"tensor 't': shape \[True\] must be a list",
    ),
    "huge-shape": (
        _safetensors({"t": _entry("U8", [1 << 40, 1 << 40], [0, 4])}, b"\x00" * 4),
        "is too large",
    ),
    "offsets-past-data": (
        _safetensors({"t": _entry("U8", [8], [0, 8])}, b"\x00" * 4),
        r"data_offsets \[0, 8\] lie outside the data area of 4 bytes",
    ),
    "negative-offset": (
        _safetensors({"t": _entry("U8", [4], [-4, 0])}, b"\x00" * 4),
        r"data_offsets \[-4, 0\] lie outside",
    ),
    "offsets-vs-shape": (
        _safetensors({"t": _entry("F32", [2], [0, 4])}, b"\x00" * 4),
        "data_offsets span 4 bytes but shape .* needs 8",
    ),
    "overlap": (
        _safetensors({"t": _entry("U8", [4], [0, 4]), "u": _entry("U8", [4], [2, 6])}, b"\x00" * 6),
        "tensor 'u' at data offset 2 overlaps",
    ),
    "gap": (
        _safetensors({"t": _entry("U8", [2], [0, 2]), "u": _entry("U8", [2], [4, 6])}, b"\x00" * 6),
        "tensor 'u' at data offset 4 leaves a gap of 2 bytes",
    ),
    "trailing-bytes": (
        _safetensors({"t": _entry("U8", [2], [0, 2])}, b"\x00" * 6),
        "tensors cover 2 bytes but the data area holds 6",
    ),
    "missing-field": (
        _safetensors({"t": {"dtype": "U8", "shape": [2]}}, b"\x00" * 2),
        "exactly dtype, shape and data_offsets",
    ),
    "offsets-not-ints": (
        _safetensors({"t": _entry("U8", [2], [0, "2"])}, b"\x00" * 2),
        "data_offsets .* must be two integers",
    ),
}


@pytest.fixture
def memory_storage() -> Iterator[Any]:
    storage = open_storage(f"memory://hostile-{uuid.uuid4().hex}")
    yield storage
    storage.fs.rm(storage.root, recursive=True)


def _put(storage: Any, name: str, data: bytes) -> None:
    storage.fs.pipe_file(f"{storage.root}/{name}", data)


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_header_is_refused(memory_storage, case):
    data, pattern = HOSTILE_HEADERS[case]
    _put(memory_storage, "f.safetensors", data)
    with pytest.raises(InvalidCheckpointError, match=pattern) as info:
        read_header(memory_storage, "f.safetensors", where="ckpt")
    assert str(info.value).startswith("ckpt: file f.safetensors: ")


def test_real_shard_header_parses_exactly(original):
    storage = open_storage(original)
    name = _shard_name(original)
    header = read_header(storage, name, where=original)
    doc = _doc(original)
    assert header.metadata == {"format": "shardsafe", "save_id": doc["save_id"], "rank": "0"}
    assert header.file_bytes == doc["files"][name]["nbytes"]
    w = _w_chunk(doc)
    assert (header.tensors["model.w"].dtype, header.tensors["model.w"].shape) == ("F32", (2, 3))
    assert (header.tensors["model.w"].offset_bytes, header.tensors["model.w"].nbytes) == (
        w["offset_bytes"],
        24,
    )
    storage.close()


# ---- fuzzing -----------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(
        ["float32", "../x", "/abs", "s3://b/k", "shard-0123456789ab-r00000-000.safetensors", "model.w"]
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _mutate(doc: dict, data: st.DataObject) -> dict:
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p in _paths(doc) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(_JSON, label="value")
    return doc


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_metadata_loads_or_fails_cleanly(original, work, data):
    doc = _mutate(_doc(original), data)
    try:
        raw = seal(doc)
    except ValueError:  # not encodable as JSON (e.g. a NaN drawn): the plain text is refused anyway
        raw = json.dumps(doc).encode()
    try:
        assert isinstance(parse_metadata(raw, where=work), Metadata)
    except CheckpointError:
        pass
    _write(work, raw)
    try:
        _load(work)
    except CheckpointError:
        pass


@FUZZ
@given(
    cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=4)
)
def test_fuzz_truncated_and_flipped_metadata_bytes(original, cut, flips):
    with open(os.path.join(original, METADATA_FILE), "rb") as f:
        raw = bytearray(f.read())
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    try:
        assert isinstance(
            parse_metadata(bytes(raw[: max(cut, len(raw) // 2) if cut % 2 else len(raw)]), where="w"),
            Metadata,
        )
    except CheckpointError:
        pass


@FUZZ
@given(
    cut=st.integers(0, 600), flips=st.lists(st.tuples(st.integers(0, 600), st.integers(1, 255)), max_size=4)
)
def test_fuzz_truncated_and_flipped_shard_header(original, memory_storage, cut, flips):
    with open(os.path.join(original, _shard_name(original)), "rb") as f:
        raw = bytearray(f.read())
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    _put(memory_storage, "f.safetensors", bytes(raw[:cut] if cut < len(raw) else raw))
    try:
        assert isinstance(read_header(memory_storage, "f.safetensors", where="w"), SafetensorsHeader)
    except CheckpointError:
        pass


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=3))
def test_fuzz_flipped_shard_bytes_load_exactly_or_fail_as_corrupt(original, work, flips):
    """Never silently wrong: a damaged shard loads the exact values (the damage missed the data) or is refused."""
    name = _shard_name(original)
    with open(os.path.join(original, name), "rb") as f:
        raw = bytearray(f.read())
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    with open(os.path.join(work, name), "wb") as f:
        f.write(raw)
    try:
        loaded = _load(work)
    except CorruptCheckpointError:
        return
    _check_state(loaded)


# ---- pickle -----------------------------------------------------------------------------------


class _OpensFile:
    """Unpickling this runs `open(path, "w")`: a stand-in for any code a hostile pickle could run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def ckpt_path_with_pickles(tmp_path) -> str:
    path = str(tmp_path / "pickles")
    state = {
        "w": torch.ones(2),
        "frac": fractions.Fraction(1, 3),
        "rl": checkpoint.RankLocal(fractions.Fraction(2, 3)),
    }
    checkpoint.make_sync_checkpointer().save(state, path, allow_pickle=True)
    return path


def test_pickled_values_load_only_with_opt_in(ckpt_path_with_pickles):
    path = ckpt_path_with_pickles
    ckpt = checkpoint.make_sync_checkpointer()
    with pytest.raises(PickleNotAllowedError) as info:
        ckpt.load(path)
    assert str(info.value) == (
        f"{path}: key 'frac' holds a pickled value; loading it would run code from the checkpoint. "
        "Pass allow_pickle=True to load() only if you trust this checkpoint."
    )
    with pytest.raises(PickleNotAllowedError, match="key 'frac' holds a pickled value"):
        ckpt.load(path, {"w": torch.zeros(2), "frac": None})
    with pytest.raises(PickleNotAllowedError, match="key 'rl' holds a pickled value"):
        ckpt.load(path, {"rl": checkpoint.RankLocal(None)})
    loaded = ckpt.load(path, allow_pickle=True)
    assert (loaded["frac"], loaded["rl"]) == (fractions.Fraction(1, 3), [fractions.Fraction(2, 3)])


def test_hostile_pickle_never_runs_without_opt_in(work, tmp_path):
    marker = tmp_path / "pwned"
    doc = _doc(work)
    doc["values"]["step"] = {"pickle": base64.b64encode(pickle.dumps(_OpensFile(str(marker)))).decode()}
    _write(work, seal(doc))
    ckpt = checkpoint.make_sync_checkpointer()
    with pytest.raises(PickleNotAllowedError, match="key 'step' holds a pickled value"):
        ckpt.load(work)
    with pytest.raises(PickleNotAllowedError, match="key 'step' holds a pickled value"):
        ckpt.load(work, {"step": 0})
    report = checkpoint.verify(work)
    assert (report.ok, report.pickled_keys) == (True, ("step",))
    assert not marker.exists()
    # The payload is live: with the opt-in it does run, so the refusals above are what kept it out.
    loaded = ckpt.load(work, {"step": 0}, allow_pickle=True)
    loaded["step"].close()
    assert marker.exists()


def _staircase(n: int, row0: int = 0) -> list[tuple[list[int], list[int]]]:
    """Rows [row0, row0 + n) of width n + 1, row i split after column i: a valid tiling, every boundary distinct."""
    return [
        box
        for i in range(n)
        for box in (([row0 + i, 0], [1, i + 1]), ([row0 + i, i + 1], [1, n - i]))
        if box[1][1] > 0
    ]


def _irregular_metadata(shape: list[int], boxes: list[tuple[list[int], list[int]]]) -> bytes:
    name = "shard-0123456789ab-r00000-000.safetensors"
    starts = itertools.accumulate((s[0] * s[1] for _, s in boxes), initial=0)
    chunks = [
        {
            "offsets": o,
            "sizes": s,
            "file": name,
            "key": "w",
            "offset_bytes": start,
            "nbytes": s[0] * s[1],
            "crc32c": [0],
        }
        for (o, s), start in zip(boxes, starts)
    ]
    doc = {
        "format": "shardsafe",
        "version": 1,
        "save_id": "0123456789ab",
        "world_size": 1,
        "checksum_block_bytes": 1 << 20,
        "files": {name: {"nbytes": 1 << 24, "rank": 0}},
        "tensors": {"w": {"dtype": "uint8", "shape": shape, "chunks": chunks}},
        "values": {},
        "rank_local": {},
        "structure": {"dict": [["w", {"tensor": "w"}]]},
    }
    return json.dumps(doc).encode()


def test_irregular_chunk_layouts_are_checked_fast_or_refused():
    """Thousands of chunks with distinct boundaries once took minutes to check; now a sweep or a refusal."""
    n = 1500
    metadata = parse_metadata(_irregular_metadata([n, n + 1], _staircase(n)), where="ckpt")
    assert len(metadata.tensors["w"].chunks) == 2 * n
    # Flat rows on top of tall columns: every sweep direction crosses ~n boxes per step.
    columns = [
        box
        for j in range(n + 1)
        for box in (([n, j], [j + 1, 1]), ([n + j + 1, j], [n - j, 1]))
        if box[1][0] > 0
    ]
    boxes = _staircase(n) + columns
    shape = [2 * n + 1, n + 1]
    assert sum(s[0] * s[1] for _, s in boxes) == shape[0] * shape[1]
    with pytest.raises(InvalidCheckpointError) as info:
        parse_metadata(_irregular_metadata(shape, boxes), where="ckpt")
    assert str(info.value).startswith(
        f"ckpt: metadata.json: invalid metadata: key 'w': {len(boxes)} chunks in an irregular layout need "
    )
    assert str(info.value).endswith("comparisons to check for overlaps; refused")
