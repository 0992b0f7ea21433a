"""The node-local checkpoint tier: local saves, verified peer replicas, recovery from peers.

- `tier_files`: one node's `local_root` on disk: names, listing, verification of a received file.
- `server`: the HTTP server per node that receives replicas, serves byte ranges and lists steps.
- `client`: the requests other processes (writer processes, trainer ranks) send to a server.
- `replicate`: the commit hook that copies a rank's files to its peers before the commit.
- `holders`: a read-only storage that reads each file of a step from its nearest verified holder.
- `upload`: a durable save of a step the tier holds, by uploading its local files (no second staging).
- `local_tier`: what `CheckpointManager` calls: set-up, local saves, retention, recovery.

May import: checkpoint.load, .save, .state, .async_writer, .checkpointer, .builder and the lower modules
of checkpoint.manager (steps, signals, attempt), planners and storage. Imported by the manager and
`shardsafe ls --local-root` only (tests/import_rules.py).
"""
