"""`shardsafe export-hf` and `shardsafe import-dcp`: the interop subcommands.

They are thin layers over `checkpoint.tools.hf_export.export_hf` and
`checkpoint.tools.dcp_import.import_dcp`, added to the `shardsafe` group by
`register()` (called by checkpoint.tools.cli), and follow its output rules:
results on stdout (a summary line, or one JSON document with `--json`),
messages and the byte progress bar on stderr, the bar only on a terminal.

Exit status: 0 written; 1 the input is invalid or corrupt; 2 nothing to
convert at the path, the output already exists (`export-hf` without
`--overwrite`), `import-dcp` without `--trust-pickle`, or bad arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from checkpoint.tools import consolidate
from checkpoint.tools.cli_common import Output, exit_on_errors, parse_storage_options, shared_options
from checkpoint.tools.dcp_import import DEFAULT_MAX_FILE_BYTES, import_dcp
from checkpoint.tools.hf_export import (
    DEFAULT_MAX_SHARD_SIZE,
    HfExportResult,
    export_hf,
    key_prefix,
    parse_size,
)

# Skipped keys (or, past this many, top-level subtrees) named in `export-hf`'s note.
MAX_SKIPPED_NAMED = 10


def register(group: click.Group) -> None:
    """Add `export-hf`, `import-dcp` and `consolidate` to the `shardsafe` command group."""
    export = click.command(
        "export-hf", short_help="Write a checkpoint's tensors as Hugging Face safetensors."
    )
    group.add_command(export(_export_options(shared_options(export_hf_command))))
    dcp = click.command("import-dcp", short_help="Convert a torch.distributed.checkpoint directory.")
    group.add_command(dcp(_import_options(shared_options(import_dcp_command))))
    consolidate.register(group)  # incremental checkpoints (checkpoint.tools.consolidate)


def _export_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.argument("path"),
            click.argument("out"),
            click.option(
                "--prefix",
                default=None,
                help="Export only the keys under this key path, without it ('model' or 'model.': "
                "model.0.weight is written as 0.weight).",
            ),
            click.option("--dtype", default=None, help="Cast floating-point tensors, e.g. bfloat16."),
            click.option(
                "--max-shard-size",
                default=DEFAULT_MAX_SHARD_SIZE,
                show_default=True,
                help="Largest output file (GB = 10**9, as huggingface_hub).",
            ),
            click.option("--overwrite", is_flag=True, help="Replace a Hugging Face layout already in OUT."),
        ]
    ):
        fn = option(fn)
    return fn


def _import_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.argument("dcp_dir"),
            click.argument("out"),
            click.option(
                "--trust-pickle",
                is_flag=True,
                help="Required: DCP metadata is a pickle, which can run code when read.",
            ),
            click.option(
                "--max-file-bytes",
                default=str(DEFAULT_MAX_FILE_BYTES),
                show_default=True,
                help="Largest shard file written, e.g. 2GiB.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def export_hf_command(
    path: str,
    out: str,
    prefix: str | None,
    dtype: str | None,
    max_shard_size: str,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
    storage_options: str | None,
) -> None:
    """Write the tensors of the checkpoint at PATH as a Hugging Face safetensors layout in OUT.

    One model.safetensors, or model-0000i-of-0000n.safetensors files and
    model.safetensors.index.json past --max-shard-size; written one tensor at a
    time, so memory stays near the largest tensor.
    """
    ui = Output(as_json=as_json, quiet=quiet)
    options = parse_storage_options(storage_options)
    with _conversion(ui, "export") as tick:
        result = export_hf(
            path,
            out,
            prefix=prefix,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            storage_options=options,
            progress=tick,
        )
    _report_export(ui, result, path, out, as_json=as_json, prefix=prefix)


def _report_export(
    ui: Output, result: HfExportResult, path: str, out: str, *, as_json: bool, prefix: str | None = None
) -> None:
    doc = {
        "path": path,
        "out": out,
        "files": list(result.files),
        "tensors": result.tensors,
        "total_bytes": result.total_bytes,
        "skipped": list(result.skipped),
    }
    line = f"exported {_count(result.tensors, 'tensor')} ({result.total_bytes} bytes) to {out}: {', '.join(result.files)}"
    notes = (
        [f"not exported (not tensors, or rank-local): {_summary(result.skipped)}"] if result.skipped else []
    )
    if prefix:
        notes.insert(
            0,
            f"--prefix selected the {result.tensors} tensor key(s) under {key_prefix(prefix)!r}, "
            "written without it",
        )
    _report(ui, doc, line, as_json=as_json, note="\n".join(notes))


def _summary(keys: tuple[str, ...]) -> str:
    """Skipped keys for a person: all of a few; past that, counts per top-level subtree (`--json` has them all)."""
    if len(keys) <= MAX_SKIPPED_NAMED:
        return ", ".join(keys)
    counts: dict[str, int] = {}
    for key in keys:
        top, dot, _ = key.partition(".")
        counts[top + (".*" if dot else "")] = counts.get(top + (".*" if dot else ""), 0) + 1
    groups = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{k} ({n})" for k, n in groups[:MAX_SKIPPED_NAMED])
    more = (
        f", and {len(groups) - MAX_SKIPPED_NAMED} more subtree(s)" if len(groups) > MAX_SKIPPED_NAMED else ""
    )
    return f"{len(keys)} keys: {shown}{more} (--json lists every key)"


def _report(ui: Output, doc: dict, line: str, *, as_json: bool, note: str = "") -> None:
    """A command's outcome: `doc` as JSON, or one line for a person and an optional note."""
    if as_json:
        ui.emit(doc)
        return
    click.echo(line)
    if note:
        ui.note(note)


