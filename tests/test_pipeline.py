"""The one save pipeline: both modes behave the same around the commit, and report the same stats.

A sync save writes in the trainer and an async save in the writer process, but both run
`checkpoint.save.pipeline.write_and_commit`: a failing pre_commit hook fails the save the same way,
and each save's `SaveStats` (logged at INFO) describe the files that landed. Also the typed
boundary (`SaveOptions`, `LoadOptions`) and the picklable `StorageSpec`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import checkpoint
from checkpoint import CommitHook, LoadOptions, SaveOptions, SaveStats
from planners.errors import DistributedCheckpointError, IncompleteCheckpointError, WriterProcessError
from storage.spec import StorageSpec


class _RefuseInPreCommit(CommitHook):
    """Raises in pre_commit for paths ending with 'bad' (picklable: reaches the writer process)."""

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if path.endswith("bad"):
            raise ValueError(f"refusing {os.path.basename(path)}")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def _save(ckpt: checkpoint.Checkpointer, state: dict, path: Path) -> None:
    """A save in either mode, returning once it is committed (or raising its error)."""
    futures = ckpt.save(state, str(path))
    if futures is not None:
        futures[1].result(timeout=120)


def _make(mode: str, hook: CommitHook | None = None) -> checkpoint.Checkpointer:
    if mode == "sync":
        return checkpoint.make_sync_checkpointer(commit_hook=hook)
    return checkpoint.make_async_checkpointer(commit_hook=hook)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_pre_commit_failure_fails_the_save_the_same_way_in_both_modes(tmp_path: Path, mode: str) -> None:
    ckpt = _make(mode, _RefuseInPreCommit())
    try:
        state = {"w": torch.arange(6, dtype=torch.float32)}
        with pytest.raises(DistributedCheckpointError) as info:
            _save(ckpt, state, tmp_path / "bad")
        assert type(info.value) is DistributedCheckpointError
        assert "pre_commit hook failed: ValueError: refusing bad" in str(info.value)
        assert not (tmp_path / "bad").exists()  # the failed save took back its files and its directory
        with pytest.raises(FileNotFoundError, match="metadata.json not found") as missing:
            ckpt.load(str(tmp_path / "bad"))
        assert not isinstance(missing.value, IncompleteCheckpointError)
        if mode == "async":  # an async failure is also reported by the next save, which does not start
            with pytest.raises(WriterProcessError, match="previous async save"):
                _save(ckpt, state, tmp_path / "good")
        _save(ckpt, state, tmp_path / "good")  # then saves start afresh
        assert torch.equal(ckpt.load(str(tmp_path / "good"))["w"], state["w"])
    finally:
        ckpt.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_save_stats_describe_the_files_written_and_are_logged(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = _make(mode)
    try:
        state = {"a": torch.ones(64), "b": torch.zeros(3, 5, dtype=torch.int64), "step": 7}
        with caplog.at_level(logging.INFO, logger="checkpoint.save.pipeline"):
            _save(ckpt, state, tmp_path / "s1")
            _save(ckpt, state, tmp_path / "s2")
        stats = ckpt.last_save
        assert isinstance(stats, SaveStats)
        shards = [p for p in (tmp_path / "s2").iterdir() if p.suffix == ".safetensors"]
        assert stats.files_written == len(shards) >= 1
        assert stats.bytes_written == sum(p.stat().st_size for p in shards)
        assert stats.plan_reused is True
        expected = {"plan", "write", "commit"} | ({"stage"} if mode == "async" else set())
        assert set(stats.phase_secs) == expected
        assert all(s >= 0.0 for s in stats.phase_secs.values())
        lines = [r.getMessage() for r in caplog.records if r.name == "checkpoint.save.pipeline"]
        assert len(lines) == 2, lines
        assert lines[1].startswith(f"{mode} save {tmp_path / 's2'} rank 0: {stats.bytes_written} bytes in ")
    finally:
        ckpt.close()


def test_options_are_typed_once_at_the_boundary() -> None:
    assert SaveOptions.from_kwargs({"overwrite": True}) == SaveOptions(overwrite=True, allow_pickle=False)
    with pytest.raises(TypeError, match="bogus"):
        SaveOptions.from_kwargs({"bogus": 1})
    with pytest.raises(TypeError):
        SaveOptions(True)  # type: ignore[misc]  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        SaveOptions().overwrite = True  # type: ignore[misc]
    defaults = LoadOptions(verify=False, io_threads=3)
    options = LoadOptions.from_kwargs({"strict": True}, defaults=defaults)
    assert (options.strict, options.verify, options.io_threads) == (True, False, 3)
    with pytest.raises(TypeError, match="io_threads"):
        LoadOptions.from_kwargs({"io_threads": 2}, defaults=defaults)  # a reader config field, not a kwarg
    assert checkpoint.WriterHook is checkpoint.CommitHook


def test_storage_spec_pickles_without_its_file_system_and_hides_credentials() -> None:
    spec = StorageSpec.resolve("memory://bucket/run/step-1", storage_options={"skip_instance_cache": True})
    assert spec.fs is not None and "skip_instance_cache" not in repr(spec)
    storage = spec.open()
    storage.prepare()
    storage.publish("x.json", b"{}")
    copy = pickle.loads(pickle.dumps(spec))
    assert copy.fs is None  # another process builds its own file system from the path
    assert copy.open().read_bytes("x.json") == b"{}"
    local = StorageSpec.resolve("file:///tmp/somewhere")
    assert (local.protocol, local.root) == ("file", "/tmp/somewhere")
