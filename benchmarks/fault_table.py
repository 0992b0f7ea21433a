"""The README's fault-matrix table, from the summary tests/test_fault_matrix.py writes.

Produce the summary, then the table:

    SHARDSAFE_FAULT_MATRIX_JSON=benchmarks/results/fault_matrix.json python -m pytest tests/test_fault_matrix.py
    python -m benchmarks.fault_table            # prints the Markdown table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_SUMMARY = Path(__file__).parent / "results" / "fault_matrix.json"
BACKENDS = ("local", "s3")


def _cell(case: dict[str, Any] | None) -> str:
    if case is None:
        return "n/a"
    if case["data_lost"] or not case["next_save_ok"]:
        return "**DATA LOST**" if case["data_lost"] else "next save failed"
    how = f"`{case['error']}`" if case["error"] else "process gone"
    return f"survived: {how}, {case['seconds']:.1f} s"


def table(summary: dict[str, Any]) -> str:
    """A Markdown table: one row per fault, one column per backend, then the totals."""
    faults: list[str] = []
    by_key = {}
    for case in summary["cases"]:
        if case["fault"] not in faults:
            faults.append(case["fault"])
        by_key[(case["fault"], case["backend"])] = case
    lines = [
        "| fault (during an overwriting save) | local disk | S3 (SeaweedFS) |",
        "|---|---|---|",
    ]
    for fault in faults:
        lines.append(f"| {fault} | " + " | ".join(_cell(by_key.get((fault, b))) for b in BACKENDS) + " |")
    lines.append("")
    lines.append(
        f"Faults tried: {summary['tried']}; survived (previous checkpoint loads bit-exact, next save "
        f"succeeds): {summary['survived']}; data lost: {summary['data_lost']}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", nargs="?", type=Path, default=DEFAULT_SUMMARY)
    args = parser.parse_args()
    print(table(json.loads(args.summary.read_text())))


if __name__ == "__main__":
    main()
