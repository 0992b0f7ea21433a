"""CheckpointManager: steps, resume, retention and preemption around a checkpointer in a training loop.

With incremental saves, retention is a mark and sweep (`checkpoint.run.sweep`) and each save's base
is chosen by `incremental`.

May import: the public checkpointer API (checkpoint.checkpointer, types), checkpoint.load, checkpoint.save's
lease, the run's vocabulary (checkpoint.run: step names, records, retention rules, run identity),
checkpoint.tiers (the optional node-local tier, which the manager composes), planners and storage; never
the tools.
"""
