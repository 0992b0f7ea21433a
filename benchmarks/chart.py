"""The PNG chart: shardsafe against DCP, one panel per scenario.

Bars are medians, whiskers the min and max of the runs; a reference (one
plain copy, a dd write) is a third, grey bar where the scenario has one.
matplotlib is the optional `bench` extra: without it the chart is skipped
and the table and JSON still come out.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable

from benchmarks.comparisons import label, row_order
from benchmarks.stats import DCP, OURS, Figure, Results

logger = logging.getLogger(__name__)

MiB = 1024**2
# (title, unit, scenario, whether a metric belongs): first saves get a panel of their own, since
# starting a writer process takes seconds and would flatten every steady-state bar beside it.
_PANELS = (
    (
        "async save: training blocked (steady state)",
        "s",
        ("async_blocking",),
        lambda m: not m.startswith("first"),
    ),
    (
        "save until durable + committed (steady state)",
        "s",
        ("durable_save",),
        lambda m: not m.startswith("first"),
    ),
    (
        "first save (writer processes started)",
        "s",
        ("async_blocking", "durable_save"),
        lambda m: m.startswith("first"),
    ),
    ("load after a restart", "s", ("load",), lambda m: True),
    ("many small tensors", "s", ("planning",), lambda m: True),
    ("host memory", "bytes", ("memory",), lambda m: True),
)
_COLORS = {OURS: "#1f77b4", DCP: "#ff7f0e", "memcpy": "#9e9e9e", "dd": "#9e9e9e"}
_REFERENCE_OF = {
    ("async_blocking", "block_s"): ("block_s", "memcpy"),
    ("durable_save", "sync_s"): ("sync_s", "dd"),
}


def _bars(
    results: Results, scenarios: tuple[str, ...], unit: str, belongs: Callable[[str], bool]
) -> list[tuple[str, list[tuple[str, Figure]]]]:
    groups: list[tuple[str, list[tuple[str, Figure]]]] = []
    keys: list[tuple[str, str]] = []
    for f in results.figures:
        key = (f.scenario, f.metric)
        wanted = f.scenario in scenarios and f.unit == unit and belongs(f.metric)
        if wanted and f.system in (OURS, DCP) and key not in keys:
            keys.append(key)
    for scenario, metric in row_order(keys):
        bars = [(s, f) for s in (OURS, DCP) if (f := results.find(scenario, metric, s)) is not None]
        if (scenario, metric) in _REFERENCE_OF:
            ref_metric, ref_system = _REFERENCE_OF[(scenario, metric)]
            if (ref := results.find(scenario, ref_metric, ref_system)) is not None:
                bars.append((ref_system, ref))
        groups.append((textwrap.fill(label(scenario, metric), 30), bars))
    return groups


def write_chart(results: Results, path: str, *, title: str) -> bool:
    """Draw the chart to `path`; False (and a log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'shardsafe[bench]'): no chart written")
        return False
    panels = [
        (t, unit, groups)
        for t, unit, scenarios, belongs in _PANELS
        if (groups := _bars(results, scenarios, unit, belongs))
    ]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, 1.0 + 1.1 * sum(len(g) for _, _, g in panels)), squeeze=False
    )
    for ax, (panel_title, unit, groups) in zip(axes[:, 0], panels, strict=True):
        scale = MiB if unit == "bytes" else 1.0
        labelled: set[str] = set()
        for y, (_, bars) in enumerate(groups):
            height = 0.8 / len(bars)
            for j, (system, f) in enumerate(bars):
                median = f.median / scale
                err = [[median - min(f.samples) / scale], [max(f.samples) / scale - median]]
                ax.barh(
                    y + (j - (len(bars) - 1) / 2) * height,
                    median,
                    height=height,
                    xerr=err,
                    capsize=2,
                    color=_COLORS.get(system, "#555555"),
                    label=None if system in labelled else system,
                )
                labelled.add(system)
        ax.set_yticks(range(len(groups)), [g[0] for g in groups], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("MiB" if unit == "bytes" else "seconds (median, whiskers min-max)")
        ax.set_title(panel_title, fontsize=10)
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
