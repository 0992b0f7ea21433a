"""Every error the library raises on purpose is a CheckpointError that is also the built-in it refines."""

from __future__ import annotations

import ast
import pathlib
import threading

import pytest
import torch

import checkpoint
from checkpoint import CheckpointError, CheckpointStateError, MissingKeysError, RankInfo, StorageError
from storage.multipart import MIN_PART_BYTES, PartUpload, S3Parts
from storage.redact import Redactor
from storage.retry import RetryPolicy

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Built-ins a library module may raise itself: wrong arguments (TypeError, ValueError), and a missing
# checkpoint, which stays FileNotFoundError as the seed API documents.
ALLOWED_BUILTINS = {"TypeError", "ValueError", "FileNotFoundError"}
# Raised before `planners.errors` may be imported at all: a user's file shadows one of the packages.
ALLOWED_IN = {"checkpoint/shadowing.py": {"ImportError"}}


def _raised_builtins() -> list[str]:
    found = []
    for package in ("checkpoint", "planners", "storage"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    name = getattr(node.exc.func, "id", None)
                    allowed = ALLOWED_BUILTINS | ALLOWED_IN.get(str(path.relative_to(ROOT)), set())
                    if name in dir(__import__("builtins")) and name not in allowed:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: raise {name}(...)")
    return found


def test_no_library_module_raises_a_plain_runtime_built_in():
    assert _raised_builtins() == []


def test_the_new_classes_refine_the_built_ins():
    assert issubclass(CheckpointStateError, CheckpointError) and issubclass(
        CheckpointStateError, RuntimeError
    )
    assert issubclass(StorageError, CheckpointError) and issubclass(StorageError, OSError)
    assert issubclass(MissingKeysError, KeyError) and issubclass(MissingKeysError, RuntimeError)


def test_a_closed_checkpointer_raises_a_state_error(tmp_path):
    ckpt = checkpoint.make_sync_checkpointer()
    ckpt.close()
    with pytest.raises(CheckpointStateError, match="SyncCheckpointer is closed"):
        ckpt.save({"a": torch.ones(1)}, str(tmp_path / "c"))
    with pytest.raises(CheckpointStateError, match="SyncCheckpointer is closed"):
        ckpt.load(str(tmp_path / "c"))


def test_several_ranks_without_a_process_group_is_a_state_error(tmp_path):
    ckpt = checkpoint.make_sync_checkpointer(rank_info=RankInfo(0, 2))
    with pytest.raises(
        CheckpointStateError, match="rank_info says 2 ranks but no process group is initialised"
    ):
        ckpt.save({"a": torch.ones(1)}, str(tmp_path / "c"))
    ckpt.close()


@pytest.mark.s3
def test_writing_to_a_finished_upload_is_a_storage_error(s3_fs, s3_bucket):
    path = f"{s3_bucket.removeprefix('s3://')}/object"
    upload = PartUpload(
        S3Parts(s3_fs, path),
        part_bytes=MIN_PART_BYTES,
        slots=threading.BoundedSemaphore(2),
        retry=RetryPolicy(),
        where=f"s3://{path}",
        redact=Redactor(),
    )
    upload.write(b"abc")
    upload.commit()
    with pytest.raises(StorageError, match=f"s3://{path}: write to an upload that was already committed"):
        upload.write(b"more")
    assert s3_fs.cat_file(path) == b"abc"