def import_dcp_command(
    dcp_dir: str,
    out: str,
    trust_pickle: bool,
    max_file_bytes: str,
    as_json: bool,
    quiet: bool,
    storage_options: str | None,
) -> None:
    """Convert the torch.distributed.checkpoint directory DCP_DIR into a shardsafe checkpoint at OUT.

    DCP's .metadata is a pickle, and reading a pickle can run arbitrary code:
    the conversion runs only with --trust-pickle, for a checkpoint you trust.
    Tensors are converted one at a time; non-tensor entries become values.
    """
    ui = Output(as_json=as_json, quiet=quiet)
    options = parse_storage_options(storage_options)
    with _conversion(ui, "import") as tick:
        result = import_dcp(
            dcp_dir,
            out,
            trust_pickle=trust_pickle,
            max_file_bytes=parse_size(max_file_bytes),
            storage_options=options,
            progress=tick,
        )
    doc = {
        "dcp_dir": dcp_dir,
        "out": out,
        "tensors": result.tensors,
        "values": result.values,
        "total_bytes": result.total_bytes,
        "files": list(result.files),
    }
    line = (
        f"imported {_count(result.tensors, 'tensor')} ({result.total_bytes} bytes) and "
        f"{_count(result.values, 'value')} into {out}"
    )
    _report(ui, doc, line, as_json=as_json)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@contextmanager
def _conversion(ui: Output, what: str) -> Iterator[Callable[[int, int], None] | None]:
    """Run one conversion command: its errors become exit codes, and its bytes advance a progress bar."""
    with exit_on_errors(ui), _usage_errors(), _progress(ui, what) as tick:
        yield tick


@contextmanager
def _usage_errors() -> Iterator[None]:
    """A bad --prefix, --dtype or size is a usage error (exit 2), reported in one line."""
    try:
        yield
    except ValueError as e:
        if type(e) is not ValueError:
            raise  # CheckpointError subclasses of ValueError keep their own exit status
        raise click.UsageError(str(e)) from None


@contextmanager
def _progress(ui: Any, what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A byte progress bar on stderr, only on a terminal without --json or --quiet."""
    if ui.as_json or ui.quiet or not ui.err.is_terminal:
        yield None
        return
    columns = (TextColumn(what), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=ui.err, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda n, total: bar.update(task, advance=n, total=total)
