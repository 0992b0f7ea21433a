"""What every `shardsafe` subcommand shares: where output goes, the common options, errors as exit statuses.

`checkpoint/tools/cli.py` (ls, inspect, verify, diff) and `checkpoint/tools/interop_cli.py` (export-hf, import-dcp) both
build on these, so every subcommand follows the same output rule (results on stdout, messages and progress bars
on stderr) and maps errors to the same exit statuses (see `checkpoint/tools/cli.py`'s module docstring).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from checkpoint.tools.verify import EXIT_NO_CHECKPOINT, EXIT_PROBLEMS
from planners.errors import CheckpointError, InvalidCheckpointError


class Output:
    """Where a command's results, messages and progress go (see the module docstring)."""

    def __init__(self, *, as_json: bool, quiet: bool) -> None:
        self.as_json, self.quiet = as_json, quiet
        out = Console(highlight=False, soft_wrap=False)
        # Off a terminal rich would wrap tables at 80 columns; a pipe or file gets whole lines.
        self.console = out if out.is_terminal else Console(highlight=False, width=10_000, color_system=None)
        err = Console(stderr=True, highlight=False)
        self.err = (
            err if err.is_terminal else Console(stderr=True, highlight=False, width=10_000, color_system=None)
        )

    def emit(self, doc: Any) -> None:
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")

    def note(self, text: str) -> None:
        """A message for people: stderr, silenced by --quiet."""
        if not self.quiet:
            self.err.print(text, markup=False)

    def table(self, table: Table) -> None:
        if not self.console.is_terminal:
            table.box = None  # plain columns for pipes and files
        self.console.print(table)

    @contextmanager
    def progress(self, total: int, what: str) -> Iterator[Callable[[int], None]]:
        """A byte progress bar on stderr (only on a terminal); yields the function that advances it."""
        if self.as_json or self.quiet or not self.err.is_terminal:
            yield lambda n: None
            return
        columns = (TextColumn(what), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(what, total=total)
            yield lambda n: bar.advance(task, n)


def shared_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options every subcommand shares."""
    fn = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout (for scripts).")(
        fn
    )
    fn = click.option("--quiet", "-q", is_flag=True, help="No progress bars or messages on stderr.")(fn)
    return click.option(
        "--storage-options",
        default=None,
        metavar="JSON",
        envvar="SHARDSAFE_STORAGE_OPTIONS",
        help="fsspec options for remote paths as a JSON object, e.g. endpoint and credentials "
        "(or set SHARDSAFE_STORAGE_OPTIONS).",
    )(fn)


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """The --storage-options value; a bad one is a usage error (exit 2)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="--storage-options") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return value


@contextmanager
def exit_on_errors(out: Output) -> Iterator[None]:
    """Errors become a one-line message on stderr and the documented exit status."""
    try:
        yield
    except InvalidCheckpointError as e:
        out.err.print(f"error: {type(e).__name__}: {e}", markup=False)
        sys.exit(EXIT_PROBLEMS)
    except (FileNotFoundError, CheckpointError) as e:
        out.err.print(f"error: {type(e).__name__}: {e}", markup=False)
        sys.exit(EXIT_NO_CHECKPOINT)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n} B"
    size, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:.1f} {units[0]}"
