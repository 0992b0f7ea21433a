"""The local tier as `CheckpointManager` drives it: set-up, local saves, commit, retention, shutdown.

Every rank builds a `LocalTier` together (it is collective, like the
manager). The node's local rank 0 cleans leftovers of a killed job from its
`local_root` and starts the node's server (`checkpoint.tiers.server`); the
ranks then share every node's server URL and rank 0's random token over the
manager's gloo group. At the first local save they build their own async
checkpointer for local saves (a second writer process per rank, so a local
save never waits for a durable one), whose commit hook (`checkpoint.tiers.replicate`) copies each file to its
replica nodes before the commit.

The tier belongs to its run (`checkpoint.run.identity`): it holds the run's
record (run id, timelines), stores it in the durable root at its first local
save, and tags every local step with it (`checkpoint.tiers.local_steps`).
Steps of other runs are never used nor deleted.

A local save at step N: each node's local rank 0 checks that the node has room
for it, recreates a `local_root` deleted under it, and empties and tags the
step directory; the ranks agree (one all-reduce) and a save that any node
cannot take is skipped with a warning. Then they stage (the only time the
training thread blocks) and return. The next local save, `wait()` and
`close()` first wait for the save in flight; then the ranks meet once (so rank
0's metadata has reached every node) and each node's local rank 0 applies
retention to this run's steps. The tier may only make a restart faster: any
failure of it (a peer outage, a full or deleted disk, a failed write reported
again by its checkpointer) costs at most that local save, with a warning, and
is never raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch.distributed as dist

from checkpoint.run.agreement import max_over_ranks
from checkpoint.run.identity import LocalTag, RunRecord, newest_record
from checkpoint.run.steps import StepRecord, step_dir_name
from checkpoint.tiers.local_steps import (
    clean_leftovers,
    list_tags,
    other_nodes,
    prepare_step_dir,
    prune,
    warn_foreign,
    write_node_marker,
)
from checkpoint.tiers.node import (
    NodeLayout,
    all_gather,
    estimate_node_bytes,
    node_address,
    node_env,
    shared,
)
from checkpoint.tiers.replicate import ReplicaHook
from checkpoint.tiers.run_record import read_durable, store_durable
from checkpoint.tiers.server import TierServer
from checkpoint.tiers.tier_files import local_records
from planners.errors import CheckpointPathError
from planners.tier_placement import commit_targets, effective_replicas

logger = logging.getLogger(__name__)

# Free space kept beyond a local save's estimate (bytes), so a tier never fills `/dev/shm` to the brim.
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024


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
        durable: Callable[[], Any] | None = None,
        durable_root: str = "",
    ) -> None:
        self.root = os.path.abspath(local_root)
        self.interval_steps, self.keep_last, self.group = interval_steps, keep_last, group
        self.durable_root, self._durable = durable_root, durable
        node, local_rank, local_world = node_env()
        self._server: TierServer | None = None
        # The run's record as rank 0 read it from the durable root: (record, stored); (None, False)
        # when it could not be read (recovery then takes the newest history of this root's tags).
        self.record, self._stored = shared(self._read_record() if _rank(group) == 0 else None, group)
        self._rolled_back = False  # the record changed since it was last stored (a rollback)
        self.resumed_from: str | None = None  # "local" or "durable": where recovery found its step
        token, nonce = shared((secrets.token_hex(16), secrets.token_hex(8)), group)
        self._marker: str | None = None
        if local_rank == 0:
            clean_leftovers(self.root, self.record)
            self._marker = write_node_marker(self.root, nonce, node)
            host = node_address(address)
            self._server = TierServer(self.root, host=host, token=token, node=node)
        url = self._server.start() if self._server is not None else None
        rank = _rank(group)
        entries = all_gather((node, local_rank, url), group)
        servers = {n: u for n, lr, u in entries if lr == 0 and u is not None}
        # Every node wrote its marker before the gather above: one seen here from another node of this
        # job means the nodes share one directory (an NFS path), and "replicas" would be one file.
        others = other_nodes(self.root, nonce, node) if local_rank == 0 else []
        if max_over_ranks(int(bool(others)), group):
            self._drop_marker()
            if self._server is not None:
                self._server.stop()
            raise CheckpointPathError(
                f"local_root {self.root} is shared by several nodes of this job"
                + (f" (node {node} sees node(s) {others} there)" if others else " (another node saw it)")
                + "; the local tier needs a directory of each node's own (a /dev/shm or local NVMe path), "
                "else replicas overwrite one file and protect nothing"
            )
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
        if local_rank == 0 and self.record is not None:
            warn_foreign(self.root, self.record)

    # --- the run's record ---------------------------------------------------------------------------

    def _read_record(self) -> tuple[RunRecord | None, bool]:
        """Rank 0: the durable root's record; a new one where it has none; None where it cannot be read."""
        return (
            (RunRecord.new(), False)
            if self._durable is None
            else read_durable(self._durable, self.durable_root)
        )

    def settle_record(self, tags: list[LocalTag]) -> RunRecord:
        """The record to use when the durable one could not be read: the newest history of this root's
        tags, else a new run (collective: rank 0 decides)."""
        if self.record is None:
            chosen = newest_record(tags, self.durable_root) or RunRecord.new()
            self.record = shared(chosen if self.layout.rank == 0 else None, self.group)
        return self.record

    def roll_back(self, step: int | None, abandoned: Any = ()) -> None:
        """Start a new timeline branched at `step` (None: before step 0); collective.

        Local steps of the old timeline after `step` are abandoned: each node deletes its own at
        once (retention), and recovery never uses them anywhere, whatever node still holds one.
        """
        assert self.record is not None
        record = self.record.rolled_back(-1 if step is None else step, abandoned)
        self.record = shared(record if self.layout.rank == 0 else None, self.group)
        self._rolled_back, self._stored = True, False
        if self.layout.rank == 0:
            logger.warning(
                "local tier: resumed at step %s below the newest step of the run's history; later local "
                "steps of the old timeline are abandoned and never resumed",
                step,
            )
        self._store_record()
        if self.layout.local_rank == 0:
            self._prune(keep=set())

    def _store_record(self) -> None:
        """Store the record in the durable root (rank 0; collective agreement on the outcome)."""
        stored = self.record
        if self.layout.rank == 0 and self.record is not None and self._durable is not None:
            stored = store_durable(
                self._durable, self.record, first=not self._rolled_back, where=self.durable_root
            )
        ok = stored is not None
        self.record, self._stored = shared((stored or self.record, ok), self.group)

    def _own_steps(self) -> list[int]:
        return [r.step for r in local_records(self.root)]

    def _tag(self) -> LocalTag:
        assert self.record is not None
        return LocalTag(record=self.record, durable_root=self.durable_root)

    # --- saves ------------------------------------------------------------------------------------

    def on_save(self, step: int, state: Any) -> tuple[bool, bool]:
        """The manager's `save(step)` (every rank): (a local save started, the last upload failed)."""
        retry = self.upload_failed()
        return self.due(step) and self.save(step, state), retry

    def due(self, step: int) -> bool:
        return step % self.interval_steps == 0 and (self._newest is None or step > self._newest)

    def save(self, step: int, state: Any) -> bool:
        """Start a local save of `state` at `step` (every rank); False when it is skipped (with a warning)."""
        self.wait()
        if self.record is None:
            self.settle_record([t for t in list_tags(self.root, self._own_steps()).values() if t is not None])
        if not self._stored:
            self._store_record()
        problem = self._prepare(step, state) if self.layout.local_rank == 0 else 0
        if max_over_ranks(problem, self.group):
            return False
        path = os.path.join(self.root, step_dir_name(step))
        try:
            write = self._start(state, path)
        except Exception as e:  # raised on every rank together (the plan exchange carries it)
            logger.warning("local tier: the local save of step %d did not start and is skipped: %s", step, e)
            return False
        self._pending, self._newest = (step, write), step
        return True

    def _prepare(self, step: int, state: Any) -> int:
        """Local rank 0: room on this node, and a clean step directory of this run (0), else why not."""
        try:
            if not os.path.isdir(self.root):
                logger.warning(
                    "local tier: %s is gone (deleted while the job ran?); recreating it", self.root
                )
                os.makedirs(self.root, exist_ok=True)
            copies = self.layout.num_nodes if self.layout.node == 0 else 1 + self.replicas  # commit_targets
            need = estimate_node_bytes(state, self.layout.local_world_size, copies - 1)
            free = shutil.disk_usage(self.root).free
            if free < need + FREE_SPACE_MARGIN_BYTES:
                logger.warning(
                    "local tier: skipping the local save of step %d: node %d has %d bytes free in %s, "
                    "the step and its replicas need about %d",
                    step,
                    self.layout.node,
                    free,
                    self.root,
                    need,
                )
                return 1
            return 0 if prepare_step_dir(self.root, step, self._tag()) is not None else 2
        except Exception as e:
            logger.warning(
                "local tier: skipping the local save of step %d on node %d: %s", step, self.layout.node, e
            )
            return 2

    def _start(self, state: Any, path: str) -> Future[Any]:
        if self._ckpt is None:
            from checkpoint.builder import make_async_checkpointer

            self._ckpt = make_async_checkpointer(commit_hook=self._hook)
        try:
            stage, write = self._ckpt.save(state, path, overwrite=True, path_per_node=True)
        except Exception as e:  # the failure of the previous local save, reported once: start afresh
            logger.info("local tier: the previous local save's failure was reported again: %s", e)
            stage, write = self._ckpt.save(state, path, overwrite=True, path_per_node=True)
        stage.result()
        return write

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
            self._prune(keep={self._upload[0]} if uploading and self._upload else set())

    def _prune(self, keep: set[int]) -> None:
        if self.record is None:
            return
        try:
            prune(self.root, self.record, self.keep_last, keep=keep)
        except Exception as e:
            logger.warning(
                "local tier: retention in %s failed (retried after the next local save): %s", self.root, e
            )

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

    def _drop_marker(self) -> None:
        if self._marker is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._marker)
            self._marker = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._drop_marker()
            if self._uploader is not None:
                self._uploader.close()
            if self._ckpt is not None:
                self._ckpt.close()
            if self._server is not None:
                self._server.stop()

    # --- queries ----------------------------------------------------------------------------------

    def records(self) -> list[StepRecord]:
        """This node's committed local steps of this run's current history, as records of the tier `local`."""
        record = self.record
        if record is None:
            return []
        found = local_records(self.root)
        tags = list_tags(self.root, [r.step for r in found])
        return [r for r in found if usable(tags[r.step], record, r.step)]

    def loaded(self, step: int) -> None:
        self._newest = step


def usable(tag: LocalTag | None, record: RunRecord, step: int) -> bool:
    """Whether a local step with `tag` belongs to `record`'s run and its current history."""
    return (
        tag is not None
        and tag.record.run_id == record.run_id
        and record.on_history(tag.record.timeline, step)
    )


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank() if group is not None else 0
