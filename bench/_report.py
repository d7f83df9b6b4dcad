"""``python -m bench report [--quick | --smoke] [--out DIR]``: every suite, one report.

Runs every suite that can run here, one after the other, with a progress line per suite
on stderr: ``transport`` for each transport whose libraries are installed, ``process``
for tcp, shm (and mpi where mpi4py is installed), and ``peers`` (hpcproc over shm and
tcp beside Erlang, Ray, Dask, ProcessPoolExecutor and ``multiprocessing.Pipe``,
whichever are installed). It then writes to ``DIR``:

* ``report.json``: ``{"machine": {...}, "options": {...}, "suites": [...],
  "skipped": {...}, "records": [...]}``, the records as ``python -m bench --json``
  writes them;
* ``report.md``: the machine description, what was run or skipped, then one table per
  suite run, with links to the plots;
* ``*.png`` plots (with matplotlib; without it the report says how to install it):
  ``transport-NAME.png`` (round trip and bandwidth against message size, log-log, for
  hpcproc and each raw baseline), ``peers-rtt.png``, ``peers-rate.png``,
  ``peers-bandwidth.png`` and ``spawn.png`` (each hpcproc figure as a bar beside its
  baseline's, log scale).

A suite that fails is reported as failed (with its error) and the others still run;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._records import Record, _num, _size, as_dicts
from ._suites import SuiteOptions, load_suite

__all__ = ["main"]

#: transport -> the module its benchmark needs beyond hpcproc, and how to install it.
_TRANSPORT_NEEDS: dict[str, tuple[str, str]] = {
    "shm": ("mpi4py", "pip install -e '.[mpi]' (its mpi4py baseline)"),
    "mpi": ("mpi4py", "pip install -e '.[mpi]'"),
    "ucx": ("ucxx", "pip install -e '.[ucx]'"),
}
_TRANSPORTS = ("tcp", "shm", "mpi", "ucx")
_PROCESS_TRANSPORTS = ("tcp", "shm", "mpi")
_PEER_TRANSPORTS = "shm,tcp"
_LIBRARIES = (
    "hpcproc",
    "numpy",
    "cloudpickle",
    "mpi4py",
    "mpich",
    "ucxx-cu12",
    "matplotlib",
    "ray",
    "distributed",
)


@dataclass
class _Run:
    suite: str
    transport: str
    seconds: float = 0.0
    records: int = 0
    error: str | None = None

    @property
    def title(self) -> str:
        return f"{self.suite} ({self.transport})"


def _missing(transport: str) -> str | None:
    need = _TRANSPORT_NEEDS.get(transport)
    if need is not None and importlib.util.find_spec(need[0]) is None:
        return f"{need[0]} not installed: {need[1]}"
    return None


def _plan(skipped: dict[str, str]) -> list[_Run]:
    runs = []
    for name in _TRANSPORTS:
        why = _missing(name)
        if why is None:
            runs.append(_Run("transport", name))
        else:
            skipped[f"transport ({name})"] = why
    for name in _PROCESS_TRANSPORTS:
        # The process suite's shm baseline is hpcproc's raw shm transport: no mpi4py.
        why = None if name == "shm" else _missing(name)
        if why is None:
            runs.append(_Run("process", name))
        else:
            skipped[f"process ({name})"] = why
    runs.append(_Run("peers", _PEER_TRANSPORTS))
    from .peers import unavailable

    for peer, why in unavailable().items():
        skipped[f"peers: {peer}"] = why
    return runs


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, OS, Python, library versions."""
    from .peers import erlang

    versions: dict[str, str | None] = {}
    for lib in _LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    versions["erlang/otp"] = erlang.otp_release()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------- Markdown


def _md_table(records: Iterable[Record]) -> str:
    lines = [
        "| transport | metric | size | hpcproc | unit | baseline | baseline value | ratio |",
        "|---|---|--:|--:|---|---|--:|--:|",
    ]
    for r in records:
        cells = (
            r.transport,
            r.metric,
            _size(r.size),
            _num(r.value),
            r.unit,
            r.baseline,
            _num(r.baseline_value),
            f"{r.ratio:.2f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(
    info: dict[str, Any],
    options: SuiteOptions,
    runs: list[_Run],
    skipped: dict[str, str],
    records: dict[str, list[Record]],
    plots: list[tuple[str, str]],
    no_plots: str | None,
) -> str:
    mode = "--smoke" if options.smoke else "--quick" if options.quick else "(full)"
    out = ["# hpcproc benchmark report", ""]
    out.append(f"`python -m bench report {mode}`, {info['date']}.")
    if options.smoke:
        out += ["", "**Smoke run: a few iterations per row; the figures mean nothing.**"]
    out += [
        "",
        "Every ratio compares hpcproc with a baseline measured in the same run: hpcproc / "
        "baseline for times and sizes, baseline / hpcproc for rates, so **lower is better "
        "for hpcproc and 1.0 is parity**. Compare ratios rather than absolute figures on a "
        "shared or noisy machine.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {info['cpu']} |",
        f"| cores | {info['cores']} ({info['usable_cores']} usable) |",
        f"| load average at start | {', '.join(map(str, info['load_average']))} |",
        f"| OS | {info['os']} |",
        f"| Python | {info['python']} |",
    ]
    for lib, version in info["versions"].items():
        out.append(f"| {lib} | {version or 'not installed'} |")
    out += ["", "## Suites", "", "| suite | status | seconds | records |", "|---|---|--:|--:|"]
    for run in runs:
        status = "ok" if run.error is None else "**failed**"
        out.append(f"| {run.title} | {status} | {run.seconds:.1f} | {run.records} |")
    if skipped:
        out += ["", "Not run here:", ""]
        out += [f"- {what}: {why}" for what, why in skipped.items()]
    out += ["", "## Plots", ""]
    if no_plots is not None:
        out.append(f"No plots: {no_plots}.")
    for name, caption in plots:
        out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    for run in runs:
        out += ["", f"## {run.title}", ""]
        if run.error is not None:
            out += ["Failed:", "", "```", run.error.rstrip(), "```"]
        else:
            out.append(_md_table(records[run.title]))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- plots


