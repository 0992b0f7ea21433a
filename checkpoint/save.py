"""The save protocol, in the order every rank runs it.

1. `describe_local`: flatten-derived local plan, encoded values (no I/O).
2. `prepare_save`: the coordinator learns whether every rank's plan digest
   matches the cached global plan; only if not are full local plans gathered
   and a new global plan scattered. The coordinator also checks the path and
   writes this save's in-progress marker (`checkpoint.lease`) before any rank
   writes a shard file.
3. `write_rank_files`: each rank streams its shard files (any process: the
   trainer for a sync save, the writer process for an async one).
4. `commit_save` (`checkpoint.commit`): write results go to the coordinator,
   which checks every reported file's stored size, then writes the metadata
   last (without replacing one unless the save passed overwrite=True); every
   rank learns the outcome, so all raise together.

Every rank joins every exchange even after a local failure; the failure
travels in the exchange instead of leaving the others waiting.
"""

from __future__ import annotations

import logging
import pickle
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from checkpoint import lease
from checkpoint.collectives import COORDINATOR, Exchange
from checkpoint.flatten import FlatStateDict, flatten_state_dict
from checkpoint.options import SaveOptions
from checkpoint.plan_exchange import agree_world, draft_plan, local_structure, rank_plan
from planners.boxes import Box, full_box
from planners.dtypes import dtype_name
from planners.errors import (
    CheckpointError,
    CheckpointExistsError,
    DistributedCheckpointError,
    InvalidStateDictError,
    StorageError,
)
from planners.metadata import (
    CHECKSUM_BLOCK_BYTES,
    METADATA_FILE,
    shard_file_name,
)
from planners.placement import Layout
from planners.save_plan import FilePlan, GlobalPlan, LocalPlan, RankPlan, WriteItem
from planners.values import JSON, encode_value
from storage.backend import CheckpointStorage
from storage.checksummed_shard import write_checksummed_shard
from storage.safetensors_io import WrittenTensor, write_safetensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalSave:
    """One rank's view of a save: its plan, the tensors behind it, its encoded values."""

    plan: LocalPlan
    tensors: dict[str, torch.Tensor]  # fqn -> this rank's chunk (or rank-local tensor)
    values: dict[str, JSON]
    rank_local_values: dict[str, JSON]
    structure: JSON
    layouts: dict[str, Layout | None] = field(default_factory=dict)  # fqn -> DTensor layout (None: plain)


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataDraft:
    """What the coordinator knows before the writes; completed by the write results."""

    global_plan: GlobalPlan
    values: dict[str, JSON]
    structure: JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedSave:
    """Everything a rank needs to write and commit one save (picklable: it goes to the writer process)."""

    url: str
    save_id: str
    rank: int
    world_size: int
    files: tuple[FilePlan, ...]
    rank_local_values: dict[str, JSON]
    draft: MetadataDraft | None  # coordinator only
    plan_reused: bool = False
    overwrite: bool = False  # the commit may replace an existing metadata file


@dataclass(frozen=True, slots=True, kw_only=True)
class WrittenChunk:
    """One chunk as written: the plan's key, box and dtype, with where the writer put its bytes (`WrittenTensor`)."""

    fqn: str
    box: Box
    dtype: str
    rank_local: bool
    file: str
    written: WrittenTensor


@dataclass(frozen=True, slots=True, kw_only=True)
class RankWriteResult:
    """A rank's report to the coordinator: the file sizes and chunks to commit, or the error that stops it."""

    rank: int
    files: dict[str, int] = field(default_factory=dict)  # name -> nbytes
    chunks: tuple[WrittenChunk, ...] = ()
    rank_local_values: dict[str, JSON] = field(default_factory=dict)
    error: str | None = None


@dataclass(slots=True)
class PlanCache:
    """The last global plan, reused while no rank's plan digest changes."""

    digests: list[str] | None = None  # coordinator only
    rank_plan: RankPlan | None = None
    draft_plan: GlobalPlan | None = None  # coordinator only


@dataclass(frozen=True, slots=True, kw_only=True)
class _Decision:
    save_id: str
    reuse: bool
    error: BaseException | None = None
    failures: dict[int, BaseException] = field(default_factory=dict)


