"""Format stability: the committed golden checkpoints of every format version load exactly and verify.

The checkpoints under tests/golden/v<N>/ were written by format version N
(tests/golden/make_golden.py) and are never rewritten, so a change that
stops the reader from loading an old checkpoint fails here. A change to what
the writer produces without a version bump fails the drift test.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import checkpoint
from planners.errors import RankLocalError
from planners.metadata import FORMAT_VERSION, METADATA_FILE, PLAIN_FORMAT_VERSION
from planners.metadata_parse import parse_metadata
from planners.references import REFERENCES_SINCE_VERSION
from tests.golden.make_golden import GOLDEN_DIR, single_rank_state, two_rank_global

VERSIONS = sorted(int(d[1:]) for d in os.listdir(GOLDEN_DIR) if re.fullmatch(r"v\d+", d))


def _golden(version: int, name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"v{version}", name)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (also for NaN and -0.0)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.fixture
def ckpt():
    c = checkpoint.make_sync_checkpointer()
    yield c
    c.close()


def test_every_version_up_to_the_current_one_has_goldens():
    assert VERSIONS == list(range(1, FORMAT_VERSION + 1))


@pytest.mark.parametrize("version", VERSIONS)
def test_single_rank_golden_loads_exactly(ckpt, version):
    path = _golden(version, "single")
    expected = single_rank_state()
    loaded = ckpt.load(path)
    assert list(loaded) == list(expected)
    for key in ("w", "b16", "h"):
        assert _same(loaded["model"][key], expected["model"][key]), key
    assert all(_same(got, want) for got, want in zip(loaded["ints"], expected["ints"], strict=True))
    assert _same(loaded["empty"], expected["empty"]) and _same(loaded["scalar"], expected["scalar"])
    assert (loaded["step"], loaded["lr"], loaded["inf"]) == (1000, 0.5, float("inf"))
    assert type(loaded["step"]) is int
    assert loaded["cfg"] == {"betas": (0.9, 0.999), 0: "int key", "name": "golden", "none": None}
    assert type(loaded["cfg"]["betas"]) is tuple
    assert len(loaded["rng"]) == 1 and _same(loaded["rng"][0], expected["rng"].value)
    assert loaded["pos"] == [{"epoch": 3, "batch": 17}]

    # Into a target, strictly: every key is found and filled in place.
    target = single_rank_state()
    zeroed = {k: torch.zeros_like(v) for k, v in target["model"].items()}
    target["model"] = zeroed
    target["rng"] = checkpoint.RankLocal(torch.zeros(2, dtype=torch.int64))
    filled = ckpt.load(path, target, strict=True)
    assert all(filled["model"][k] is zeroed[k] and _same(zeroed[k], expected["model"][k]) for k in zeroed)
    assert _same(filled["rng"].value, expected["rng"].value)


@pytest.mark.parametrize("version", VERSIONS)
def test_two_rank_golden_loads_resharded_into_one_process(ckpt, version):
    path = _golden(version, "two_rank")
    full = two_rank_global()
    loaded = ckpt.load(path)
    for key, tensor in full.items():
        assert _same(loaded["model"][key], tensor), key
    assert loaded["step"] == 77
    assert [t.tolist() for t in loaded["rng"]] == [[0, 10], [1, 11]]
    assert loaded["pos"] == [{"rank": 0}, {"rank": 1}]

    target = {"model": {k: torch.zeros_like(v) for k, v in full.items()}, "step": 0}
    filled = ckpt.load(path, target, strict=True)
    assert all(_same(filled["model"][k], full[k]) for k in full) and filled["step"] == 77
    with pytest.raises(
        RankLocalError, match=r"rank-local key 'rng' was saved by 2 ranks and cannot go back to rank 0 of 1"
    ):
        ckpt.load(path, {"rng": checkpoint.RankLocal(None)})


@pytest.mark.parametrize("name", ["single", "two_rank"])
@pytest.mark.parametrize("version", VERSIONS)
def test_golden_checkpoints_verify(version, name):
    path = _golden(version, name)
    report = checkpoint.verify(path)
    with open(os.path.join(path, METADATA_FILE), "rb") as f:
        metadata = parse_metadata(f.read(), where=path)
    assert metadata.version == version
    assert (report.ok, report.problems, report.leftovers, report.pickled_keys) == (True, (), (), ())
    assert len(metadata.files) == (1 if name == "single" else 2)
    referenced = {} if metadata.references is None else metadata.references.files
    assert (version >= REFERENCES_SINCE_VERSION) == bool(
        referenced
    )  # version 3: incremental, beside its base
    assert report.files_checked == len(metadata.files) + len(referenced)


def test_writer_output_has_not_drifted_from_the_current_golden(ckpt, tmp_path):
    """Saving the golden state today gives the golden files, up to the save id (and key order in the metadata).

    If this fails on purpose (a new field, a changed layout), bump FORMAT_VERSION and add goldens for it.
    A save that references nothing writes the version before references (planners.references).
    """
    golden = _golden(PLAIN_FORMAT_VERSION, "single")
    path = str(tmp_path / "single")
    ckpt.save(single_rank_state(), path)

    def normalised(directory: str) -> dict[str, object]:
        with open(os.path.join(directory, METADATA_FILE)) as f:
            save_id = json.load(f)["save_id"]
        out: dict[str, object] = {}
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read().replace(save_id.encode(), b"<id>")
            if name == METADATA_FILE:  # its digest covers the save id too; the reader checks it
                data = {k: v for k, v in json.loads(data).items() if k != "digest"}
            out[name.replace(save_id, "<id>")] = data
        return out

    assert normalised(path) == normalised(golden)
