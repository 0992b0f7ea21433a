"""Figures and ratios: every measurement kept raw, summarised by median and spread.

Shared machines are noisy, so a figure is several samples, summarised by the
median (robust to one slow outlier) and the spread (min and max). A
comparison is the median of per-run ratios: sample i of one system against
sample i of the other, taken moments apart in the same processes, so a slow
minute of the machine slows both sides of a ratio instead of one figure.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

# The two systems every scenario compares, and the physical references.
OURS = "shardsafe"
DCP = "dcp"


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    """One measured quantity of one system in one scenario, every sample kept.

    Attributes:
        scenario: which of the benchmark's scenarios (e.g. "load").
        metric: what was measured (e.g. "load_ws3_s").
        system: OURS, DCP, or a reference ("memcpy", "dd").
        unit: "s", "bytes" or "ratio".
        samples: every run's value, in run order (for times: the slowest rank's).
        note: how it was measured, when that is not obvious.
    """

    scenario: str
    metric: str
    system: str
    unit: str
    samples: tuple[float, ...]
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_json(self) -> dict:
        out = asdict(self)
        out["samples"] = list(self.samples)
        out.update(median=self.median, min=min(self.samples), max=max(self.samples))
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Ratio:
    """`numerator / denominator` per run, e.g. DCP's load time over shardsafe's (above 1: shardsafe is faster).

    Attributes:
        name: what the ratio says, in words ("speedup over DCP", "x memcpy").
        target: the issue's goal for the median, as ">= 1.3" or "<= 1.5"; empty when it has none.
    """

    scenario: str
    metric: str
    name: str
    numerator: str
    denominator: str
    samples: tuple[float, ...]
    target: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def met(self) -> bool | None:
        """Whether the median reaches the target; None without one."""
        if not self.target:
            return None
        op, value = self.target.split()
        return self.median >= float(value) if op == ">=" else self.median <= float(value)

    def to_json(self) -> dict:
        out = asdict(self)
        out["samples"] = list(self.samples)
        out.update(median=self.median, min=min(self.samples), max=max(self.samples), met=self.met)
        return out


@dataclass(slots=True)
class Results:
    """Everything one benchmark run measured, plus what could not be measured and why."""

    figures: list[Figure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    unavailable: list[dict] = field(default_factory=list)

    def add(
        self, scenario: str, metric: str, system: str, unit: str, samples: list[float], note: str = ""
    ) -> None:
        if samples:
            self.figures.append(
                Figure(
                    scenario=scenario,
                    metric=metric,
                    system=system,
                    unit=unit,
                    samples=tuple(samples),
                    note=note,
                )
            )

    def missing(self, scenario: str, metric: str, system: str, reason: str) -> None:
        self.unavailable.append({"scenario": scenario, "metric": metric, "system": system, "reason": reason})

    def find(self, scenario: str, metric: str, system: str) -> Figure | None:
        return next(
            (f for f in self.figures if (f.scenario, f.metric, f.system) == (scenario, metric, system)), None
        )

    def ratio(
        self,
        scenario: str,
        metric: str,
        name: str,
        numerator: str,
        denominator: str,
        *,
        numerator_metric: str | None = None,
        denominator_metric: str | None = None,
        target: str = "",
    ) -> None:
        """Add the per-run ratio of two figures already recorded (skipped when either is missing)."""
        top = self.find(scenario, numerator_metric or metric, numerator)
        bottom = self.find(scenario, denominator_metric or metric, denominator)
        if top is None or bottom is None:
            return
        pairs = [(a, b) for a, b in zip(top.samples, bottom.samples, strict=True) if b > 0]
        if not pairs:
            return
        self.ratios.append(
            Ratio(
                scenario=scenario,
                metric=metric,
                name=name,
                numerator=numerator,
                denominator=denominator,
                samples=tuple(a / b for a, b in pairs),
                target=target,
            )
        )