def describe_local(flat: FlatStateDict, rank: int, *, allow_pickle: bool) -> LocalSave:
    """Local plan and encoded values of one rank (raises on unsupported leaves)."""
    held = [(leaf.fqn, leaf.local) for leaf in flat.tensors.values()]
    held += [(fqn, h.value) for fqn, h in flat.rank_local.items() if isinstance(h.value, torch.Tensor)]
    for fqn, t in held:
        if t.device.type == "meta":
            raise InvalidStateDictError(
                f"key {fqn!r}: tensor is on the meta device and holds no data; materialise it before saving"
            )
    items = [
        WriteItem(
            fqn=leaf.fqn,
            dtype=dtype_name(leaf.local.dtype, key=leaf.fqn),
            global_shape=leaf.global_shape,
            box=leaf.box,
            nbytes=leaf.local.numel() * leaf.local.element_size(),
        )
        for leaf in flat.tensors.values()
        if leaf.local.numel() or not leaf.box.numel  # a rank's empty shard holds nothing to write
    ]
    tensors = {leaf.fqn: leaf.local for leaf in flat.tensors.values()}
    rank_local_values = {}
    for fqn, holder in flat.rank_local.items():
        if isinstance(holder.value, torch.Tensor):
            t = holder.value
            items.append(
                WriteItem(
                    fqn=fqn,
                    dtype=dtype_name(t.dtype, key=fqn),
                    global_shape=tuple(t.shape),
                    box=full_box(t.shape),
                    nbytes=t.numel() * t.element_size(),
                    rank_local=True,
                )
            )
            tensors[fqn] = t
        else:
            rank_local_values[fqn] = encode_value(holder.value, key=fqn, allow_pickle=allow_pickle)
    values = {fqn: encode_value(v, key=fqn, allow_pickle=allow_pickle) for fqn, v in flat.values.items()}
    keys = tuple(sorted([*flat.tensors, *flat.values, *flat.rank_local]))
    plan = LocalPlan(rank=rank, items=tuple(items), keys=keys)
    return LocalSave(
        plan=plan,
        tensors=tensors,
        values=values,
        rank_local_values=rank_local_values,
        structure=flat.structure,
        layouts={leaf.fqn: leaf.layout for leaf in flat.tensors.values()},
    )


def portable_error(e: BaseException) -> BaseException:
    """`e` if it survives pickling (it travels to other ranks), else a CheckpointError with its text."""
    try:
        pickle.loads(pickle.dumps(e))  # allow_pickle: our own exception object, never a file
        return e
    except Exception:
        return CheckpointError(f"{type(e).__name__}: {e}")


def describe_or_error(state_dict: Any, rank: int, *, allow_pickle: bool) -> LocalSave | BaseException:
    """`describe_local` of a state dict, or the error it raised.

    The error is not raised here: it travels through the plan exchange, so the
    other ranks fail with it instead of waiting for this one.
    """
    try:
        return describe_local(flatten_state_dict(state_dict), rank, allow_pickle=allow_pickle)
    except Exception as e:
        return e


def _raise_failures(rank: int, failures: Mapping[int, BaseException], url: str) -> None:
    if not failures:
        return
    if rank in failures:
        raise failures[rank]
    raise DistributedCheckpointError(
        f"save to {url} failed on rank(s) {sorted(failures)}; nothing was committed",
        {r: f"{type(e).__name__}: {e}" for r, e in failures.items()},
    )


def prepare_save(
    local: LocalSave | BaseException,
    exchange: Exchange,
    storage: CheckpointStorage,
    cache: PlanCache,
    *,
    overwrite: bool,
    max_file_bytes: int,
    lease_secs: float = 300.0,
) -> PreparedSave:
    """Agree on the plan for this save (collective: every rank calls it, even after a local error).

    The coordinator claims the save's in-progress marker (`lease_secs`) before the plan reaches any rank.
    """
    coordinator = exchange.rank == COORDINATOR
    digests = exchange.gather(
        portable_error(local) if isinstance(local, BaseException) else local.plan.fingerprint()
    )
    decision = None
    if coordinator:
        assert digests is not None
        decision = _decide(digests, storage, cache, overwrite=overwrite, lease_secs=lease_secs)
    decision = exchange.broadcast(decision)
    if decision.error is not None:
        raise decision.error
    _raise_failures(exchange.rank, decision.failures, storage.url)
    assert isinstance(local, LocalSave)
    if not decision.reuse:
        try:
            _replan(local, exchange, cache, max_file_bytes=max_file_bytes, url=storage.url)
        except Exception:
            if coordinator:  # no rank writes anything of this save: its marker goes now
                lease.release_quietly(storage, decision.save_id)
            raise
    assert cache.rank_plan is not None
    draft = None
    if coordinator:
        assert cache.draft_plan is not None
        draft = MetadataDraft(global_plan=cache.draft_plan, values=local.values, structure=local.structure)
    return PreparedSave(
        url=storage.url,
        save_id=decision.save_id,
        rank=exchange.rank,
        world_size=exchange.world_size,
        files=cache.rank_plan.files,
        rank_local_values=local.rank_local_values,
        draft=draft,
        plan_reused=decision.reuse,
        overwrite=overwrite,
    )


