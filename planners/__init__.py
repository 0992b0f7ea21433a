"""Pure planning for shardsafe: state dicts in, plans and metadata out.

Nothing in this package opens a file or touches a process group, so plans
for thousands of ranks are computed and tested in one process.
"""
