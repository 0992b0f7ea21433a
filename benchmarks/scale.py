"""Planning and metadata at scale, simulated in one process from descriptors.

    python -m benchmarks.scale [--worlds 8,64,512,4096] [--schemes fsdp,fsdp_tp,fsdp_tp_pp]

For each layout (`benchmarks/scale_layouts.py`) and world size W, the save
and load protocols run as each rank would, minus the transport and the tensor
bytes: every figure comes from the library's own functions.

- per-rank planning: build the rank's structure and digest, unpickle the
  broadcast structures, derive its writes (`writes_of`) and pack its files
  (timed on the first and last rank of each pipeline stage; the worst is kept);
- coordinator: pick representatives among W digests, unpickle their
  structures, check them (`check_world`), build and encode the version-2
  metadata (the files table lists every rank's files, sized as the sampled
  rank of its stage);
- plan traffic per rank: pickled bytes a rank sends and receives in the four
  planning exchanges (the worst rank: a representative);
- load plan per rank: parse the metadata, find the chunks of the rank's own
  boxes (`GridIndex.cells`), parse the safetensors headers and checksum
  tables of the writers' files, plan the reads; bytes read are metadata plus
  those headers and tables (the headers are built as the writer would);
- peak memory: the process's peak RSS after the case.

Writes benchmarks/results/scale.json and scale.png; the last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.scale_layouts import LAYERS, SCHEMES, Job, supported
from checkpoint.save.plan_exchange import _representatives, draft_plan
from planners.dtypes import itemsize, safetensors_code
from planners.global_plan import WorldStructure, from_run_lengths, structure_of
from planners.grid import CHECKSUM_ENTRY, _cuts
from planners.load_plan import LoadTarget, build_index, plan_tensor_reads
from planners.metadata import (
    CHECKSUM_BLOCK_BYTES,
    PLAIN_FORMAT_VERSION,
    ChunkRecord,
    FileRecord,
    Metadata,
    TensorRecord,
    shard_file_name,
)
from planners.metadata_parse import parse_metadata
from planners.placement import _chunk_box, _replica_positions, chunk_box, coordinate_of
from planners.save_plan import FilePlan, WriteItem, pack_files
from planners.world_layout import writes_of
from storage.checksummed_shard import checksum_slices
from storage.safetensors_io import parse_header

REPEATS = 3  # runs of each timed step; the fastest is kept
MAX_FILE_BYTES = 2 * 1024**3  # CheckpointerConfig's default
SAVE_ID = "0123456789ab"
RESULTS = Path(__file__).parent / "results"


class _DType:
    """A dtype name with the `itemsize` load planning needs (no torch in the simulation)."""

    def __init__(self, name: str) -> None:
        self.name, self.itemsize = name, itemsize(name)

    def __str__(self) -> str:
        return self.name


def _rank_files(world: WorldStructure, rank: int) -> tuple[FilePlan, ...]:
    items = [
        WriteItem(
            fqn=w.fqn, dtype=w.dtype, global_shape=w.global_shape, box=w.box, nbytes=w.nbytes, grid=w.grid
        )
        for w in writes_of(world, rank)
    ]
    return pack_files(rank, items, MAX_FILE_BYTES)


def _plan_rank(job: Job, rank: int, payload: bytes, runs: list) -> tuple[float, tuple[FilePlan, ...]]:
    """One rank's planning: its structure and digest, the received structures, its writes and files."""
    start = time.process_time()
    structure_of(job.descriptors(rank), []).digest()
    world = WorldStructure(structures=pickle.loads(payload), rank_structure=from_run_lengths(runs))
    files = _rank_files(world, rank)
    return time.process_time() - start, files


def _coordinator(
    job: Job, digests: list[str], sent: dict[int, bytes], files: dict[int, Any]
) -> tuple[float, bytes]:
    """The coordinator's share: representatives, checks, metadata. Returns (seconds, metadata JSON)."""
    from planners.world_check import check_world

    start = time.process_time()
    reps, runs, _ = _representatives([(d, "") for d in digests])
    world = WorldStructure(
        structures=tuple(pickle.loads(sent[r])[0] for r in reps), rank_structure=from_run_lengths(runs)
    )
    check_world(world)
    draft = draft_plan(world)
    table = {}
    for rank in range(job.world_size):
        for fp in files[job.stage_of(rank)]:
            stem = f"r{rank:05d}-{fp.stem.split('-')[1]}"
            table[shard_file_name(SAVE_ID, stem)] = FileRecord(nbytes=fp.nbytes, rank=rank)
    tensors = {k: TensorRecord(dtype=d, shape=s, chunks=()) for k, (d, s) in draft.tensors.items()}
    metadata = Metadata(
        version=PLAIN_FORMAT_VERSION,
        save_id=SAVE_ID,
        world_size=job.world_size,
        checksum_block_bytes=CHECKSUM_BLOCK_BYTES,
        tensors=tensors,
        values={},
        rank_local={},
        files=table,
        structure={"dict": [[k, {"tensor": k}] for k in tensors]},
        **draft.grid_fields,
    )
    data = metadata.to_json()
    return time.process_time() - start, data


