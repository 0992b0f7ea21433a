"""The benchmark's entry point: `python -m benchmarks.run`, shardsafe against DCP in one run.

It spawns the ranks itself (no torchrun needed): one spawn of the saving
world size for the save, memory and planning scenarios, then one fresh spawn
per load world size (a restart). It prints a Markdown table, and writes
`results.json` (every raw sample, the machine, the command) and
`results.png` (with matplotlib) to `--out-dir`.

Benchmarks that other modules of this package provide (`storage_bench`,
`async_blocking`) plug in with `--plugins all`: each one present is called
with the arguments of this run that its signature names, and what it
returns is kept under "plugins" in the JSON. A plug-in that fails is
reported there, not fatal: the comparison with DCP still comes out.

Example:
    python -m benchmarks.run                          # 512 MiB over 2 ranks, loads on 2, 3 and 1
    python -m benchmarks.run --plugins s3             # every goal of issue 26, S3 saves included (the README's run)
    python -m benchmarks.run --plugins all            # and the storage and async-blocking benchmarks
    python -m benchmarks.run --size-mib 64 --repeats 3 --load-world-sizes 3 --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

import checkpoint
from benchmarks import peers, scenarios
from benchmarks.chart import write_chart
from benchmarks.comparisons import add_ratios
from benchmarks.config import BenchConfig, MiB
from benchmarks.goals import evaluate, format_goals
from benchmarks.report import format_plugins, format_table, machine_description, write_json
from benchmarks.state import StateSpec
from benchmarks.stats import DCP, OURS, Results
from benchmarks.systems import describe_systems
from checkpoint.testing.ranks import run_ranks

logger = logging.getLogger("benchmarks.run")

# Plug-in benchmarks: module -> the function names tried, in order.
PLUGINS = {
    "benchmarks.storage_bench": ("run_storage_bench", "measure"),
    "benchmarks.async_blocking": ("measure", "run_async_blocking"),
}
# What `--plugins s3` runs: the object-store save of issue 26's goal 6, as the issue measured it
# (`storage_bench.py --no-local --no-http --total-mib 256 --stream-limit-mib 64 --repeats 3`).
S3_GOAL_KWARGS = {"total_mib": 256, "stream_limit_mib": 64, "repeats": 3, "local": False, "http": False}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=float, default=512, help="checkpoint size over all ranks (default 512)")
    p.add_argument("--tensors", type=int, default=64, help="tensors in the state dict (default 64)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the training tensors live; auto: cuda when available (GPU mode)",
    )
    p.add_argument("--save-world-size", type=int, default=2)
    p.add_argument("--load-world-sizes", default="2,3,1", help="comma-separated (default 2,3,1)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs of every figure (default 5)")
    p.add_argument("--small-tensors", type=int, default=10_000, help="tensors of the planning scenario")
    p.add_argument("--planning-repeats", type=int, default=3)
    p.add_argument(
        "--warm-cache", action="store_true", help="do not evict checkpoints from the page cache before loads"
    )
    p.add_argument(
        "--work-dir", default=None, help="scratch directory on the disk under test (default: a temp dir)"
    )
    p.add_argument("--out-dir", default="benchmarks/results", help="where results.json and results.png go")
    p.add_argument(
        "--plugins",
        choices=("none", "s3", "all"),
        default="none",
        help="s3: also measure goal 6 (S3 saves through a 10 MB/s-per-connection proxy, about 2 minutes); "
        "all: also run the other benchmarks of this package that are present (storage_bench: S3, HTTP "
        "and local throughput; async_blocking) and keep their results in the JSON; they add several minutes",
    )
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="deadline of each spawn of ranks")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, root: str) -> BenchConfig:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = StateSpec(
        total_bytes=int(args.size_mib * MiB),
        num_tensors=args.tensors,
        dtype=_DTYPES[args.dtype],
        device=device,
    )
    return BenchConfig(
        spec=spec,
        root=root,
        save_world_size=args.save_world_size,
        load_world_sizes=tuple(int(w) for w in args.load_world_sizes.split(",") if w.strip()),
        repeats=args.repeats,
        small_tensors=args.small_tensors,
        planning_repeats=args.planning_repeats,
        cold_cache=not args.warm_cache,
        timeout_secs=args.timeout_s,
    )


def measure(cfg: BenchConfig) -> tuple[Results, dict[str, float]]:
    """Run every scenario; the figures, and the run's facts (bytes per rank, baseline RSS)."""
    results = Results()
    info: dict[str, float] = {}

    def collect(values: dict) -> None:
        for (scenario, metric, system, unit), samples in sorted(
            values.items(), key=lambda kv: kv[0][0] != "info"
        ):
            if scenario == "info":
                info[metric] = samples[0]
            else:
                results.add(scenario, metric, system, unit, samples)

    logger.info("save, memory and planning scenarios on %d ranks", cfg.save_world_size)
    collect(
        run_ranks(
            scenarios.save_side,
            cfg.save_world_size,
            cfg,
            device=cfg.spec.device,
            timeout_secs=cfg.timeout_secs,
            share_cores=True,
        )[0]
    )
    for world_size in cfg.load_world_sizes:
        logger.info("load scenario on %d fresh ranks", world_size)
        collect(
            run_ranks(
                scenarios.load_side,
                world_size,
                cfg,
                device=cfg.spec.device,
                timeout_secs=cfg.timeout_secs,
                share_cores=True,
            )[0]
        )
    _add_bandwidths(results, info.get("rank_bytes", 0.0))
    _note_peer_gaps(results, cfg)
    if not hasattr(checkpoint, "make_async_checkpointer"):
        reason = "checkpoint.make_async_checkpointer does not exist in this tree yet"
        for scenario, metric in (
            ("async_blocking", "block_s"),
            ("durable_save", "async_s"),
            ("memory", "async_writers_bytes"),
        ):
            results.missing(scenario, metric, OURS, reason)
    add_ratios(results)
    return results, info


