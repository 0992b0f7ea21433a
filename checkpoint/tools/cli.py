"""The `shardsafe` command: look inside runs and checkpoints from a shell.

Each subcommand is a thin layer over the library (`checkpoint.manager.steps`
for `ls`, the metadata for `inspect`, `checkpoint.tools.verify` and
`checkpoint.tools.diff`), so the command and the Python API never disagree. Output
follows one rule: results go to stdout (a rich table, or one JSON document
with `--json`), logs, warnings and progress bars go to stderr, and progress
bars appear only when stderr is a terminal and neither `--json` nor `--quiet`
was given, so scripts parse stdout safely.

Exit status (every subcommand): 0 success (verified, identical); 1 problems
found (`verify`), checkpoints differ (`diff`), or a checkpoint's metadata is
invalid; 2 no checkpoint at the path (or only an incomplete one), the storage
cannot be opened, or bad arguments.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import os
import sys
from typing import Any

import click
from rich.table import Table

from checkpoint.load.loader import read_metadata
from checkpoint.manager.steps import modified_at, scan_steps, step_dirs
from checkpoint.tools.cli_common import (
    Output,
    exit_on_errors,
    human_bytes,
    parse_storage_options,
    shared_options,
)
from checkpoint.tools.diff import diff_checkpoints
from checkpoint.tools.not_a_run import explain_not_a_run
from checkpoint.tools.verify import EXIT_OK, EXIT_PROBLEMS, verify
from planners.dtypes import itemsize
from planners.errors import CheckpointPathError, InvalidCheckpointError, PickleNotAllowedError
from planners.metadata import FORMAT_NAME, METADATA_FILE, Metadata
from planners.references import references_line, references_summary
from planners.values import decode_value
from storage.spec import StorageSpec, specs_for

# Longest value shown whole in `inspect`'s table (characters); `--json` shows every value whole.
MAX_VALUE_CHARS = 60
# Top-level prefixes suggested when `inspect --keys` matches nothing.
MAX_PREFIXES_SHOWN = 10


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardsafe", prog_name="shardsafe")
def main() -> None:
    """Inspect, verify, compare and convert shardsafe checkpoints and runs.

    Exit status: 0 success; 1 problems found, checkpoints differ or invalid
    metadata; 2 no checkpoint at the path, storage unreachable or bad arguments.
    """
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )


# --- ls ---------------------------------------------------------------------------------------------


@main.command("ls", short_help="List the steps of a run, oldest first.")
@click.argument("root")
@click.option(
    "--local-root", default=None, metavar="DIR", help="Also list this node's local tier (its local_root)."
)
@shared_options
def ls_command(
    root: str, local_root: str | None, as_json: bool, quiet: bool, storage_options: str | None
) -> None:
    """List the steps of a run under ROOT (as CheckpointManager.steps()), oldest first, with their tiers."""
    out = Output(as_json=as_json, quiet=quiet)
    options = parse_storage_options(storage_options)
    with exit_on_errors(out):
        spec = StorageSpec.resolve(root, storage_options=options)
        _require_root(spec)
        records = [r for _, r in scan_steps(spec)]
        if local_root is not None:
            from checkpoint.tiers.manager_tier import merge_records
            from checkpoint.tiers.tier_files import local_records

            records = merge_records(records, local_records(local_root))
        reason = explain_not_a_run(spec, root) if not records else None
        if reason is not None:  # a checkpoint or a folder of them, not an empty run: exit 2
            raise CheckpointPathError(reason)
    if as_json:
        out.emit({"root": root, "steps": [r.to_json() for r in records]})
        return
    if not records:
        out.note(f"no step directories under {root}")
        return
    table = Table("step", "complete", "world size", "size", "saved at (UTC)", "tiers", "path")
    for r in records:
        saved = r.saved_at.strftime("%Y-%m-%d %H:%M:%S") if r.saved_at else "-"
        world = str(r.world_size) if r.world_size is not None else "-"
        row = (
            str(r.step),
            "yes" if r.complete else "NO",
            world,
            human_bytes(r.nbytes),
            saved,
            "+".join(r.tiers),
        )
        table.add_row(*row, r.path)
    out.table(table)


def _require_root(spec: StorageSpec) -> None:
    """A run root that does not exist is an error (exit 2), not an empty run."""
    try:
        exists = os.path.isdir(spec.root) if spec.protocol == "file" else spec.fs.exists(spec.root)
    except OSError:  # unreachable or denied: the listing that follows reports it as a storage error
        return
    if not exists:
        raise FileNotFoundError(f"no run at {spec.url}: the directory does not exist")


# --- inspect ----------------------------------------------------------------------------------------


@main.command("inspect", short_help="Show a checkpoint's format, world size, tensors and values.")
@click.argument("path")
@click.option("--keys", "pattern", default=None, metavar="PATTERN", help="Only keys matching this glob.")
@shared_options
def inspect_command(
    path: str, pattern: str | None, as_json: bool, quiet: bool, storage_options: str | None
) -> None:
    """Show what the checkpoint at PATH holds: format, world size, tensors and values."""
    out = Output(as_json=as_json, quiet=quiet)
    options = parse_storage_options(storage_options)
    with exit_on_errors(out):
        storage = StorageSpec.resolve(path, storage_options=options).open()
        try:
            metadata = _read_or_explain(storage, path)
            saved_at = modified_at(storage, METADATA_FILE)
            url = storage.url
        finally:
            storage.close()
    doc = inspect_document(url, metadata, saved_at, pattern)
    if as_json:
        out.emit(doc)
    else:
        _print_inspect(out, doc)
    if pattern is not None and not doc["tensors"] and not doc["values"]:
        out.err.print(
            f"no keys match {pattern!r} (a glob over the full keys); {_prefixes(metadata, pattern)}",
            markup=False,
        )
        sys.exit(EXIT_PROBLEMS)


def _prefixes(m: Metadata, pattern: str) -> str:
    """The checkpoint's top-level prefixes, as globs to try, and the pattern one level deeper if that matches."""
    keys = [*m.tensors, *m.values, *m.rank_local]
    deeper = f"*.{pattern}"
    hits = sum(fnmatch.fnmatchcase(k, deeper) for k in keys)
    nested = f"{deeper!r} matches {hits} key(s); " if hits else ""
    tops = sorted({k.split(".", 1)[0] + (".*" if "." in k else "") for k in keys})
    if not tops:
        return "the checkpoint holds no keys"
    shown = ", ".join(repr(t) for t in tops[:MAX_PREFIXES_SHOWN])
    more = f", ... ({len(tops)} in all)" if len(tops) > MAX_PREFIXES_SHOWN else ""
    return f"{nested}its top-level keys: {shown}{more}"