def _header(fp: FilePlan, rank: int) -> tuple[bytes, int]:
    """The safetensors header (length prefix excluded) a writer puts on `fp`, and the file's size."""
    header: dict[str, Any] = {"__metadata__": {"format": "shardsafe", "save_id": SAVE_ID, "rank": str(rank)}}
    offset = blocks = 0
    for item in fp.items:
        header[item.fqn] = {
            "dtype": safetensors_code(item.dtype),
            "shape": list(item.box.sizes),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
        blocks += -(-item.nbytes // CHECKSUM_BLOCK_BYTES)
    header[CHECKSUM_ENTRY] = {
        "dtype": "U32",
        "shape": [blocks],
        "data_offsets": [offset, offset + 4 * blocks],
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, 8 + len(raw) + offset + 4 * blocks


def _load_rank(job: Job, rank: int, data: bytes, world: WorldStructure) -> tuple[float, int]:
    """One loading rank (same layout): seconds to plan its reads, and metadata/header/table bytes read."""
    files: dict[str, tuple[bytes, int]] = {}  # the writers' file headers, as storage would return them
    built: set[int] = set()
    start = time.process_time()
    md = parse_metadata(data, where="sim")
    index = md.grid_index()
    by_rank: dict[int, list[str]] = {}
    for name, f in sorted(md.files.items()):
        by_rank.setdefault(f.rank, []).append(name)
    parsed: dict[str, Any] = {}
    read = len(data)
    items = needed = 0
    descriptors = job.descriptors(rank)
    coordinates: dict[int, tuple[int, ...]] = {}  # per mesh: what the rank's DeviceMesh tells it
    for fqn, dtype, shape, layout in descriptors:
        if id(layout.ranks) not in coordinates:
            coordinates[id(layout.ranks)] = coordinate_of(layout.ranks.index(rank), layout.mesh_shape)
        box = chunk_box(
            shape,
            layout.mesh_shape,
            coordinates[id(layout.ranks)],
            layout.placements,
        )
        chunks = []
        for cell in index.cells(fqn, box):
            for name in by_rank[cell.writer]:
                if name not in parsed:
                    pause = time.process_time()
                    if cell.writer not in built:  # what the writer wrote: built outside the timing
                        built.add(cell.writer)
                        for fp in _rank_files(world, cell.writer):
                            nm = shard_file_name(SAVE_ID, fp.stem)
                            files[nm] = _header(fp, cell.writer)
                    start += time.process_time() - pause
                    raw, size = files[name]
                    header = parse_header(raw, file_bytes=size, where=name)
                    parsed[name] = (
                        header,
                        checksum_slices(header, block_bytes=md.checksum_block_bytes, where=name),
                    )
                    read += 8 + len(raw) + header.tensors[CHECKSUM_ENTRY].nbytes
                header, slices = parsed[name]
                entry = header.tensors.get(fqn)
                if entry is not None:
                    first, count = slices[fqn]
                    chunks.append(
                        ChunkRecord(
                            box=cell.box,
                            file=name,
                            key=fqn,
                            offset_bytes=entry.offset_bytes,
                            nbytes=entry.nbytes,
                            checksums=(0,) * count,
                        )
                    )
                    break
        needed += box.numel > 0
        record = TensorRecord(dtype=dtype, shape=shape, chunks=tuple(chunks))
        target = LoadTarget(fqn=fqn, dtype=_DType(dtype), global_shape=shape, box=box)
        items += len(
            plan_tensor_reads(target, record, build_index(record), block_bytes=md.checksum_block_bytes)
        )
    assert items >= needed, (items, needed)
    return time.process_time() - start, read


def _best(run: Any, repeats: int = REPEATS) -> Any:
    """The fastest of `repeats` runs, each with the planners' caches emptied first (a process plans
    once, cold), so a busy shared machine does not inflate the figure."""
    results = []
    for _ in range(repeats):
        _chunk_box.cache_clear()
        _replica_positions.cache_clear()
        _cuts.cache_clear()
        results.append(run())
    return min(results, key=lambda r: r[0])


def simulate(scheme: str, world_size: int, *, layers: int = LAYERS) -> dict[str, Any]:
    """Every figure of one (layout, world size) case."""
    job = Job(scheme, world_size, layers=layers)
    structures = [structure_of(job.descriptors(r), []) for r in job.representatives()]
    stage_digest = [s.digest() for s in structures]
    digests = [stage_digest[job.structure_of_rank(r)] for r in range(world_size)]
    reps, runs, value_reps = _representatives([(d, "") for d in digests])
    # Exchange 3 sends (structure, nesting tree, value digests); the tree is a few bytes per key.
    sent = {r: pickle.dumps((structures[job.structure_of_rank(r)], None, {})) for r in reps}
    reps_msg = pickle.dumps((reps, runs, value_reps))
    # Equal structures (empty pipeline stages of a short model) are one: the exchange sends each once.
    structures = [structures[job.structure_of_rank(r)] for r in reps]
    payload = pickle.dumps(tuple(structures))
    digest_msg = pickle.dumps(("f" * 64, stage_digest[0], "f" * 64))
    traffic = len(digest_msg) + max(len(b) for b in sent.values()) + len(reps_msg) + len(payload)
    plan_s, files = 0.0, {}
    for rank in job.sample_ranks():
        seconds, rank_files = _best(lambda rank=rank: _plan_rank(job, rank, payload, runs))
        plan_s = max(plan_s, seconds)
        files.setdefault(job.stage_of(rank), rank_files)
    coordinator_s, data = _best(lambda: _coordinator(job, digests, sent, files))
    world = WorldStructure(structures=tuple(structures), rank_structure=from_run_lengths(runs))
    loads = [_best(lambda rank=rank: _load_rank(job, rank, data, world)) for rank in (0, world_size - 1)]
    return {
        "scheme": scheme,
        "world_size": world_size,
        "tensors": len({t.fqn for s in structures for t in s.tensors}),
        "distinct_structures": len(structures),
        "plan_rank_s": plan_s,
        "coordinator_s": coordinator_s,
        "plan_traffic_bytes_per_rank": traffic,
        "metadata_bytes": len(data),
        "load_plan_rank_s": max(s for s, _ in loads),
        "load_read_bytes_per_rank": max(b for _, b in loads),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


_FIGURES = [
    ("plan_rank_s", "per-rank planning (s)"),
    ("coordinator_s", "coordinator (s)"),
    ("plan_traffic_bytes_per_rank", "plan traffic per rank (B)"),
    ("metadata_bytes", "metadata (B)"),
    ("load_plan_rank_s", "load plan per rank (s)"),
    ("load_read_bytes_per_rank", "metadata+headers read per rank (B)"),
]


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, _FIGURES):
        for scheme in SCHEMES:
            pts = [(r["world_size"], r[key]) for r in rows if r["scheme"] == scheme and r[key] > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=scheme)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("world size")
    axes.flat[0].legend()
    fig.suptitle("shardsafe planning and metadata vs world size (Llama-70B shape, 2,169 tensors)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict[str, Any]]) -> str:
    top = max(r["world_size"] for r in rows)
    at_top = [r for r in rows if r["world_size"] == top]
    growth = []
    for scheme in SCHEMES:
        mine = {r["world_size"]: r for r in rows if r["scheme"] == scheme}
        base = 64 if 64 in mine else min(mine, default=top)
        for key in (
            "plan_rank_s",
            "plan_traffic_bytes_per_rank",
            "load_plan_rank_s",
            "load_read_bytes_per_rank",
        ):
            if base in mine and top in mine and base != top:
                growth.append(mine[top][key] / mine[base][key])
    g = f"{max(growth):.2f}x" if growth else "n/a"
    return (
        f"scale summary W={top}: per-rank plan <= {max(r['plan_rank_s'] for r in at_top):.3f}s, "
        f"coordinator <= {max(r['coordinator_s'] for r in at_top):.3f}s, "
        f"plan traffic <= {max(r['plan_traffic_bytes_per_rank'] for r in at_top) / 1e6:.2f}MB/rank, "
        f"metadata <= {max(r['metadata_bytes'] for r in at_top) / 1e6:.2f}MB, "
        f"load plan <= {max(r['load_plan_rank_s'] for r in at_top):.3f}s, "
        f"read <= {max(r['load_read_bytes_per_rank'] for r in at_top) / 1e6:.2f}MB/rank; "
        f"worst per-rank growth from W=64: {g}"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="8,64,512,4096")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--out", default=str(RESULTS), help="folder for scale.json and scale.png")
    parser.add_argument(
        "--layers", type=int, default=LAYERS, help="transformer layers (default 80: Llama-70B)"
    )
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    print(
        f"{'layout':<11} {'W':>5} {'plan/rank s':>11} {'coord s':>8} {'traffic/rank':>12} {'metadata':>10} {'load plan s':>11} {'read/rank':>10} {'peak RSS':>9}"
    )
    for scheme in args.schemes.split(","):
        for w in worlds:
            if not supported(scheme, w):
                print(f"{scheme:<11} {w:>5} (needs a multiple of its model-parallel size: skipped)")
                continue
            r = simulate(scheme, w, layers=args.layers)
            rows.append(r)
            print(
                f"{scheme:<11} {w:>5} {r['plan_rank_s']:>11.3f} {r['coordinator_s']:>8.3f} "
                f"{r['plan_traffic_bytes_per_rank'] / 1e3:>10.1f}KB {r['metadata_bytes'] / 1e6:>8.2f}MB "
                f"{r['load_plan_rank_s']:>11.3f} {r['load_read_bytes_per_rank'] / 1e6:>8.2f}MB {r['peak_rss_bytes'] / 1e6:>7.0f}MB",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    (out / "scale.json").write_text(json.dumps(doc, indent=1))
    chart(rows, out / "scale.png")
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
