"""The benchmark's outputs: a table on stdout, a JSON file of every raw figure, the machine's description.

The table is Markdown, so the README's results section is a paste of it.
The JSON keeps every sample, every per-run ratio, what could not be
measured and why, the command line, the date and the machine, because a
time is only meaningful next to the machine that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from typing import Any

import psutil
import torch

from benchmarks.comparisons import label, row_order
from benchmarks.peers import TCKPT, TCKPT_FSYNC
from benchmarks.scenarios import UNVERIFIED
from benchmarks.stats import DCP, OURS, Figure, Ratio, Results

MiB = 1024**2
# The reference figure shown beside each row, when the row has one.
_REFERENCES = {
    ("async_blocking", "staging_bandwidth"): ("staging_bandwidth", "memcpy"),
    ("async_blocking", "block_s"): ("block_s", "memcpy"),
    ("durable_save", "sync_s"): ("sync_s", "dd"),
    ("durable_save", "async_s"): ("sync_s", "dd"),
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(path: str) -> dict[str, str]:
    """The mount that holds `path`: device and file-system type (what the disk figures depend on)."""
    path = os.path.realpath(path)
    best = None
    for part in psutil.disk_partitions(all=True):
        inside = path == part.mountpoint or path.startswith(part.mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    if best is None:
        return {}
    usage = shutil.disk_usage(path)
    return {
        "mountpoint": best.mountpoint,
        "device": best.device,
        "fstype": best.fstype,
        "free_bytes": str(usage.free),
    }


def machine_description(work_dir: str, device: str) -> dict[str, Any]:
    """What the figures depend on: CPU, memory, disk, library versions, GPU when used."""
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_at_start": os.getloadavg(),
        "work_dir_filesystem": _filesystem(work_dir),
    }
    if device == "cuda":
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def write_json(path: str, payload: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _value(f: Figure | None) -> str:
    if f is None:
        return "n/a"
    if f.unit == "bytes":
        return f"{f.median / MiB:.1f} MiB [{min(f.samples) / MiB:.1f}-{max(f.samples) / MiB:.1f}]"
    if f.unit == "B/s":
        return f"{f.median / 1e9:.2f} GB/s [{min(f.samples) / 1e9:.2f}-{max(f.samples) / 1e9:.2f}]"
    return f"{f.median:.3f} s [{min(f.samples):.3f}-{max(f.samples):.3f}]"


def _ratio_text(r: Ratio) -> str:
    text = f"{r.name} {r.median:.2f}x [{min(r.samples):.2f}-{max(r.samples):.2f}]"
    if r.target:
        text += f" (target {r.target}: {'met' if r.met else 'MISSED'})"
    return text


def format_table(results: Results) -> str:
    """The Markdown table: one row per figure, every system, the reference, the ratios of that row."""
    systems = [OURS, DCP, TCKPT, TCKPT_FSYNC]
    rows = [
        "| scenario | measure (median [min-max]) | "
        + " | ".join(systems)
        + " | reference | per-run ratios |",
        "|---|---|" + "---|" * len(systems) + "---|---|",
    ]
    seen: list[tuple[str, str]] = []
    for f in results.figures:
        if f.system in systems and (f.scenario, f.metric) not in seen:
            seen.append((f.scenario, f.metric))
    for scenario, metric in row_order(seen):
        ref = ""
        if (scenario, metric) in _REFERENCES:
            ref_metric, ref_system = _REFERENCES[(scenario, metric)]
            ref = f"{ref_system} {_value(results.find(scenario, ref_metric, ref_system))}"
        elif results.find(scenario, metric, UNVERIFIED) is not None:
            ref = f"verify=False {_value(results.find(scenario, metric, UNVERIFIED))}"
        ratios = "; ".join(
            _ratio_text(r) for r in results.ratios if (r.scenario, r.metric) == (scenario, metric)
        )
        values = " | ".join(_value(results.find(scenario, metric, system)) for system in systems)
        rows.append(f"| {scenario} | {label(scenario, metric)} | {values} | {ref} | {ratios} |")
    for gap in results.unavailable:
        rows.append(
            f"| {gap['scenario']} | {gap['metric']} | {gap['system']}: not available |"
            + " |" * (len(systems) - 1)
            + f" | {gap['reason']} |"
        )
    return "\n".join(rows) + "\n"


def format_plugins(plugins: dict[str, Any]) -> str:
    """One line per scalar figure of the plugged-in benchmarks (their JSON holds everything)."""
    lines = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            lines.append(f"- {prefix}: {value}")

    for name, result in plugins.items():
        lines.append(f"{name}:")
        walk("", result)
    return "\n".join(lines) + ("\n" if lines else "")
