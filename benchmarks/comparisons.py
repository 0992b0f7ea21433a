"""Which figures are compared with which, how each row is labelled, and the issue's targets.

Every comparison is a per-run ratio of two figures of the same run (see
`benchmarks.stats`). Times are compared as "other / shardsafe", so above 1
means shardsafe is faster; the references turn into "x memcpy" (blocking
time over one plain copy) and "bandwidth vs dd" (dd's time over the save's).
"""

from __future__ import annotations

import re

from benchmarks.scenarios import COPY, RAW_WRITE, UNVERIFIED
from benchmarks.stats import DCP, OURS, Results

# Targets on the median of the per-run ratios, in this table's orientation (other / shardsafe); the
# goals of issue 26, stated as shardsafe / other, are in `benchmarks.goals` (the first table).
TARGET_BLOCKING_X_COPY = "<= 1.1"
TARGET_DURABLE_SPEEDUP = ">= 1.25"  # sync save <= 0.8x DCP's time
TARGET_DURABLE_VS_DD = ">= 0.9"
TARGET_LOAD_SPEEDUP = ">= 2.0"  # warm load at the saving world size <= 0.5x DCP's time

SCENARIOS = ("async_blocking", "durable_save", "load", "memory", "planning")
_LABELS = {
    ("async_blocking", "block_s"): "async save: training blocked (steady state)",
    ("async_blocking", "first_block_s"): "async save: training blocked (first save)",
    ("async_blocking", "staging_bandwidth"): "staging bandwidth: rank bytes / blocked time (steady state)",
    ("durable_save", "sync_s"): "sync save until durable + committed",
    ("durable_save", "async_s"): "async save until durable + committed",
    ("durable_save", "first_sync_s"): "sync save until committed (first save)",
    ("durable_save", "first_async_s"): "async save until committed (first save: writer process starts)",
    ("memory", "trainer_held_bytes"): "trainer RSS kept after the first saves (staging buffers)",
    ("memory", "async_trainer_bytes"): "trainer RSS added during an async save (kept + peak)",
    ("memory", "async_writers_bytes"): "writer processes' peak RSS during an async save",
    ("memory", "sync_trainer_bytes"): "trainer RSS added during a sync save (kept + peak)",
    ("planning", "first_save_s"): "save of many small tensors, first (plan made)",
    ("planning", "repeat_save_s"): "save of many small tensors, repeated (same structure)",
}
_LOAD_METRIC = re.compile(r"ws(?P<saved>\d+)to(?P<loaded>\d+)_(?P<what>s|warm_s|read_bytes|needed_bytes)")


def _ranks(n: str) -> str:
    return f"{n} rank" if n == "1" else f"{n} ranks"


def label(scenario: str, metric: str) -> str:
    """The table's words for a figure."""
    if (scenario, metric) in _LABELS:
        return _LABELS[(scenario, metric)]
    m = _LOAD_METRIC.fullmatch(metric)
    if scenario == "load" and m:
        saved, loaded = m["saved"], m["loaded"]
        how = "same world size" if saved == loaded else "resharded"
        what = {
            "s": "load time, page cache evicted",
            "warm_s": "load time, warm (page cache holds the files)",
            "read_bytes": "bytes read from disk",
            "needed_bytes": "bytes the target needs",
        }
        return f"{what[m['what']]}, saved by {_ranks(saved)}, loaded by {_ranks(loaded)} ({how})"
    return f"{scenario}: {metric}"


def row_order(keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`(scenario, metric)` keys in report order: by scenario, then as labelled above (loads as run)."""
    labelled = list(_LABELS)

    def rank(key: tuple[str, str]) -> tuple[int, int, int]:
        scenario = SCENARIOS.index(key[0]) if key[0] in SCENARIOS else len(SCENARIOS)
        known = labelled.index(key) if key in labelled else len(labelled)
        return scenario, known, keys.index(key)

    return sorted(keys, key=rank)


def load_tags(results: Results) -> list[str]:
    """The load scenario's `ws<saved>to<loaded>` tags, in the order they were run."""
    tags = []
    for f in results.figures:
        m = _LOAD_METRIC.fullmatch(f.metric)
        if f.scenario == "load" and m and m["what"] == "s" and f.metric[:-2] not in tags:
            tags.append(f.metric[:-2])
    return tags


def add_ratios(results: Results) -> None:
    """Every comparison of the report, computed per run from the recorded figures."""
    r = results.ratio
    r("async_blocking", "block_s", "shardsafe / memcpy", OURS, COPY, target=TARGET_BLOCKING_X_COPY)
    r("async_blocking", "block_s", "dcp / memcpy", DCP, COPY)
    r("async_blocking", "block_s", "dcp / shardsafe", DCP, OURS)
    r("async_blocking", "first_block_s", "dcp / shardsafe", DCP, OURS)
    r("async_blocking", "staging_bandwidth", "shardsafe / memcpy", OURS, COPY)
    for metric in ("sync_s", "async_s"):
        r("durable_save", metric, "dcp / shardsafe", DCP, OURS, target=TARGET_DURABLE_SPEEDUP)
        for system in (OURS, DCP):
            r(
                "durable_save",
                metric,
                f"bandwidth {system} / dd",
                RAW_WRITE,
                system,
                numerator_metric="sync_s",
                target=TARGET_DURABLE_VS_DD if system == OURS else "",
            )
    for metric in ("first_sync_s", "first_async_s"):
        r("durable_save", metric, "dcp / shardsafe", DCP, OURS)
    for tag in load_tags(results):
        saved, loaded = tag[2:].split("to")
        r("load", f"{tag}_s", "dcp / shardsafe", DCP, OURS)
        r(
            "load",
            f"{tag}_warm_s",
            "dcp / shardsafe",
            DCP,
            OURS,
            target=TARGET_LOAD_SPEEDUP if saved == loaded else "",
        )
        r("load", f"{tag}_warm_s", "verified / verify=False", OURS, UNVERIFIED, target="<= 1.2")
        for system in (OURS, DCP):
            r(
                "load",
                f"{tag}_read_bytes",
                f"{system} read / needed",
                system,
                system,
                denominator_metric=f"{tag}_needed_bytes",
            )
    for metric in ("trainer_held_bytes", "async_trainer_bytes", "async_writers_bytes", "sync_trainer_bytes"):
        r("memory", metric, "dcp / shardsafe", DCP, OURS)
    for metric in ("first_save_s", "repeat_save_s"):
        r("planning", metric, "dcp / shardsafe", DCP, OURS)
    for system in (OURS, DCP):
        r(
            "planning",
            "repeat_save_s",
            f"{system} repeated / first",
            system,
            system,
            denominator_metric="first_save_s",
        )
