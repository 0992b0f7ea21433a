"""Replication of a local save: a commit hook that runs in each rank's writer process.

A local save is an ordinary save (async checkpointer, so from the writer
process) to this node's `local_root/step-N/`. Its commit hook does the tier's
work at the two points the save protocol offers:

- `pre_commit` (every rank, after its shard files are written, before the
  coordinator's commit): the rank sends each of its files to its replica
  nodes (`planners.tier_placement.replica_nodes`) and returns once every peer
  has verified and published its copy. A refused or failed copy fails this
  rank's write, so the save is not committed anywhere: a step is committed
  only once every file has 1 + replicas verified copies.
- `post_commit` (the coordinator, once `metadata.json` is written on its
  node): it sends the metadata, the commit marker, to every other node, so
  each node can list and serve the step as committed. Every node is tried,
  whatever failed before; the error names each node that missed it.

A rank replicates exactly the files its write reported (`files`, passed by
the save pipeline), never whatever else lies in the step directory.

The hook is a frozen record, pickled once to reach the writer process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from checkpoint.save.hooks import CommitHook
from checkpoint.tiers.client import put_file
from planners.errors import StorageError
from planners.metadata import METADATA_FILE, SHARD_FILE_RE

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaHook(CommitHook):
    """Sends a rank's files to its replica nodes (pre_commit) and the metadata to every node (post_commit).

    Attributes:
        node: this rank's node.
        targets: (node, server URL) of the nodes that receive this node's files.
        everyone: (node, server URL) of every other node of the job (they receive the metadata).
        token: the job's token for the servers.
    """

    node: int
    targets: tuple[tuple[int, str], ...]
    everyone: tuple[tuple[int, str], ...]
    token: str

    def __repr__(self) -> str:  # the token stays out of logs
        return f"ReplicaHook(node={self.node}, targets={[n for n, _ in self.targets]})"

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        rank = int(kwargs["rank"])
        step_dir = os.path.basename(path.rstrip("/"))
        written = kwargs.get("files")
        if written is None:  # a pipeline that does not report them: this rank's files in the directory
            written = [
                n for n in os.listdir(path) if (m := SHARD_FILE_RE.fullmatch(n)) and int(m["rank"]) == rank
            ]
        names = sorted(n for n in written if SHARD_FILE_RE.fullmatch(n) is not None)
        for node, url in self.targets:
            for name in names:
                put_file(url, self.token, step_dir, os.path.join(path, name), node=node)
        if names and self.targets:
            logger.debug(
                "rank %d: %d file(s) of %s verified on node(s) %s",
                rank,
                len(names),
                step_dir,
                [n for n, _ in self.targets],
            )

    def post_commit(self, path: str, **kwargs: Any) -> None:
        if int(kwargs["rank"]) != 0:
            return
        step_dir = os.path.basename(path.rstrip("/"))
        missed = {}
        for node, url in self.everyone:
            try:
                put_file(url, self.token, step_dir, os.path.join(path, METADATA_FILE), node=node)
            except StorageError as e:
                missed[node] = e
        if missed:
            raise StorageError(
                f"the commit marker of {step_dir} did not reach node(s) {sorted(missed)} (the others have it): "
                + "; ".join(f"node {n}: {e}" for n, e in sorted(missed.items()))
            )
