"""Crash reports and remote tracebacks (issue 12, point 4).

Over two in-memory nodes and between two OS processes (see
:mod:`tests.test_process_cluster`); node b's logs are redirected to node a, whose log
sink the scenario reads.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import hpcproc as hp

from .test_process_cluster import WAIT, Cluster, Servers, kind, run_cluster, servers

__all__ = ["kind", "servers"]


async def buggy_echo(reply: hp.Pid) -> None:
    await hp.send(reply, "started")
    _parse_request("no colon here")


def _parse_request(text: str) -> tuple[str, str]:
    key, value = text.split(":")
    return key, value


def test_unwatched_crash_logs_a_report_with_pid_and_traceback(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        await hp.redirect_logs(c.b)
        # Watched: its monitor is told, so no report.
        watched, ref = await hp.spawn_monitor(c.b, buggy_echo, hp.self_pid())
        note = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        # Unwatched: a report.
        unwatched = await hp.spawn(c.b, buggy_echo, hp.self_pid())
        await asyncio.wait_for(c.logged.wait(), WAIT)
        return list(c.logs), str(unwatched), str(watched), note.ref == ref

    logs, unwatched, watched, same = run_cluster(kind, servers, body, fresh=True)
    assert same and len(logs) == 1
    report = logs[0]
    assert "crash report" in report and unwatched in report and watched not in report
    assert "buggy_echo" in report and "_parse_request" in report and "ValueError" in report


def test_died_exception_carries_the_remote_traceback(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        _, ref = await hp.spawn_monitor(c.b, buggy_echo, hp.self_pid())
        note = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        return note.ref == ref, note.reason

    same, reason = run_cluster(kind, servers, body)
    assert same and isinstance(reason, hp.DiedException)
    assert reason.reason.startswith("ValueError: ")
    assert "_parse_request" in reason.traceback and "text.split" in reason.traceback


@pytest.mark.parametrize("setting", ["always", "never"])
def test_crash_reports_are_configurable(setting: str) -> None:
    logs: list[str] = []

    async def crash() -> None:
        raise RuntimeError("boom")

    async def body() -> Any:
        await hp.monitor(hp.spawn_local(crash))
        await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        hp.say("marker")  # the logger handles records in order

    async def main() -> None:
        transport = hp.transports.create("inmemory")
        got_marker = asyncio.Event()

        def sink(line: str) -> None:
            logs.append(line)
            if "marker" in line:
                got_marker.set()

        async with hp.Node(transport, log_sink=sink, crash_reports=setting) as node:
            await node.run(body)
            await asyncio.wait_for(got_marker.wait(), WAIT)
        await transport.close()

    asyncio.run(main())
    reports = [line for line in logs if "crash report" in line]
    assert len(reports) == (1 if setting == "always" else 0)


def test_crash_reports_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="unwatched, always, never"):
        hp.Node(hp.transports.create("inmemory"), crash_reports="sometimes")
