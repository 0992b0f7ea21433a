"""The local tier as `CheckpointManager` drives it: set-up, local saves, commit, retention, shutdown.

Every rank builds a `LocalTier` together (it is collective, like the
manager). The node's local rank 0 cleans leftovers of a killed job from its
`local_root` and starts the node's server (`checkpoint.tiers.server`); the
ranks then share every node's server URL and rank 0's random token over the
manager's gloo group. At the first local save they build their own async
checkpointer for local saves (a second writer process per rank, so a local
save never waits for a durable one), whose commit hook (`checkpoint.tiers.replicate`) copies each file to its
replica nodes before the commit.

A local save at step N: the ranks agree that every node has room for it (else
it is skipped with one warning), stage (the only time the training thread
blocks) and return. The next local save, `wait()` and `close()` first wait for
the save in flight; then the ranks meet once (so rank 0's metadata has reached
every node) and each node's local rank 0 deletes local steps past
`keep_last`. A failed local save is logged, never raised: the durable tier is
the one that must not fail quietly.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from checkpoint.manager.signals import max_over_ranks
from checkpoint.manager.steps import STEP_DIR_RE, StepRecord, step_dir_name
from checkpoint.state.flatten import RankLocal
from checkpoint.tiers.replicate import ReplicaHook
from checkpoint.tiers.server import TierServer
from checkpoint.tiers.tier_files import TEMP_MARK, list_holdings, local_records
from planners.metadata import METADATA_FILE
from planners.tier_placement import commit_targets, effective_replicas

logger = logging.getLogger(__name__)

# Where a node's server listens when neither `local_address` nor this variable says: the host's address.
ADDRESS_ENV = "SHARDSAFE_NODE_ADDR"
# Free space kept beyond a local save's estimate (bytes), so a tier never fills `/dev/shm` to the brim.
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeLayout:
    """Where this rank runs: its node (torchrun's GROUP_RANK), rank on the node, and every node's server."""

    rank: int
    node: int
    local_rank: int
    local_world_size: int
    servers: Mapping[int, str]

    @property
    def num_nodes(self) -> int:
        return len(self.servers)


class LocalTier:
    """One rank's side of the node-local tier (see the module docstring); built by `CheckpointManager`."""

    def __init__(
        self,
        local_root: str,
        *,
        interval_steps: int,
        keep_last: int,
        replicas: int,
        group: dist.ProcessGroup | None,
        address: str | None = None,
    ) -> None:
        self.root = os.path.abspath(local_root)
        self.interval_steps, self.keep_last, self.group = interval_steps, keep_last, group
        node, local_rank, local_world = _node_env()
        self._server: TierServer | None = None
        token = _shared(secrets.token_hex(16), group)
        if local_rank == 0:
            clean_leftovers(self.root)
            host = address or os.environ.get(ADDRESS_ENV) or socket.gethostbyname(socket.gethostname())
            self._server = TierServer(self.root, host=host, token=token, node=node)
        url = self._server.start() if self._server is not None else None
        rank = dist.get_rank() if group is not None else 0
        entries = _all_gather((node, local_rank, url), group)
        servers = {n: u for n, lr, u in entries if lr == 0 and u is not None}
        self.layout = NodeLayout(
            rank=rank, node=node, local_rank=local_rank, local_world_size=local_world, servers=servers
        )
        self.replicas = effective_replicas(replicas, self.layout.num_nodes)
        if self.replicas < replicas and rank == 0:
            logger.warning(
                "local tier: %d replica(s) asked for, but the job has %d node(s): keeping %d",
                replicas,
                self.layout.num_nodes,
                self.replicas,
            )
        self.token = token
        targets = commit_targets(node, self.layout.num_nodes, self.replicas)
        self._hook = ReplicaHook(
            node=node,
            targets=tuple((n, servers[n]) for n in targets),
            everyone=tuple((n, u) for n, u in sorted(servers.items()) if n != node),
            token=token,
        )
        self._ckpt: Any = (
            None  # built at the first local save (collective), so a job that only loads spawns none
        )
        self._pending: tuple[int, Future[Any]] | None = None
        self._newest: int | None = None
        self._uploader: Any = None  # built at the first durable save by upload (collective)
        self._upload: tuple[int, Future[None]] | None = None  # the upload in flight or last failed

    # --- saves ------------------------------------------------------------------------------------

    def on_save(self, step: int, state: Any) -> tuple[bool, bool]:
        """The manager's `save(step)` (every rank): (a local save started, the last upload failed)."""
        retry = self.upload_failed()
        return self.due(step) and self.save(step, state), retry

    def due(self, step: int) -> bool:
        return step % self.interval_steps == 0 and (self._newest is None or step > self._newest)

    def save(self, step: int, state: Any) -> bool:
        """Start a local save of `state` at `step` (every rank); False when the ranks agreed to skip it."""
        self.wait()
        copies = self.layout.num_nodes if self.layout.node == 0 else 1 + self.replicas  # see commit_targets
        need = _estimate_node_bytes(state, self.layout.local_world_size, copies - 1)
        free = shutil.disk_usage(self.root).free
        short = free < need + FREE_SPACE_MARGIN_BYTES
        if max_over_ranks(int(short), self.group):
            if short and self.layout.local_rank == 0:
                logger.warning(
                    "local tier: skipping the local save of step %d: node %d has %d bytes free in %s, "
                    "the step and its replicas need about %d",
                    step,
                    self.layout.node,
                    free,
                    self.root,
                    need,
                )
            return False
        path = os.path.join(self.root, step_dir_name(step))
        os.makedirs(path, exist_ok=True)  # the save prepares the directory on the coordinator's node only
        if self._ckpt is None:
            from checkpoint.builder import make_async_checkpointer

            self._ckpt = make_async_checkpointer(commit_hook=self._hook)
        stage, write = self._ckpt.save(state, path, overwrite=True, path_per_node=True)
        stage.result()
        self._pending, self._newest = (step, write), step
        return True

    def wait(self) -> None:
        """Wait for the local save in flight (every rank); log its failure; then apply retention."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step, future = pending
        failed = 0
        try:
            future.result()
        except Exception as e:  # a local save must never fail training; the durable tier still runs
            failed = 1
            logger.warning("local tier: the local save of step %d failed and is not used: %s", step, e)
        if max_over_ranks(failed, self.group) == 0 and self.layout.rank == 0:
            logger.info(
                "local tier: step %d committed on %d node(s) with %d replica(s) each file",
                step,
                self.layout.num_nodes,
                self.replicas,
            )
        if self.layout.local_rank == 0:
            uploading = self._upload is not None and not self._upload[1].done()
            prune(self.root, self.keep_last, keep={self._upload[0]} if uploading else set())

    # --- durable saves by upload (`checkpoint.tiers.upload`) ---------------------------------------

    def uploading(self, ckpt: Any, step: int) -> Any:
        """A stand-in for `ckpt` whose `save()` uploads this step's local files (`upload.UploadSave`)."""
        from checkpoint.tiers.upload import UploadSave

        return UploadSave(tier=self, checkpointer=ckpt, step=step)

    def upload(self, step: int, spec: Any) -> Future[None]:
        """Upload the local save of `step` (just started) to the durable step `spec` (every rank)."""
        from checkpoint.tiers.upload import Uploader, UploadJob

        assert self._pending is not None and self._pending[0] == step  # the manager checked it
        if self._uploader is None:
            self._uploader = Uploader(self.group)
        job = UploadJob(
            step=step,
            local_dir=os.path.join(self.root, step_dir_name(step)),
            spec=spec,
            local_write=self._pending[1],
        )
        future = self._uploader.start(job)
        self._upload = (step, future)
        return future

    def upload_failed(self) -> bool:
        """Whether the last upload failed on some rank (collective while one is outstanding; then True once).

        All ranks agree (one all-reduce), since the manager answers with a staged durable save.
        """
        if self._upload is None:
            return False
        future = self._upload[1]
        failed = future.done() and future.exception() is not None
        # 2: it failed on some rank; 1: it still runs on some rank; 0: it committed (every rank agrees).
        state = max_over_ranks(2 if failed else int(not future.done()), self.group)
        if state != 1:
            self._upload = None
        return state == 2

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._uploader is not None:
                self._uploader.close()
            if self._ckpt is not None:
                self._ckpt.close()
            if self._server is not None:
                self._server.stop()

    # --- queries ----------------------------------------------------------------------------------

    def records(self) -> list[StepRecord]:
        """This node's committed local steps, as records of the tier `local`."""
        return local_records(self.root)

    def loaded(self, step: int) -> None:
        self._newest = step


def prune(root: str, keep_last: int, keep: set[int] | frozenset[int] = frozenset()) -> None:
    """Keep this node's newest `keep_last` committed steps and `keep` (a step uploading); delete the rest."""
    held = list_holdings(root)
    committed = sorted(s for s, h in held.items() if h.committed)
    if not committed:
        return
    keep = set(committed[-keep_last:]) | set(keep)
    for step in sorted(held):
        if step not in keep and step < committed[-1]:
            _remove_step_dir(os.path.join(root, step_dir_name(step)))
            logger.info("local tier: deleted step %d from %s", step, root)


def clean_leftovers(root: str) -> None:
    """At start: temporary names of interrupted receipts, and incomplete steps older than the newest
    committed one (they can never be loaded). Newer incomplete ones may hold verified copies a
    recovery can still use; the first commit of this job's own local save prunes them."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        directory = os.path.join(root, name)
        if STEP_DIR_RE.fullmatch(name) and os.path.isdir(directory) and not os.path.islink(directory):
            for entry in os.listdir(directory):
                if TEMP_MARK in entry:
                    os.unlink(os.path.join(directory, entry))
    held = list_holdings(root)
    committed = [s for s, h in held.items() if h.committed]
    for step, h in held.items():
        if not h.committed and committed and step < max(committed):
            _remove_step_dir(os.path.join(root, step_dir_name(step)))
            logger.info("local tier: removed leftover incomplete step %d from %s", step, root)


def _remove_step_dir(directory: str) -> None:
    """The commit marker first, so a deletion cut short leaves an incomplete step, never a false one."""
    try:
        os.unlink(os.path.join(directory, METADATA_FILE))
    except FileNotFoundError:
        pass
    shutil.rmtree(directory, ignore_errors=True)


def _node_env() -> tuple[int, int, int]:
    """(node, local rank, ranks on this node) from torchrun's variables; one node without them."""
    if "GROUP_RANK" in os.environ and "LOCAL_RANK" in os.environ:
        return (
            int(os.environ["GROUP_RANK"]),
            int(os.environ["LOCAL_RANK"]),
            int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
    if dist.is_available() and dist.is_initialized():
        return 0, dist.get_rank(), dist.get_world_size()
    return 0, 0, 1


def _shared(value: Any, group: dist.ProcessGroup | None) -> Any:
    """Rank 0's `value` on every rank."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _all_gather(value: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if group is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _estimate_node_bytes(state: Any, local_world_size: int, replicas: int) -> int:
    """Bytes a local save needs on this node: this rank's tensors, times its node's ranks and copies."""
    return _tensor_bytes(state) * local_world_size * (1 + replicas)


def _tensor_bytes(value: Any, depth: int = 0) -> int:
    if depth > 64:
        return 0
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, depth + 1) for v in value)
    if isinstance(value, RankLocal):
        return _tensor_bytes(value.value, depth + 1)
    if callable(getattr(value, "state_dict", None)):
        return _tensor_bytes(value.state_dict(), depth + 1)
    return 0
