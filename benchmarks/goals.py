"""Issue 26's goals, each beside its measure from the same run: the first table `benchmarks.run` prints.

Every goal is a per-run ratio (sample i of one side over sample i of the other, taken moments
apart in the same processes), summarised by its median and spread; times are "shardsafe / other",
so below 1 means shardsafe is faster, and bandwidths "dd's time / shardsafe's". A goal whose
figures this run could not take (a plug-in not run, a system not installed) says so instead of
disappearing. torch-checkpointing appears twice, as shipped (it never fsyncs) and with its files
fsync'd, and the table says which is which.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from benchmarks.peers import TCKPT, TCKPT_FSYNC
from benchmarks.scenarios import COPY, RAW_WRITE, UNVERIFIED
from benchmarks.stats import DCP, OURS, Results


@dataclass(frozen=True, slots=True, kw_only=True)
class Goal:
    """One of the issue's targets: `top / bottom` of two figures, with its bound on the median (and the worst run)."""

    name: str
    scenario: str
    metric: str
    top: str
    bottom: str
    target: str  # "<= 0.8" or ">= 0.9"; empty: reported, no bound
    worst: str = ""  # a bound every run must meet, e.g. "<= 0.7"
    bottom_metric: str = ""


def _load(tag: str) -> str:
    return f"ws{tag}_warm_s"


def goals(save_world_size: int) -> list[Goal]:
    same = f"{save_world_size}to{save_world_size}"
    ws = f"{save_world_size} -> {save_world_size}"
    return [
        Goal(
            name=f"1. verified / unverified warm load ({ws})",
            scenario="load",
            metric=_load(same),
            top=OURS,
            bottom=UNVERIFIED,
            target="<= 1.2",
        ),
        Goal(
            name="2. sync save / DCP",
            scenario="durable_save",
            metric="sync_s",
            top=OURS,
            bottom=DCP,
            target="<= 0.8",
        ),
        Goal(
            name="2. sync save bandwidth / dd conv=fdatasync",
            scenario="durable_save",
            metric="sync_s",
            top=RAW_WRITE,
            bottom=OURS,
            target=">= 0.9",
        ),
        Goal(
            name=f"3. warm load {ws} / DCP",
            scenario="load",
            metric=_load(same),
            top=OURS,
            bottom=DCP,
            target="<= 0.5",
            worst="<= 0.7",
        ),
        Goal(
            name=f"3. cold load {ws} / DCP",
            scenario="load",
            metric=f"ws{same}_s",
            top=OURS,
            bottom=DCP,
            target="",
        ),
        Goal(
            name="4. async save, training blocked / plain copy",
            scenario="async_blocking",
            metric="block_s",
            top=OURS,
            bottom=COPY,
            target="<= 1.1",
        ),
        Goal(
            name="4. async save until durable / DCP",
            scenario="durable_save",
            metric="async_s",
            top=OURS,
            bottom=DCP,
            target="<= 0.6",
        ),
        Goal(
            name="5. sync save / torch-checkpointing (no fsync: not durable)",
            scenario="durable_save",
            metric="sync_s",
            top=OURS,
            bottom=TCKPT,
            target="<= 1.0",
        ),
        Goal(
            name="5. sync save / torch-checkpointing+fsync",
            scenario="durable_save",
            metric="sync_s",
            top=OURS,
            bottom=TCKPT_FSYNC,
            target="<= 1.0",
        ),
        Goal(
            name="5. async blocked / torch-checkpointing",
            scenario="async_blocking",
            metric="block_s",
            top=OURS,
            bottom=TCKPT,
            target="<= 1.0",
        ),
        Goal(
            name="5. async until durable / torch-checkpointing (no fsync)",
            scenario="durable_save",
            metric="async_s",
            top=OURS,
            bottom=TCKPT,
            target="<= 1.0",
        ),
        Goal(
            name="5. async until durable / torch-checkpointing+fsync",
            scenario="durable_save",
            metric="async_s",
            top=OURS,
            bottom=TCKPT_FSYNC,
            target="<= 1.0",
        ),
        Goal(
            name=f"5. warm load {ws} / torch-checkpointing",
            scenario="load",
            metric=_load(same),
            top=OURS,
            bottom=TCKPT,
            target="<= 1.0",
        ),
        Goal(
            name=f"5. cold load {ws} / torch-checkpointing",
            scenario="load",
            metric=f"ws{same}_s",
            top=OURS,
            bottom=TCKPT,
            target="<= 1.0",
        ),
    ]


def _meets(value: float, bound: str) -> bool:
    op, limit = bound.split()
    return value >= float(limit) if op == ">=" else value <= float(limit)


def evaluate(results: Results, save_world_size: int, plugins: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal's per-run ratios, median, spread and verdict (or why it could not be measured)."""
    out = []
    for g in goals(save_world_size):
        top = results.find(g.scenario, g.metric, g.top)
        bottom = results.find(g.scenario, g.bottom_metric or g.metric, g.bottom)
        row: dict[str, Any] = {"goal": g.name, "target": g.target, "worst_run": g.worst}
        if top is None or bottom is None:
            missing = g.top if top is None else g.bottom
            gap = next((u["reason"] for u in results.unavailable if u["system"] == missing), "")
            row["unavailable"] = f"{missing} not measured in this run" + (f": {gap}" if gap else "")
        else:
            ratios = [a / b for a, b in zip(top.samples, bottom.samples, strict=True) if b > 0]
            median = statistics.median(ratios)
            met = (not g.target or _meets(median, g.target)) and (not g.worst or _meets(max(ratios), g.worst))
            row.update(
                samples=ratios, median=median, min=min(ratios), max=max(ratios), met=met if g.target else None
            )
        out.append(row)
    out.append(_s3_goal(plugins))
    return out


def _s3_goal(plugins: dict[str, Any]) -> dict[str, Any]:
    """Goal 6, from the storage benchmark plug-in: a capped S3 save against one capped stream."""
    row: dict[str, Any] = {
        "goal": "6. S3 save through the 10 MB/s-per-connection proxy / one stream",
        "target": ">= 6.0",
        "worst_run": "",
    }
    s3 = ((plugins.get("storage_bench") or {}).get("result") or {}).get("s3") or {}
    capped = next((v for k, v in s3.items() if k.startswith("per_stream_limit_")), {})
    speedup = capped.get("save_vs_single_stream")
    if speedup is None:
        row["unavailable"] = "run with --plugins s3 (or all) to measure it"
    else:
        row.update(samples=[speedup], median=speedup, min=speedup, max=speedup, met=speedup >= 6.0)
    return row


def format_goals(rows: list[dict[str, Any]]) -> str:
    lines = ["| goal (issue 26) | this run: median [min-max] | target | met |", "|---|---|---|---|"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['goal']} | not measured: {r['unavailable']} | {r['target']} | |")
            continue
        target = r["target"] + (f", every run {r['worst_run']}" if r["worst_run"] else "")
        verdict = "" if r["met"] is None else ("met" if r["met"] else "MISSED")
        lines.append(
            f"| {r['goal']} | {r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}] | {target} | {verdict} |"
        )
    return "\n".join(lines) + "\n"