def _note_peer_gaps(results: Results, cfg: BenchConfig) -> None:
    """Scenarios torch-checkpointing cannot run here are reported as such, not left out."""
    reason = peers.import_error()
    if reason is not None:
        for system in (peers.TCKPT, peers.TCKPT_FSYNC):
            results.missing("all", "every scenario", system, reason)
        return
    for world_size in cfg.load_world_sizes:
        gap = peers.TorchCheckpointingSystem.load_missing(cfg.save_world_size, world_size)
        if gap is not None:
            results.missing("load", f"ws{cfg.save_world_size}to{world_size}_s", peers.TCKPT, gap)


def _add_bandwidths(results: Results, rank_bytes: float) -> None:
    """Staging bandwidth per run: the rank's bytes over the time training was blocked (or one plain copy took).

    In GPU mode the copy is device-to-host into pinned memory, so this compares each system's
    staging with the raw pinned-copy bandwidth of the machine.
    """
    for system in (OURS, DCP, scenarios.COPY):
        f = results.find("async_blocking", "block_s", system)
        if f is not None and rank_bytes > 0:
            samples = [rank_bytes / s for s in f.samples if s > 0]
            results.add(
                "async_blocking",
                "staging_bandwidth",
                system,
                "B/s",
                samples,
                note="bytes of the largest rank over the slowest rank's time",
            )