def _read_or_explain(storage: Any, path: str) -> Metadata:
    """The metadata; a run's root given instead of one of its steps says so."""
    try:
        return read_metadata(storage)
    except FileNotFoundError:
        steps = step_dirs(storage.list_names())
        if steps and not storage.exists(METADATA_FILE):
            raise FileNotFoundError(
                f"{storage.url} is a run with {len(steps)} step(s), not a checkpoint: "
                f"`shardsafe ls {path}` lists them"
            ) from None
        raise


def inspect_document(url: str, m: Metadata, saved_at: dt.datetime | None, pattern: str | None) -> dict:
    """What `inspect --json` prints."""

    def wanted(key: str) -> bool:
        return pattern is None or fnmatch.fnmatchcase(key, pattern)

    saved = _saved_chunks(m)
    tensors = [
        {"key": k, "dtype": t.dtype, "shape": list(t.shape), "chunks": saved[k][0], "nbytes": saved[k][1]}
        for k, t in sorted(m.tensors.items())
        if wanted(k)
    ]
    values = [{"key": k, "value": _shown_value(k, v)} for k, v in sorted(m.values.items()) if wanted(k)]
    values += [
        {"key": k, "value": f"rank-local, {r.world_size} ranks"}
        for k, r in sorted(m.rank_local.items())
        if wanted(k)
    ]
    return {
        "path": url,
        "format": FORMAT_NAME,
        "version": m.version,
        "save_id": m.save_id,
        "world_size": m.world_size,
        "saved_at": saved_at.isoformat() if saved_at else None,
        "files": len(m.files),
        "nbytes": sum(f.nbytes for f in m.files.values()),
        "tensors": tensors,
        "values": sorted(values, key=lambda v: v["key"]),
        "referenced": references_summary(m.references),  # incremental checkpoints (planners.references)
    }