def _transport_plot(path: Path, name: str, records: Sequence[Record]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, ylabel in (
        (axes[0], "rtt", "round trip (us)"),
        (axes[1], "bandwidth", "round-trip bandwidth (GB/s)"),
    ):
        rows = sorted((r for r in records if r.metric == metric), key=lambda r: r.size)
        ours = {r.size: r.value for r in rows}
        ax.plot(list(ours), list(ours.values()), "o-", linewidth=2.2, label=f"hpcproc {name}")
        for baseline in dict.fromkeys(r.baseline for r in rows):
            pts = [(r.size, r.baseline_value) for r in rows if r.baseline == baseline]
            ax.plot(*zip(*pts, strict=True), "s--", label=baseline)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"transport {name}: hpcproc beside its raw baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pairs_plot(path: Path, title: str, records: Sequence[Record]) -> None:
    """One group per record: hpcproc's bar beside its baseline's, log scale."""
    import matplotlib.pyplot as plt

    mixed = len({r.metric for r in records}) > 1

    def label(r: Record) -> str:
        words = [r.suite, r.transport, r.metric if mixed else "", _size(r.size) if r.size else ""]
        return " ".join(w for w in words if w) + f" vs {r.baseline}"

    # One bar pair per comparison: the process suite's one-node rows recur in every
    # transport's run.
    first: dict[str, Record] = {}
    for r in records:
        first.setdefault(label(r), r)
    records = list(first.values())
    height = max(2.5, 0.55 * len(records) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    ys = range(len(records))  # y grows downwards below: hpcproc above its baseline
    ax.barh([y - 0.2 for y in ys], [r.value for r in records], 0.4, label="hpcproc")
    ax.barh([y + 0.2 for y in ys], [r.baseline_value for r in records], 0.4, label="baseline")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([label(r) for r in records], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    units = sorted({r.unit for r in records})
    ax.set_xlabel(" / ".join(units))
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plots(out: Path, records: dict[str, list[Record]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    made: list[tuple[str, str]] = []
    every = [r for rows in records.values() for r in rows]
    for name in _TRANSPORTS:
        rows = records.get(f"transport ({name})")
        if rows:
            file = f"transport-{name}.png"
            _transport_plot(out / file, name, rows)
            made.append((file, f"transport {name}: round trip and bandwidth against size"))
    peers = [r for r in every if r.suite == "peers"]
    groups = (
        ("peers-rtt.png", "process round trip (8 B; lower is better)", "rtt", peers),
        ("peers-rate.png", "message rates (higher is better)", "msg_rate", peers),
        ("peers-bandwidth.png", "16 MiB round trip (higher is better)", "bandwidth", peers),
        ("spawn.png", "spawn and task rates (higher is better)", "spawn_rate", every),
    )
    for file, caption, metric, pool in groups:
        wanted = {metric, "task_rate"} if metric == "spawn_rate" else {metric}
        rows = [r for r in pool if r.metric in wanted]
        if rows:
            _pairs_plot(out / file, caption, rows)
            made.append((file, caption))
    return made


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench report",
        description="run every benchmark suite available here; write JSON, Markdown and plots",
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument(
        "--smoke", action="store_true", help="a few iterations per row (figures mean nothing)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-report"),
        metavar="DIR",
        help="output directory (default: bench-report)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    info = _machine()
    runs = _plan(skipped)
    for what, why in skipped.items():
        print(f"report: skipping {what}: {why}", file=sys.stderr)
    records: dict[str, list[Record]] = {}
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.title} ...", file=sys.stderr, flush=True)
        options = SuiteOptions(transport=run.transport, quick=args.quick, smoke=args.smoke)
        t0 = time.monotonic()
        try:
            rows = load_suite(run.suite)(options)
        except Exception:  # reported in the report; the other suites still run
            run.error = traceback.format_exc()
            rows = []
        run.seconds = time.monotonic() - t0
        run.records = len(rows)
        records[run.title] = rows
        status = "FAILED" if run.error else f"{len(rows)} records"
        print(f"[{i}/{len(runs)}] {run.title}: {status} in {run.seconds:.1f} s", file=sys.stderr)
        if run.error:
            print(run.error, file=sys.stderr)
    options = SuiteOptions(quick=args.quick, smoke=args.smoke)
    plots: list[tuple[str, str]] = []
    no_plots = None
    if importlib.util.find_spec("matplotlib") is None:
        no_plots = "matplotlib not installed: pip install -e '.[bench]'"
        print(f"report: {no_plots}", file=sys.stderr)
    else:
        plots = _plots(out, records)
    every = [r for rows in records.values() for r in rows]
    data = {
        "machine": info,
        "options": {"quick": args.quick, "smoke": args.smoke},
        "suites": [
            {
                "suite": r.suite,
                "transport": r.transport,
                "seconds": round(r.seconds, 2),
                "records": r.records,
                "error": r.error,
            }
            for r in runs
        ],
        "skipped": skipped,
        "records": as_dicts(every),
    }
    (out / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "report.md").write_text(
        _markdown(info, options, runs, skipped, records, plots, no_plots)
    )
    print(f"report: wrote {out / 'report.md'}, {out / 'report.json'} and {len(plots)} plots")
    return 1 if any(run.error for run in runs) else 0
