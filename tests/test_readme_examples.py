"""The README's Python examples run as written.

Every ```python block of README.md carries a marker comment on the line before it:

- `<!-- test: run -->`: the block is a whole script; it runs as is in a fresh process. All of them
  run in one temporary directory, in README order (relative paths land there), as a reader who
  copies them one after another would run them: no example may trip over another's files;
- `<!-- test: run ranks=N -->`: the same under torchrun with N gloo ranks;
- `<!-- test: mirrored tests/FILE.py::TEST -->`: the block needs what a test builds (a model, a
  Hugging Face layout); that test runs the same calls.

A block without a marker fails the test, so no new example goes unchecked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each example is a fresh interpreter importing torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_MARKER = re.compile(r"^<!-- test: (?P<kind>run|mirrored)(?: (?P<arg>\S+))? -->$")
_RUN_TIMEOUT_SECS = 240


@dataclass(frozen=True, slots=True, kw_only=True)
class Example:
    line: int  # of the opening fence, 1-based
    kind: str  # "run", "mirrored" or "" (no marker)
    arg: str | None
    code: str

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def _examples() -> list[Example]:
    lines = README.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        end = lines.index("```", i + 1)
        marker = _MARKER.match(lines[i - 1].strip()) if i > 0 else None
        found.append(
            Example(
                line=i + 1,
                kind=marker["kind"] if marker else "",
                arg=marker["arg"] if marker else None,
                code="\n".join(lines[i + 1 : end]) + "\n",
            )
        )
        i = end + 1
    return found


EXAMPLES = _examples()


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(ROOT)  # this tree's packages, whatever the venv has installed
    return env


def _run_script(code: str, cwd: Path, *, ranks: int | None = None) -> subprocess.CompletedProcess:
    script = cwd / "example.py"
    script.write_text(code)
    if ranks is None:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        cmd.append(str(script))
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=_RUN_TIMEOUT_SECS)


def test_the_readme_has_marked_examples_only() -> None:
    assert len(EXAMPLES) >= 5
    assert [e.name for e in EXAMPLES if not e.kind] == []
    assert [e.kind for e in EXAMPLES].count("run") >= 4


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one directory every runnable example runs in, in README order (pytest keeps that order)."""
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "run"], ids=lambda e: e.name)
def test_readme_example_runs(example: Example, reader_dir: Path) -> None:
    ranks = int(example.arg.removeprefix("ranks=")) if example.arg else None
    done = _run_script(example.code, reader_dir, ranks=ranks)
    assert done.returncode == 0, f"{example.name} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "mirrored"], ids=lambda e: e.name)
def test_readme_example_is_mirrored_by_a_test(example: Example) -> None:
    assert example.arg is not None
    path, test = example.arg.split("::")
    assert f"\ndef {test}(" in (ROOT / path).read_text(), example.arg


def test_a_module_named_checkpoint_shadows_shardsafe_with_the_documented_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.py").write_text("# the user's own module\n")
    first = next(e for e in EXAMPLES if e.kind == "run")
    done = _run_script(first.code, tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == "AttributeError: module 'checkpoint' has no attribute 'make_sync_checkpointer'"
    assert (
        "`AttributeError: module 'checkpoint' has no\nattribute 'make_sync_checkpointer'`"
        in README.read_text()
    )
