"""hpcproc.otp across OS processes: node loss by ``kill -9``.

This process runs node a (tcp); the other nodes are node servers in separate OS
processes (:mod:`hpcproc.testing.node_server`), killed with SIGKILL mid-scenario. The
classes and functions they run are module-level in ``tests`` (imported there by
reference; the working directory is the repository root).
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import hpcproc as hp
from hpcproc import otp
from hpcproc._process import current
from hpcproc.testing.node_server import NodeServerProcess
from hpcproc.transports import create

from .test_otp_local import Counter, Worker, expect_msg, member, nothing_left, started
from .test_process_cluster import connects_refused

TIMEOUT = 90.0
#: Bound on a stop that must succeed (generous: the machine may be loaded).
STOP_WAIT = 30.0
COOKIE = "hpcproc-otp-tests"
ROOT = Path(__file__).resolve().parent.parent
HANG = "HPCPROC_OTP_TEST_HANG"


class Servers:
    """Node servers started by a test; all stopped (killed if need be) at teardown."""

    def __init__(self) -> None:
        self.all: list[NodeServerProcess] = []

    def start(self, **extra_env: str) -> NodeServerProcess:
        env = dict(os.environ, HPCPROC_COOKIE=COOKIE, **extra_env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        server = NodeServerProcess("tcp", {"cookie": COOKIE}, env=env, cwd=str(ROOT))
        self.all.append(server)
        return server


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        for server in s.all:
            server.kill()


def run(body: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """Run ``body(*args)`` as a process on a tcp node in this OS process."""

    async def main() -> Any:
        transport = create("tcp", cookie=COOKIE)
        node = await hp.Node(transport).start()
        try:
            return await asyncio.wait_for(node.run(body, *args), TIMEOUT)
        finally:
            await node.close()
            await transport.close()

    return asyncio.run(main())


async def kill_9(server: NodeServerProcess) -> None:
    """SIGKILL the node server (no goodbye reaches its peers)."""
    await asyncio.to_thread(server.kill)


def test_supervisor_restarts_the_child_of_a_killed_node_on_a_live_node(servers: Servers) -> None:
    b, c = servers.start(), servers.start()

    async def body() -> Any:
        me = hp.self_pid()
        # The child's shutdown outlasts the stop's timeout: a shutdown that does not
        # reach the child fails the stop instead of ending in a kill (slack for a
        # loaded machine either way).
        spec = otp.ChildSpec(
            "w", Worker, ("w", me), node=[b.node_id, c.node_id], shutdown=2 * STOP_WAIT
        )
        sup = await otp.start_supervisor([spec], nodes=[b.node_id, c.node_id])
        first = await started("w")
        await kill_9(b)
        second = await started("w")
        row = (await otp.which_children(sup))[0]
        answer = await otp.call(second, "ping")
        await otp.stop(sup, timeout=STOP_WAIT)
        return first[0] == b.node_id, second[0] == c.node_id, row.node == c.node_id, answer

    assert run(body) == (True, True, True, ("w", "ping"))


def test_node_loss_counts_towards_restart_intensity(servers: Servers) -> None:
    b, c = servers.start(), servers.start()

    async def body() -> Any:
        me = hp.self_pid()
        spec = otp.ChildSpec("w", Worker, ("w", me), node="any")
        sup = await otp.start_supervisor([spec], max_restarts=0, nodes=[b.node_id, c.node_id])
        ref = await hp.monitor(sup)
        pid = await started("w")
        await kill_9(b if pid[0] == b.node_id else c)
        down = await expect_msg(lambda m: getattr(m, "ref", None) == ref)
        return down.reason

    reason = run(body)
    assert isinstance(reason, hp.DiedException) and "child 'w'" in reason.reason


def test_call_to_a_server_on_a_killed_node_raises_server_down_at_once(servers: Servers) -> None:
    b = servers.start()

    async def body() -> Any:
        pid = await otp.start(Counter, node=b.node_id)
        assert await otp.call(pid, 1) == 1
        waiting = asyncio.ensure_future(kill_9(b))
        try:
            await otp.call(pid, "hold", timeout=None)  # only the monitor can end this
        except otp.ServerDown as exc:
            await waiting
            return type(exc.reason), await nothing_left()
        return None

    assert run(body) == (hp.DiedDisconnect, True)


def test_remote_call_timeout_leaves_nothing_in_the_mailbox(servers: Servers) -> None:
    b = servers.start()

    async def body() -> Any:
        pid = await otp.start(Counter, 7, node=b.node_id)
        with pytest.raises(otp.CallTimeout):
            await otp.call(pid, "hold", timeout=0.05)
        await otp.cast(pid, "release")
        value = await otp.call(pid, "get")
        await otp.stop(pid)
        return value, await nothing_left()

    assert run(body) == (7, True)


def test_group_member_on_a_killed_node_leaves_the_group(servers: Servers) -> None:
    b, c = servers.start(), servers.start()

    async def body() -> Any:
        me = hp.self_pid()
        await otp.start_pg([b.node_id, c.node_id])
        await otp.monitor_group("g")
        on_b = await hp.spawn(b.node_id, member, me, "g")
        on_c = await hp.spawn(c.node_id, member, me, "g")
        joined: set[hp.Pid] = set()
        while joined != {on_b, on_c}:
            joined |= set((await expect_msg(lambda m: isinstance(m, otp.GroupEvent))).joined)
        await kill_9(b)
        left = await expect_msg(lambda m: isinstance(m, otp.GroupEvent))
        return left.left, await otp.members("g"), on_b, on_c

    left, now, on_b, on_c = run(body)
    assert left == (on_b,) and now == [on_c]


async def hang_on_marked_node(watcher: hp.Pid, x: int) -> int:
    """Square ``x``, except on a node started with HANG set: tell ``watcher`` and hang."""
    if os.environ.get(HANG):
        await hp.send(watcher, ("hanging", x))
        await hp.expect(type(None))
    return x * x


async def run_map(report: hp.Pid, fn: Any, items: list[int], nodes: list[hp.NodeId]) -> None:
    pairs = [pair async for pair in otp.imap(fn, items, nodes=nodes)]
    await hp.send(report, ("result", pairs))


def test_map_redispatches_the_work_of_a_killed_node_every_result_once(servers: Servers) -> None:
    b, c = servers.start(**{HANG: "1"}), servers.start()

    async def body() -> Any:
        me = hp.self_pid()
        fn = functools.partial(hang_on_marked_node, me)
        items = list(range(300))
        hp.spawn_local(run_map, me, fn, items, [b.node_id, c.node_id])
        await expect_msg(lambda m: m[0] == "hanging")  # b holds unfinished work
        await kill_9(b)
        (_, pairs) = await expect_msg(lambda m: m[0] == "result")
        return sorted(i for i, _ in pairs), all(v == i * i for i, v in pairs), len(items)

    indices, correct, n = run(body)
    assert indices == list(range(n))  # every index yielded exactly once
    assert correct


def test_mandelbrot_example_survives_kill_9_of_a_worker_node() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(HPCPROC_COOKIE=COOKIE, PYTHONPATH=str(ROOT), MANDELBROT_KILL_RANK="2")
    done = subprocess.run(
        [sys.executable, "-m", "hpcproc.run", "--np", "4", "examples/mandelbrot_ft.py:main"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "lost rank 2" in out and "on 3 workers" in out and "exact=True" in out, out


def test_remote_crash_in_handle_call_reaches_the_caller_with_its_traceback(
    servers: Servers,
) -> None:
    b = servers.start()

    async def body() -> Any:
        pid = await otp.start(Counter, node=b.node_id)
        try:
            await otp.call(pid, "crash")
        except otp.ServerDown as exc:
            return exc.reason, exc.remote_traceback, await nothing_left()
        return None

    reason, tb, empty = run(body)
    assert "ZeroDivisionError: crash requested" in reason
    assert "handle_call" in tb and "ZeroDivisionError" in tb and empty


async def calls_and_reports(pid: hp.Pid, reply: hp.Pid) -> None:
    try:
        value: Any = await otp.call(pid, "get", timeout=None)
    except otp.ServerDown as exc:
        value = type(exc.reason)
    await hp.send(reply, ("called", value, await nothing_left()))


def test_a_call_whose_request_cannot_reach_the_server_raises_server_down_at_once(
    servers: Servers,
) -> None:
    """A call whose own connection to the server cannot be opened (the server's node
    staying up) raises ``ServerDown(DiedDisconnect)`` at once, not after ``timeout``
    (here: never), as Erlang's call exits with ``noconnection``."""
    b = servers.start()

    async def body() -> Any:
        pid = await otp.start(Counter, 7, node=b.node_id)
        assert await otp.call(pid, "get") == 7  # the call watch is connected already
        with connects_refused(current().node):
            hp.spawn_local(calls_and_reports, pid, hp.self_pid())  # a caller without a pair
            got = await hp.expect(tuple, timeout=STOP_WAIT)
        await otp.stop(pid)
        return got

    assert run(body) == ("called", hp.DiedDisconnect, True)