def run_plugins(cfg: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Call each plug-in benchmark that is present with the arguments its signature names."""
    offered = {
        "total_mib": int(args.size_mib),
        "total_bytes": cfg.spec.total_bytes,
        "repeats": cfg.repeats,
        "saves": cfg.repeats + 1,  # async_blocking: the first save, then the steady state
        "world_size": cfg.save_world_size,
        "num_tensors": cfg.spec.num_tensors,
        "device": cfg.spec.device,
        "work_dir": cfg.root,
        "root": os.path.join(cfg.root, "plugin"),
    }
    out: dict[str, Any] = {}
    for module_name, names in PLUGINS.items():
        short = module_name.rsplit(".", 1)[1]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                out[short] = {"error": f"import failed: {e}"}
            continue
        fn = next((getattr(module, n) for n in names if callable(getattr(module, n, None))), None)
        if fn is None:
            out[short] = {"error": f"none of {list(names)} is defined in {module_name}"}
            continue
        kwargs = {k: v for k, v in offered.items() if k in inspect.signature(fn).parameters}
        logger.info("plug-in %s.%s(%s)", module_name, fn.__name__, kwargs)
        start = time.perf_counter()
        try:
            out[short] = {"function": fn.__name__, "kwargs": kwargs, "result": fn(**kwargs)}
        except Exception as e:  # a plug-in's failure must not lose the DCP comparison
            logger.exception("plug-in %s failed", module_name)
            out[short] = {"function": fn.__name__, "kwargs": kwargs, "error": f"{type(e).__name__}: {e}"}
        out[short]["wall_s"] = time.perf_counter() - start
    return out


def _run_s3_goal(cfg: BenchConfig) -> dict[str, Any]:
    """storage_bench in the configuration of goal 6; a failure is reported, not fatal (as a plug-in's)."""
    from benchmarks.storage_bench import run_storage_bench

    kwargs = {**S3_GOAL_KWARGS, "work_dir": cfg.root}
    start = time.perf_counter()
    try:
        out: dict[str, Any] = {
            "function": "run_storage_bench",
            "kwargs": kwargs,
            "result": run_storage_bench(**kwargs),
        }
    except Exception as e:
        logger.exception("the S3 benchmark failed")
        out = {"function": "run_storage_bench", "kwargs": kwargs, "error": f"{type(e).__name__}: {e}"}
    out["wall_s"] = time.perf_counter() - start
    return out


def _commit() -> str:
    """The tree's commit (with "+dirty" when it has uncommitted changes), for the README's table."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    command = " ".join(
        ["python -m benchmarks.run", shlex.join(sys.argv[1:] if argv is None else argv)]
    ).strip()
    root = tempfile.mkdtemp(prefix="shardsafe-bench-", dir=args.work_dir)
    cfg = build_config(args, root)
    started = datetime.datetime.now(datetime.timezone.utc)
    commit = _commit()  # the tree measured: taken before the run, which may outlast a later commit
    start = time.perf_counter()
    try:
        machine = machine_description(root, cfg.spec.device)
        results, info = measure(cfg)
        if args.plugins == "s3":
            plugins = {"storage_bench": _run_s3_goal(cfg)}
        else:
            plugins = run_plugins(cfg, args) if args.plugins == "all" else {}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - start
    machine["load_average_at_end"] = os.getloadavg()  # the others' work on a shared machine shows here
    goal_rows = evaluate(results, cfg.save_world_size, plugins)
    os.makedirs(args.out_dir, exist_ok=True)
    payload = {
        "schema": 1,
        "date": started.isoformat(timespec="seconds"),
        "commit": commit,
        "command": command,
        "wall_s": wall,
        "machine": machine,
        "config": {
            "size_bytes": cfg.spec.total_bytes,
            "tensors": cfg.spec.num_tensors,
            "dtype": args.dtype,
            "device": cfg.spec.device,
            "save_world_size": cfg.save_world_size,
            "load_world_sizes": list(cfg.load_world_sizes),
            "repeats": cfg.repeats,
            "small_tensors": cfg.small_tensors,
            "planning_repeats": cfg.planning_repeats,
            "cold_cache": cfg.cold_cache,
            **info,
        },
        "systems": describe_systems(cfg.spec.device),
        "references": {
            scenarios.COPY: "one copy of the rank's local shards into buffers allocated beforehand"
            + (
                " (device-to-host, pinned, non-blocking, then synchronised)"
                if cfg.spec.device == "cuda"
                else ""
            ),
            scenarios.RAW_WRITE: "dd if=/dev/zero bs=16M iflag=count_bytes conv=fdatasync of the rank's bytes, "
            "every rank at once, one file each",
            scenarios.UNVERIFIED: "shardsafe's load with verify=False, right after its verified warm load",
        },
        "measurement": (
            "times: slowest rank after a barrier; blocking = until the stage future / DCP staging completes; "
            "bytes read: /proc/self/io read_bytes summed over ranks (block-device reads, readahead included)"
            + (", page cache evicted before each load (posix_fadvise DONTNEED)" if cfg.cold_cache else "")
        ),
        "goals": goal_rows,
        "figures": [f.to_json() for f in results.figures],
        "ratios": [r.to_json() for r in results.ratios],
        "unavailable": results.unavailable,
        "plugins": plugins,
    }
    json_path = os.path.join(args.out_dir, "results.json")
    write_json(json_path, payload)
    title = (
        f"shardsafe vs DCP and torch-checkpointing, commit {payload['commit']}: {args.size_mib:g} MiB, {cfg.spec.num_tensors} tensors, saved by "
        f"{cfg.save_world_size} rank{'s' if cfg.save_world_size > 1 else ''} ({cfg.spec.device}), {started:%Y-%m-%d}"
    )
    chart = None
    if not args.no_chart:
        chart = os.path.join(args.out_dir, "results.png")
        if not write_chart(results, chart, title=title):
            chart = None
    load = (
        f"load average {machine['load_average_at_start'][0]:.2f} at the start, "
        f"{machine['load_average_at_end'][0]:.2f} at the end"
    )
    sys.stdout.write(f"{title}; {load}\n\n{format_goals(goal_rows)}\n{format_table(results)}\n")
    if plugins:
        sys.stdout.write(format_plugins(plugins))
    sys.stdout.write(
        f"\nraw figures: {json_path}" + (f"; chart: {chart}" if chart else "") + f"; took {wall:.0f} s\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
