"""A run's vocabulary, shared by the durable tier (`checkpoint.manager`) and the local tier (`checkpoint.tiers`).

- `steps`: step directory names, `StepRecord`, listing a run root and deleting one step.
- `retention`: the retention policy and its evidence rules, as pure functions over records.
- `identity`: the run id and the timeline, recorded in the durable root and in every local step.
- `agreement`: the one-integer agreement of every rank (preemption, load outcomes).
- `sweep`: retention with incremental steps: mark what kept steps reference, delete metadata first.

Both tiers ask the same questions (which steps belong to this run, which are on the current timeline,
which may be deleted and on what evidence), so the answers live here, below both: the manager composes
the tiers, the tiers never import the manager (tests/import_rules.py).

May import: planners, storage and the records of `checkpoint` (errors, types); no other part of it.
"""
