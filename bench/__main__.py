"""``python -m bench SUITE [--transport NAME] [--option NAME=VALUE ...] [--tls] [--quick | --smoke]
[--np N] [--json PATH]``, and
``python -m bench report [--quick | --smoke] [--out DIR]`` (:mod:`bench._report`)."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from ._records import format_table, worst_ratios, write_json
from ._suites import DEFAULT_TRANSPORT, SUITES, SuiteOptions, load_suite


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from ._report import main as report

        return report(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="hpcproc benchmarks, with baselines from the same run"
    )
    parser.add_argument(
        "suite", help=f"suite to run ({', '.join(SUITES)}), or 'report' (see report --help)"
    )
    parser.add_argument(
        "--transport", help="transport name (default: tcp; auto for the cluster suite)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations: under a minute")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few iterations of every row, to check that the suite runs (figures mean nothing)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="transport suite, tcp: also measure tcp over mutual TLS, against plain tcp",
    )
    parser.add_argument(
        "--np",
        type=int,
        metavar="N",
        help="cluster suite: N ranks on this host (under mpiexec) instead of srun",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="transport suite: an option of the measured transport (repeatable), such as "
        "inline_threshold=65536; the value is read as a Python literal, else as a string",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the records as JSON")
    args = parser.parse_args(argv)
    try:
        transport_options = tuple(_option(text) for text in args.option)
    except ValueError as exc:
        parser.error(str(exc))
    if transport_options and args.suite != "transport":
        parser.error(f"--option is for the transport suite, not {args.suite!r}")
    try:
        run = load_suite(args.suite)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    try:
        transport = args.transport or DEFAULT_TRANSPORT.get(args.suite, "tcp")
        if args.np is not None and args.np < 2:
            parser.error("--np must be at least 2")
        records = run(
            SuiteOptions(
                transport=transport,
                quick=args.quick,
                smoke=args.smoke,
                tls=args.tls,
                np=args.np,
                transport_options=transport_options,
            )
        )
    except ValueError as exc:  # the suite cannot measure what was asked
        parser.error(str(exc))
    print(format_table(records))
    if args.suite == "transport":
        print("\n".join(worst_ratios(records)))
    if args.json is not None:
        write_json(records, args.json)
    return 0


def _option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` as ``(name, value)``; the value as a Python literal if it is one."""
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"--option takes NAME=VALUE, such as inline_threshold=65536, not {text!r}")
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name, value


if __name__ == "__main__":
    sys.exit(main())
