"""Each user-level call resolves its location once (`storage.spec`), on the read side too.

Resolving a URL builds an fsspec file system (`url_to_fs`); the read-side entry points (verify,
diff, the exports, the `shardsafe` command, the manager's listing and retention) take a path or a
`StorageSpec` and pass the spec down instead of resolving again at each step. The counting here is
done by a real file system, not a mock: `countmem://` is fsspec's memory file system under another
protocol name, with its instance cache off, so fsspec builds a new one at every resolution and
the class counts them. Its files live in the memory store that `memory://` shares.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem

import checkpoint
from checkpoint.tools.cli import main
from checkpoint.tools.dcp_import import import_dcp
from checkpoint.tools.diff import diff_checkpoints
from checkpoint.tools.hf_export import export_hf
from planners.errors import PickleNotAllowedError
from storage.spec import StorageSpec, spec_for, specs_for

pytestmark = pytest.mark.timeout(120)


class CountingMemoryFileSystem(MemoryFileSystem):
    """The memory file system, built anew at every `url_to_fs` (no instance cache), counting builds."""

    protocol = "countmem"
    cachable = False
    built = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).built += 1
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if isinstance(path, str) and path.startswith("countmem://"):
            path = "memory://" + path.removeprefix("countmem://")
        return MemoryFileSystem._strip_protocol(path)


@pytest.fixture
def counted() -> Iterator[str]:
    """A fresh `countmem://` directory; the build counter starts at zero."""
    fsspec.register_implementation("countmem", CountingMemoryFileSystem, clobber=True)
    name = f"res-{uuid.uuid4().hex[:12]}"
    CountingMemoryFileSystem.built = 0
    yield f"countmem://{name}"
    fs = MemoryFileSystem()
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _save(url: str, value: float) -> None:
    ckpt = checkpoint.make_sync_checkpointer()
    try:
        ckpt.save({"w": torch.full((4, 3), value), "step": int(value)}, url)
    finally:
        ckpt.close()


def _builds_during(fn: Any) -> int:
    before = CountingMemoryFileSystem.built
    fn()
    return CountingMemoryFileSystem.built - before


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


# --- StorageSpec.child --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "root",
    ["{tmp}/run", "file://{tmp}/run", "memory://{name}/run", "countmem://{name}/run/"],
)
def test_a_child_spec_is_what_resolving_the_child_path_gives(root: str, tmp_path: Path, counted: str) -> None:
    root = root.format(tmp=tmp_path, name=counted.removeprefix("countmem://"))
    child = StorageSpec.resolve(root).child("step-000000007")
    fresh = StorageSpec.resolve(f"{root.rstrip('/')}/step-000000007")
    assert (child.protocol, child.root, child.url, child.path) == (
        fresh.protocol,
        fresh.root,
        fresh.url,
        fresh.path,
    )
    storage = child.open()
    storage.prepare()
    storage.publish("x.json", b"{}")
    assert fresh.open().read_bytes("x.json") == b"{}"


@pytest.mark.s3
def test_a_child_spec_on_s3_reads_what_the_child_url_holds(s3_endpoint: Any, s3_bucket: str) -> None:
    options = s3_endpoint.storage_options
    root = StorageSpec.resolve(f"{s3_bucket}/run", storage_options=options)
    child = root.child("step-000000003")
    fresh = StorageSpec.resolve(f"{s3_bucket}/run/step-000000003", storage_options=options)
    assert (child.root, child.url, child.path) == (fresh.root, fresh.url, fresh.path)
    assert child.fs is root.fs  # derived, not resolved again
    child.open().publish("x.json", b"[1]")
    assert fresh.open().read_bytes("x.json") == b"[1]"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", 7])
def test_a_child_must_be_one_plain_name(name: Any) -> None:
    with pytest.raises(ValueError, match="one plain name"):
        StorageSpec.resolve("memory://bucket/run").child(name)


def test_spec_for_resolves_strings_and_keeps_specs(counted: str) -> None:
    spec = StorageSpec.resolve(counted)
    assert spec_for(spec, storage_options={"ignored": True}) is spec  # a spec keeps its own options
    assert _builds_during(lambda: specs_for(spec, f"{counted}/other")) == 1


# --- one resolution per call ------------------------------------------------------------------------


def test_verify_and_diff_accept_a_spec_and_resolve_nothing_more(counted: str) -> None:
    _save(f"{counted}/a", 1.0)
    _save(f"{counted}/b", 2.0)
    spec_a, spec_b = StorageSpec.resolve(f"{counted}/a"), StorageSpec.resolve(f"{counted}/b")
    report = None

    def run() -> None:
        nonlocal report
        report = checkpoint.verify(spec_a)
        assert diff_checkpoints(spec_a, spec_b).tensors[0].equal is False

    assert _builds_during(run) == 0
    assert report is not None and report.ok and report.files_checked == 1
    assert _builds_during(lambda: checkpoint.verify(f"{counted}/a")) == 1


def test_the_command_line_resolves_each_path_once(counted: str) -> None:
    _save(f"{counted}/a", 1.0)
    _save(f"{counted}/b", 1.0)
    calls: dict[str, tuple[int, str]] = {}

    def run(name: str, *args: str) -> int:
        return _builds_during(lambda: calls.__setitem__(name, _cli(*args)))

    assert run("verify", "verify", f"{counted}/a", "--json") == 1  # the progress total and the check
    assert run("diff", "diff", f"{counted}/a", f"{counted}/b", "--json") == 2  # one per checkpoint
    assert run("inspect", "inspect", f"{counted}/a", "--json") == 1
    assert calls["verify"][0] == 0 and json.loads(calls["verify"][1])["ok"] is True
    assert calls["diff"][0] == 0 and json.loads(calls["diff"][1])["identical"] is True
    assert calls["inspect"][0] == 0 and json.loads(calls["inspect"][1])["world_size"] == 1


def test_listing_and_pruning_a_run_resolve_its_root_once(counted: str) -> None:
    run = f"{counted}/run"
    for step in (1, 2, 3):
        _save(f"{run}/step-{step:09d}", float(step))
    code, out = 0, ""

    def ls() -> None:
        nonlocal code, out
        code, out = _cli("ls", run, "--json")

    assert _builds_during(ls) == 1  # not 1 + one per step
    assert code == 0 and [s["step"] for s in json.loads(out)["steps"]] == [1, 2, 3]

    ckpt = checkpoint.make_sync_checkpointer()
    try:
        mgr = checkpoint.CheckpointManager(run, checkpointer=ckpt, keep_last=1)
        assert _builds_during(lambda: [mgr.steps(), mgr.steps()]) == 1  # the root spec is kept
        saved = _builds_during(lambda: mgr.save(4, {"w": torch.zeros(4, 3), "step": 4}))
        assert saved == 1  # the checkpointer's save; the purge's listing and deletions resolve nothing
        assert [r.step for r in mgr.steps()] == [4]
        mgr.close()
    finally:
        ckpt.close()


def test_export_hf_takes_a_resolved_source_and_resolves_only_the_output(counted: str) -> None:
    _save(f"{counted}/a", 3.0)
    source = StorageSpec.resolve(f"{counted}/a")
    result = None

    def export() -> None:
        nonlocal result
        result = export_hf(source, f"{counted}/hf")

    assert _builds_during(export) == 1
    assert result is not None and result.tensors == 1
    loaded = checkpoint.make_sync_checkpointer()
    try:
        state = {"w": torch.empty(4, 3)}
        loaded.load(f"{counted}/hf", state)
        assert torch.equal(state["w"], torch.full((4, 3), 3.0))
    finally:
        loaded.close()


def test_import_dcp_resolves_the_dcp_directory_once(tmp_path: Path, counted: str) -> None:
    state = {"w": torch.arange(24, dtype=torch.float32).reshape(6, 4), "epoch": 3}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    MemoryFileSystem().put(
        str(tmp_path / "dcp") + "/", f"/{counted.removeprefix('countmem://')}/dcp/", recursive=True
    )
    with pytest.raises(PickleNotAllowedError):
        import_dcp(f"{counted}/dcp", f"{counted}/out")  # the check finds .metadata, then refuses
    before = CountingMemoryFileSystem.built
    result = import_dcp(f"{counted}/dcp", f"{counted}/out", trust_pickle=True)
    assert CountingMemoryFileSystem.built - before == 2  # DCP's reader of the input, the output
    assert (result.tensors, result.values) == (1, 1)
    loaded = checkpoint.make_sync_checkpointer()
    try:
        out = loaded.load(f"{counted}/out")
        assert torch.equal(out["w"], state["w"]) and out["epoch"] == 3
    finally:
        loaded.close()