def _saved_chunks(m: Metadata) -> dict[str, tuple[int, int]]:
    """key -> (chunks saved, their bytes); a grid key's come from its cuts, as a load resolves them."""
    out = {k: (len(t.chunks), sum(c.nbytes for c in t.chunks)) for k, t in m.tensors.items()}
    if m.grids:
        index = m.grid_index()
        for k, g in m.grids.items():
            count, numel = index.chunk_stats(k)
            out[k] = (count, numel * itemsize(g.dtype))
    return out


def _shown_value(key: str, typed: Any) -> str:
    """A value as Python would print it; pickled values are named, never unpickled."""
    try:
        return repr(decode_value(typed, key=key, allow_pickle=False))
    except PickleNotAllowedError:
        return "<pickled: load with allow_pickle=True>"


def _cut(text: str) -> str:
    """A value shown in the table: long ones end in an ellipsis (`--json` shows them whole)."""
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _print_inspect(out: Output, doc: dict) -> None:
    saved = doc["saved_at"] or "-"
    out.console.print(
        f"{doc['path']}\n  format {doc['format']} v{doc['version']}, save {doc['save_id']}, "
        f"saved by {doc['world_size']} rank(s) at {saved}\n"
        f"  {doc['files']} shard file(s), {human_bytes(doc['nbytes'])} ({doc['nbytes']} bytes)"
        + references_line(doc["referenced"]),
        markup=False,
    )
    if doc["tensors"]:
        table = Table("key", "dtype", "shape", "chunks", "bytes", title="tensors", title_justify="left")
        for t in doc["tensors"]:
            table.add_row(t["key"], t["dtype"], str(t["shape"]), str(t["chunks"]), str(t["nbytes"]))
        out.table(table)
    if doc["values"]:
        table = Table("key", "value", title="values", title_justify="left")
        for v in doc["values"]:
            table.add_row(v["key"], _cut(v["value"]))
        out.table(table)


# --- verify -----------------------------------------------------------------------------------------


@main.command("verify", short_help="Check every file and checksum of a checkpoint.")
@click.argument("path")
@click.option("--io-threads", type=click.IntRange(min=1), default=4, show_default=True)
@shared_options
def verify_command(
    path: str, io_threads: int, as_json: bool, quiet: bool, storage_options: str | None
) -> None:
    """Check every file, header and checksum of the checkpoint at PATH (exit 0 verified, 1 problems, 2 none)."""
    out = Output(as_json=as_json, quiet=quiet)
    options = parse_storage_options(storage_options)
    with exit_on_errors(out):
        spec = StorageSpec.resolve(path, storage_options=options)
        total = _tensor_bytes(spec)
        with out.progress(total, "verifying") as advance:
            report = verify(spec, io_threads=io_threads, progress=advance)
    if as_json:
        out.emit(
            {
                "path": report.path,
                "ok": report.ok,
                "save_id": report.save_id,
                "files_checked": report.files_checked,
                "tensors_checked": report.tensors_checked,
                "bytes_checked": report.bytes_checked,
                "problems": list(report.problems),
                "leftovers": list(report.leftovers),
                "pickled_keys": list(report.pickled_keys),
            }
        )
    else:
        status = "OK" if report.ok else f"FAILED ({len(report.problems)} problem(s))"
        out.console.print(
            f"{report.path}: {status}: save {report.save_id}, {report.files_checked} files, "
            f"{report.tensors_checked} tensors, {report.bytes_checked} bytes checked",
            markup=False,
        )
        for p in report.problems:
            out.console.print(f"  problem: {p}", markup=False)
        for n in report.leftovers:
            out.console.print(f"  leftover (not part of the checkpoint): {n}", markup=False)
        for k in report.pickled_keys:
            out.console.print(f"  pickled value (load needs allow_pickle=True): {k}", markup=False)
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


