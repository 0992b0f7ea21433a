"""The scale benchmark end to end on tiny worlds and a 4-layer model, so it never rots.

It checks that every layout produced every figure and that the outputs are
complete, and the two properties the design promises whatever the machine:
plan traffic per rank and metadata size do not grow with data-parallel ranks.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib", reason="the benchmark draws its chart with matplotlib (the 'bench' extra)")

from benchmarks import scale  # noqa: E402

pytestmark = pytest.mark.slow

_FIGURES = [
    "plan_rank_s",
    "coordinator_s",
    "plan_traffic_bytes_per_rank",
    "metadata_bytes",
    "load_plan_rank_s",
    "load_read_bytes_per_rank",
    "peak_rss_bytes",
]


def test_scale_benchmark_runs_every_layout(tmp_path, capsys):
    rows = scale.main(["--worlds", "32,64", "--layers", "4", "--out", str(tmp_path)])
    assert sorted((r["scheme"], r["world_size"]) for r in rows) == sorted(
        (s, w) for s in ("fsdp", "fsdp_tp", "fsdp_tp_pp") for w in (32, 64)
    ) + [("pp_tp_fsdp_sub", 64)]
    for r in rows:
        assert all(r[f] > 0 for f in _FIGURES), r
        assert r["tensors"] == 3 * (2 + 4 * 9 + 1)
    by = {(r["scheme"], r["world_size"]): r for r in rows}
    for s in ("fsdp", "fsdp_tp", "fsdp_tp_pp"):
        # Traffic is the distinct structures (one per pipeline stage): the same at 32 and 64 ranks but
        # for the mesh's rank list, which is stored as first rank and step.
        assert by[(s, 64)]["plan_traffic_bytes_per_rank"] < 1.2 * by[(s, 32)]["plan_traffic_bytes_per_rank"]
    assert by[("fsdp_tp_pp", 64)]["distinct_structures"] == 4 and by[("fsdp", 64)]["distinct_structures"] == 1
    # The 3-D job: 8 stages x 8 TP coordinates, each with its own dp sub-mesh for the norms (4 layers fill 4
    # stages, stages 4-6 hold nothing: one structure for the three, per TP coordinate none differ).
    sub = by[("pp_tp_fsdp_sub", 64)]
    assert sub["tensors"] == 3 * (2 + 4 * 9 + 1) and sub["distinct_structures"] == 4 * 8 + 1 + 8
    doc = json.loads((tmp_path / "scale.json").read_text())
    assert doc["rows"] == rows and (tmp_path / "scale.png").stat().st_size > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("scale summary W=64:")
