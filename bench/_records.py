"""Benchmark records: one measured value against one baseline, and their output.

Every suite returns a list of :class:`Record`; ``python -m bench`` prints them as a
table and writes them as a JSON list. ``ratio`` is oriented so that lower is better
for hpcproc and 1.0 is parity: hpcproc / baseline for times and sizes, baseline /
hpcproc for rates.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "METRICS",
    "Record",
    "as_dicts",
    "format_table",
    "median",
    "record",
    "worst_ratios",
    "write_json",
]

#: metric -> (unit, True when larger values are better).
METRICS: dict[str, tuple[str, bool]] = {
    "rtt": ("us", False),
    "bandwidth": ("GB/s", True),
    "msg_rate": ("messages/s", True),
    "spawn_rate": ("spawns/s", True),
    "task_rate": ("tasks/s", True),
    "bytes_per_process": ("bytes", False),
    "call_rate": ("calls/s", True),
    "restart_latency": ("us", False),
    "op_time": ("us", False),
    "node_rss": ("bytes", False),
    "startup": ("s", False),
}


@dataclass(frozen=True, slots=True)
class Record:
    """One result row; the field names are the JSON keys."""

    suite: str
    transport: str
    metric: str
    size: int
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float


def record(
    suite: str,
    transport: str,
    metric: str,
    size: int,
    value: float,
    baseline: str,
    baseline_value: float,
) -> Record:
    """Build a record, taking the unit and the ratio's orientation from ``metric``.

    ``size`` is the message size in bytes, 0 where none applies. The ratio is NaN
    when the denominator is zero.

    Raises:
        ValueError: ``metric`` is not one of :data:`METRICS`.
    """
    try:
        unit, higher_is_better = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}") from None
    num, den = (baseline_value, value) if higher_is_better else (value, baseline_value)
    ratio = num / den if den else math.nan
    return Record(
        suite,
        transport,
        metric,
        int(size),
        float(value),
        unit,
        baseline,
        float(baseline_value),
        ratio,
    )


def median(values: Sequence[float]) -> float:
    """The median of several runs: robust to the odd run disturbed by other load."""
    if not values:
        raise ValueError("no measurements")
    return float(statistics.median(values))


def _size(n: int) -> str:
    if n == 0:
        return "-"
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _num(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if x == 0 or 0.01 <= abs(x) < 1e6:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{x:.3e}"


def format_table(records: Iterable[Record]) -> str:
    """A fixed-width, human-readable table of ``records``."""
    header = ("suite", "transport", "metric", "size", "value", "unit", "baseline", "base", "ratio")
    rows = [header]
    for r in records:
        rows.append(
            (
                r.suite,
                r.transport,
                r.metric,
                _size(r.size),
                _num(r.value),
                r.unit,
                r.baseline,
                _num(r.baseline_value),
                f"{r.ratio:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {3, 4, 7, 8}
    lines = []
    for k, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def worst_ratios(records: Iterable[Record]) -> list[str]:
    """One line per transport and baseline: the worst ratio over every message size,
    and where it is, so that a regression anywhere in the range shows at once."""
    worst: dict[tuple[str, str], Record] = {}
    for r in records:
        if r.size == 0 or math.isnan(r.ratio):
            continue
        key = (r.transport, r.baseline)
        if key not in worst or r.ratio > worst[key].ratio:
            worst[key] = r
    return [
        f"worst ratio {transport} vs {baseline} over all sizes: {r.ratio:.2f}"
        f" ({r.metric} at {_size(r.size)})"
        for (transport, baseline), r in sorted(worst.items())
    ]


def as_dicts(records: Iterable[Record]) -> list[dict[str, Any]]:
    """``records`` as JSON-ready objects (NaN ratios become ``None``)."""
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()}
        for r in records
    ]


def write_json(records: Iterable[Record], target: Path | TextIO) -> None:
    """Write ``records`` as a JSON list of objects (NaN ratios become ``null``)."""
    text = json.dumps(as_dicts(records), indent=1)
    if isinstance(target, Path):
        target.write_text(text + "\n")
    else:
        target.write(text + "\n")
