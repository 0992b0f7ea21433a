"""Issue 22 cases 7 and 8: storage deletes only on evidence.

Case 8: a directory is removed only after a listing found it empty, on every backend; pyarrow's file
system (what fsspec's HDFS wrapper runs on) deletes a directory recursively in `rmdir`, so a real
`ArrowFSWrapper` over pyarrow's local file system is the backend that used to lose a file.
Case 7: on the real S3 server, the metadata PUT lands but its reply is lost, the retry is refused
with 412, and the read-back that should settle whose object it is fails too: the save must fail as
*unknown*, keep every file, and the checkpoint whose metadata did land must load.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs
import pytest
import torch
from fsspec.implementations.arrow import ArrowFSWrapper

import checkpoint
import tests.test_s3_checkpoint  # noqa: F401  (registers is3://, the fault-injecting s3fs client)
from checkpoint import CheckpointerConfig, DistributedCheckpointError
from storage.local import LocalStorage
from storage.remote import FsspecStorage


class ArrowLocalFileSystem(ArrowFSWrapper):
    """fsspec's pyarrow wrapper over pyarrow's local file system: its `rmdir` is `delete_dir`, recursive."""

    protocol = "arrowlocal"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(pyarrow.fs.LocalFileSystem(), **kwargs)


fsspec.register_implementation("arrowlocal", ArrowLocalFileSystem, clobber=True)


def test_arrow_rmdir_really_is_recursive(tmp_path: Path) -> None:
    """The premise of case 8: without the listing first, this backend would delete a user's file."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "user.txt").write_text("mine")
    ArrowLocalFileSystem().rmdir(str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_fsspec_storage_removes_a_created_directory_only_when_a_listing_shows_it_empty(
    tmp_path: Path,
) -> None:
    fs = ArrowLocalFileSystem()
    root = str(tmp_path / "ckpt")
    storage = FsspecStorage(fs, root, url=f"arrowlocal://{root}")
    assert storage.prepare() == (root,)
    (tmp_path / "ckpt" / "user.txt").write_text("mine")  # put there by someone else during the save
    storage.remove_created_dirs()
    assert (tmp_path / "ckpt" / "user.txt").read_text() == "mine"
    (tmp_path / "ckpt" / "user.txt").unlink()
    FsspecStorage(fs, root, url=f"arrowlocal://{root}").remove_created_dirs((root,))  # another instance
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_save_on_a_recursive_rmdir_backend_keeps_a_file_it_did_not_write(tmp_path: Path) -> None:
    """End to end: a save refused at the commit takes back its files, never the user's file beside them."""

    class FailPreCommit(checkpoint.CommitHook):
        def pre_commit(self, path: str, **kwargs: Any) -> None:
            (tmp_path / "ckpt" / "notes.txt").write_text("user data")
            raise ValueError("refused")

        def post_commit(self, path: str, **kwargs: Any) -> None:
            pass

    ckpt = checkpoint.make_sync_checkpointer(commit_hook=FailPreCommit())
    with pytest.raises(DistributedCheckpointError, match="pre_commit hook failed: ValueError: refused"):
        ckpt.save({"w": torch.arange(10.0)}, f"arrowlocal://{tmp_path}/ckpt")
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["notes.txt"]
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "user data"


def test_local_storage_lists_before_removing_each_level(tmp_path: Path) -> None:
    made = LocalStorage(str(tmp_path / "a" / "b")).prepare()
    (tmp_path / "a" / "keep.txt").write_text("x")
    LocalStorage(str(tmp_path / "a" / "b")).remove_created_dirs(made)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]  # b went, a stays


@pytest.mark.s3
def test_an_unsettled_read_back_after_a_lost_metadata_reply_keeps_every_file(
    s3_endpoint: Any, s3_bucket: str
) -> None:
    options = {
        **s3_endpoint.storage_options,
        "tag": uuid.uuid4().hex,
        # The PUT lands, its reply is lost; the retry gets 412; the read-back's GET is refused.
        "inject": {"put_object:metadata.json": ["reply-lost"], "get_object:metadata.json": ["denied"]},
    }
    path = f"{s3_bucket.removeprefix('s3://')}/ckpt"
    ckpt = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=options))
    state = {"w": torch.arange(1000.0), "step": 7}
    with pytest.raises(DistributedCheckpointError, match="outcome is unknown, so nothing is deleted") as info:
        ckpt.save(state, f"is3://{path}")  # overwrite=False: the commit is the conditional PUT
    assert "metadata.json" in str(info.value) and "ckpt" in str(info.value)
    ckpt.close()
    # The metadata did land, and every file it names is still there: the checkpoint loads exactly.
    plain = checkpoint.make_sync_checkpointer(CheckpointerConfig(storage_options=s3_endpoint.storage_options))
    loaded = plain.load(f"s3://{path}")
    plain.close()
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert checkpoint.verify(f"s3://{path}", storage_options=s3_endpoint.storage_options).ok