def _tensor_bytes(spec: StorageSpec) -> int:
    """The bytes verify will checksum (for the progress bar); 0 when the metadata is unreadable."""
    storage = spec.open()
    try:
        m = _read_or_explain(storage, spec.url)
    except InvalidCheckpointError:
        return 0  # verify reports it as a problem
    finally:
        storage.close()
    chunks = [c for t in m.tensors.values() for c in t.chunks]
    chunks += [t[1] for r in m.rank_local.values() for t in r.tensors if t is not None]
    return sum(c.nbytes for c in chunks)


# --- diff -------------------------------------------------------------------------------------------


@main.command("diff", short_help="Compare two checkpoints key by key (exit 1 if they differ).")
@click.argument("a")
@click.argument("b")
@shared_options
def diff_command(a: str, b: str, as_json: bool, quiet: bool, storage_options: str | None) -> None:
    """Compare checkpoints A and B key by key, streaming tensors (exit 0 identical, 1 different)."""
    out = Output(as_json=as_json, quiet=quiet)
    options = parse_storage_options(storage_options)
    with exit_on_errors(out):
        spec_a, spec_b = specs_for(a, b, storage_options=options)
        total = _tensor_bytes(spec_a)
        with out.progress(total, "comparing") as advance:
            report = diff_checkpoints(spec_a, spec_b, progress=advance)
    if as_json:
        out.emit(
            {
                "a": a,
                "b": b,
                "identical": report.identical,
                "only_in_a": list(report.only_in_a),
                "only_in_b": list(report.only_in_b),
                "changed": [{"key": c.key, "a": c.a, "b": c.b} for c in report.changed],
                "tensors": [
                    {"key": t.key, "equal": t.equal, "max_abs_diff": _json_float(t.max_abs_diff)}
                    for t in report.tensors
                ],
                "values": [{"key": k, "equal": eq} for k, eq in sorted(report.values.items())],
            }
        )
    else:
        _print_diff(out, report)
    sys.exit(EXIT_OK if report.identical else EXIT_PROBLEMS)


def _json_float(x: float) -> float | str:
    return x if x == x else "nan"  # JSON has no NaN


def _print_diff(out: Output, report: Any) -> None:
    lines = [f"only in A: {k}" for k in report.only_in_a]
    lines += [f"only in B: {k}" for k in report.only_in_b]
    lines += [f"changed: {c.key}: {c.a} -> {c.b}" for c in report.changed]
    lines += [f"value differs: {k}" for k, eq in sorted(report.values.items()) if not eq]
    for line in lines:
        out.console.print(line, markup=False)
    table = Table("key", "equal", "max abs diff", title="tensors in both", title_justify="left")
    for t in report.tensors:
        table.add_row(t.key, "yes" if t.equal else "NO", f"{t.max_abs_diff:.6g}")
    if report.tensors:
        out.table(table)
    equal = sum(t.equal for t in report.tensors)
    verdict = "identical" if report.identical else "different"
    out.console.print(f"{verdict}: {equal} of {len(report.tensors)} common tensors equal", markup=False)


def _register_interop() -> None:
    """`export-hf` and `import-dcp` live in their own module, which adds them to `main`."""
    from checkpoint.tools import interop_cli  # it imports `main`'s module lazily: no import cycle

    interop_cli.register(main)


_register_interop()


if __name__ == "__main__":
    main()
