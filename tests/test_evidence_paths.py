"""Issue 22 case 4: a relative path means the trainer's working directory at save time, also when async.

The writer process is spawned when the checkpointer is built and keeps the working directory it had
then; the trainer then `os.chdir`s. A relative path is made absolute once, in the trainer, before the
save's spec travels to the writer: the checkpoint lands (and loads) where the trainer planned it, and a
failed save removes the directories the trainer created for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import checkpoint
from checkpoint import CommitHook, DistributedCheckpointError
from storage.spec import StorageSpec


class FailWhenNamedFail(CommitHook):
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if Path(path).name.startswith("fail"):
            raise ValueError(f"refusing {Path(path).name}")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def test_a_relative_local_path_resolves_to_an_absolute_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for given in ("run/step-1", "file://run/step-1", "./run/step-1"):
        spec = StorageSpec.resolve(given)
        assert (spec.protocol, spec.root, spec.url) == ("file", str(tmp_path / "run" / "step-1"), spec.root)


@pytest.mark.timeout(180)
def test_async_save_to_a_relative_path_after_chdir_lands_in_the_new_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    monkeypatch.chdir(tmp_path / "before")
    ckpt = checkpoint.make_async_checkpointer(commit_hook=FailWhenNamedFail())
    try:
        # The writer process starts in the background: wait for that (its one thread's queue), in before/.
        ckpt.checkpoint_process._executor.submit(lambda: None).result(timeout=120)
        assert ckpt.checkpoint_process.pid is not None
        monkeypatch.chdir(tmp_path / "after")
        state = {"w": torch.arange(100.0), "step": 1}
        ckpt.save(state, "run/step-1")[1].result(timeout=120)
        error = ckpt.save(state, "new/deeper/fail-2")[1].exception(timeout=120)
    finally:
        ckpt.close()
    assert isinstance(error, DistributedCheckpointError), error
    assert "pre_commit hook failed: ValueError: refusing fail-2" in str(error)
    assert list((tmp_path / "before").iterdir()) == []  # nothing landed where the writer was started
    assert sorted(p.name for p in (tmp_path / "after").iterdir()) == ["run"]  # new/deeper/ went again
    loaded = checkpoint.make_sync_checkpointer().load(str(tmp_path / "after" / "run" / "step-1"))
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 1
