"""The node-local checkpoint tier: local saves, verified peer replicas, recovery from peers.

- `node`: where a rank runs (torchrun's layout), the node's address, what a local save needs.
- `tier_files`: one node's `local_root` on disk: names, listing, verification of a received file.
- `local_steps`: one node's steps as its run sees them: tags, reuse of a step directory, retention.
- `run_record`: the run record in the durable root, as the tier reads and stores it.
- `server`: the HTTP server per node that receives replicas, serves byte ranges and lists steps.
- `client`: the requests other processes (writer processes, trainer ranks) send to a server.
- `replicate`: the commit hook that copies a rank's files to its peers before the commit.
- `holders`: a read-only storage that reads each file of a step from its nearest verified holder.
- `upload`: a durable save of a step the tier holds, by uploading its local files (no second staging).
- `local_tier`: what `CheckpointManager` calls: set-up, local saves, retention, rollback.
- `recovery`: resuming from the tier, with the durable steps as fallback.
- `manager_tier`: the manager's hooks into the tier, one call each.

May import: checkpoint.load, .save, .state, .async_writer, .checkpointer, .builder and the run's
vocabulary (checkpoint.run), planners and storage; never checkpoint.manager, which composes the tiers
(tests/import_rules.py). Imported by the manager and `shardsafe ls --local-root` only.
"""