def plan_save(
    state_dict: Any,
    exchange: Exchange,
    storage: CheckpointStorage,
    cache: PlanCache,
    *,
    options: SaveOptions,
    max_file_bytes: int,
    lease_secs: float = 300.0,
    failure: BaseException | None = None,
) -> tuple[LocalSave, PreparedSave]:
    """Steps 1 and 2 for a trainer rank (collective); `failure` replaces this rank's local step.

    `options` are the save() keyword arguments, typed at the API boundary.
    """
    local = failure or describe_or_error(state_dict, exchange.rank, allow_pickle=options.allow_pickle)
    prepared = prepare_save(
        local,
        exchange,
        storage,
        cache,
        overwrite=options.overwrite,
        max_file_bytes=max_file_bytes,
        lease_secs=lease_secs,
    )
    assert isinstance(local, LocalSave)  # prepare_save raised otherwise
    return local, prepared


def _decide(
    digests: list[Any], storage: CheckpointStorage, cache: PlanCache, *, overwrite: bool, lease_secs: float
) -> _Decision:
    save_id = secrets.token_hex(6)
    failures = {r: d for r, d in enumerate(digests) if isinstance(d, BaseException)}
    if failures:
        return _Decision(save_id=save_id, reuse=False, failures=failures)
    try:
        storage.prepare()
        if storage.exists(METADATA_FILE) and not overwrite:
            raise CheckpointExistsError(
                f"a complete checkpoint already exists at {storage.url}; pass overwrite=True to save() to replace it"
            )
        lease.claim(storage, save_id, lease_secs)
    except Exception as e:
        return _Decision(save_id=save_id, reuse=False, error=portable_error(e))
    return _Decision(save_id=save_id, reuse=cache.digests == digests)


def _replan(local: LocalSave, exchange: Exchange, cache: PlanCache, *, max_file_bytes: int, url: str) -> None:
    """Agree on structures and derive this rank's files (checkpoint/plan_exchange.py); no chunk list travels."""
    cache.digests = None
    fingerprint = local.plan.fingerprint()
    structure = local_structure(local.plan, local.layouts, rank=exchange.rank)
    world, fingerprints = agree_world(structure, fingerprint, exchange)
    cache.rank_plan = rank_plan(world, local.plan, rank=exchange.rank, max_file_bytes=max_file_bytes)
    if exchange.rank == COORDINATOR:
        cache.draft_plan = draft_plan(world)
        cache.digests = fingerprints


def write_rank_files(
    storage: CheckpointStorage,
    prepared: PreparedSave,
    tensors: Mapping[str, torch.Tensor],
    *,
    io_threads: int,
) -> RankWriteResult:
    """Write this rank's shard files; failures are returned, not raised, so the commit can report them."""
    try:
        header = {"format": "shardsafe", "save_id": prepared.save_id, "rank": str(prepared.rank)}

        def one(fp: FilePlan) -> tuple[str, int, list[WrittenChunk]]:
            name = shard_file_name(prepared.save_id, fp.stem)
            entries = [(item.fqn, tensors[item.fqn]) for item in fp.items]
            # Version 2: a file holding grid chunks carries their checksums (storage/checksummed_shard.py).
            write = write_checksummed_shard if any(i.grid for i in fp.items) else write_safetensors
            try:
                with storage.open_write(name) as f:
                    written, nbytes = write(f, entries, metadata=header, block_bytes=CHECKSUM_BLOCK_BYTES)
                    if f.tell() != nbytes:
                        raise StorageError(f"{f.tell()} bytes were written but the file needs {nbytes}")
            except Exception as e:
                if isinstance(e, StorageError) and name in str(e):
                    raise
                raise StorageError(f"{prepared.url}/{name}: {type(e).__name__}: {e}") from e
            chunks = [  # grid chunks need no record: their key's grid and the file header locate them
                WrittenChunk(
                    fqn=i.fqn, box=i.box, dtype=i.dtype, rank_local=i.rank_local, file=name, written=w
                )
                for i, w in zip(fp.items, written)
                if not i.grid
            ]
            return name, nbytes, chunks

        if len(prepared.files) > 1 and io_threads > 1:
            with ThreadPoolExecutor(
                max_workers=min(io_threads, len(prepared.files)), thread_name_prefix="shardsafe-write"
            ) as pool:
                done = list(pool.map(one, prepared.files))
        else:
            done = [one(fp) for fp in prepared.files]
        return RankWriteResult(
            rank=prepared.rank,
            files={n: b for n, b, _ in done},
            chunks=tuple(c for _, _, cs in done for c in cs),
            rank_local_values=prepared.rank_local_values,
        )
    except Exception as e:
        logger.exception("rank %d: writing shard files to %s failed", prepared.rank, prepared.url)
        return RankWriteResult(rank=prepared.rank, error=f"{type(e).__name__}: {e}")


def timed(label: str, timings: dict[str, float]):
    """Context manager that adds the elapsed seconds of a phase to `timings`."""
    return _Timer(label, timings)


class _Timer:
    def __init__(self, label: str, timings: dict[str, float]) -> None:
        self.label, self.timings = label, timings

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.label] = self.timings.get(self.label, 0.0) + time.perf_counter() - self.start
