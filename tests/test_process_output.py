"""Readable output (issue 12, point 6): short pids and node ids, short ``say`` lines,
the same error for an unpicklable message locally as remotely."""

from __future__ import annotations

import re
import threading
from typing import Any

import hpcproc as hp
from hpcproc._spawning import fn_name

from .test_process_cluster import WAIT, Cluster, Servers, kind, run_cluster, servers

__all__ = ["kind", "servers"]


async def sayer(reply: hp.Pid) -> None:
    hp.say("short line please")
    await hp.send(reply, "said")


def test_pids_and_node_ids_print_short_with_the_full_address_on_request(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, sayer, hp.self_pid())
        return pid, await hp.expect(str, timeout=WAIT)

    pid, _ = run_cluster(kind, servers, body)
    assert re.fullmatch(r"<n[0-9a-f]{4}\.\d+>", repr(pid)), repr(pid)
    assert str(pid.node) == pid.node.label and repr(pid).startswith(f"<{pid.node.label}.")
    assert pid.full().startswith("<pid nid://") and pid.node.full().startswith("nid://")


def test_say_line_is_time_host_and_short_pid(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        hp.say("short line please")
        await c.logged.wait()
        return list(c.logs), hp.self_pid()

    logs, me = run_cluster(kind, servers, body)
    line = logs[0]
    assert re.match(r"\d\d:\d\d:\d\d\.\d\d\d \S+ <n[0-9a-f]{4}\.\d+>: short line please$", line)
    assert repr(me) in line and "nid://" not in line


def test_local_send_of_an_unpicklable_message_raises_serialization_error(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        here = hp.spawn_local(sayer, hp.self_pid())
        there = await hp.spawn(c.b, sayer, hp.self_pid())
        errors = []
        for pid in (here, there):
            try:
                await hp.send(pid, [threading.Lock()])
            except hp.SerializationError as exc:
                errors.append(type(exc).__name__)
        return errors

    assert run_cluster(kind, servers, body) == ["SerializationError", "SerializationError"]


def test_function_names_leave_out_the_module_name_hpcproc_run_gives_a_file() -> None:
    async def sink_with() -> None:
        pass

    sink_with.__module__ = "_hpcproc_main_apps"
    assert (
        fn_name(sink_with)
        == "apps.test_function_names_leave_out_the_module_name_hpcproc_run_gives_a_file.<locals>.sink_with"
    )
