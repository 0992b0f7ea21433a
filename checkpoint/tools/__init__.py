"""Tools over finished checkpoints: the `shardsafe` command, verify, diff, Hugging Face export and
DCP import, consolidation of incremental checkpoints.  Each reads a checkpoint as untrusted input.

May import: checkpoint.load, checkpoint.state, checkpoint.manager (run listing), checkpoint.tiers (a
node's local steps for `ls --local-root`), checkpoint.save's records, planners and storage.
"""
