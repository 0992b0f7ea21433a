"""Benchmarks of shardsafe against torch.distributed.checkpoint (DCP), in one run.

`python -m benchmarks.run` spawns real ranks (gloo on CPU, NCCL beside gloo
on GPU), builds the same synthetic DTensor state dict for both systems and
measures, per scenario, both of them in the same processes, interleaved, so
every comparison is a ratio taken within one run on one machine:

- `benchmarks.state`: the synthetic state dicts (size and tensor count set on the command line).
- `checkpoint.testing.ranks` (shared with the tests): spawns the ranks and collects what each returns.
- `benchmarks.systems`: one adapter per system (shardsafe, DCP) with the same save/load calls.
- `benchmarks.scenarios`: what the ranks run: save side, restart loads, memory, planning.
- `benchmarks.stats`, `benchmarks.report`: medians, spreads, ratios; table, JSON and chart.
"""
