"""Process-layer semantics across two nodes.

Every scenario runs on two in-memory nodes in this process, and over each transport of
:data:`REMOTE` between this process and a node in a separate OS process
(:mod:`hpcproc.testing.node_server`): TCP, the routing transport ``shm+tcp`` (shared
memory between these two processes of one host), and ``teststreams``, the test transport
written to the abstract methods of ``base.py`` only (``tests/plugin_transport``, found
through its entry point). Process functions spawned on the other node are module-level
here, so the node server imports them by reference (``tests`` is a package and its
working directory is the repository root); closures travel by value. Scenarios marked
``fault_injection`` break the link on purpose and are skipped, with the reason, for a
transport without :class:`~hpcproc.transports.faults.FaultInjection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
import textwrap
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import hpcproc as hp
from hpcproc.testing.node_server import NodeServerProcess
from hpcproc.transports import ConnectError, ConnectErrorCode, create
from hpcproc.transports.faults import FaultInjection, require_fault_injection

from .test_process_local import Add, DivByZero, Divide, math_server

TIMEOUT = 60.0
WAIT = 15.0
COOKIE = "hpcproc-process-tests"
ROOT = Path(__file__).resolve().parent.parent


#: Transports of the cross-process runs -> their factory options (the node server
#: takes the cookie from HPCPROC_COOKIE).
#: ``shm+tcp``: the routing transport; the node server runs on this host, so its
#: connections go over shm (the tcp path is the conformance suite's separate_hosts run).
REMOTE: dict[str, dict[str, Any]] = {
    "tcp": {"cookie": COOKIE},
    "teststreams": {},
    "shm+tcp": {"cookie": COOKIE},
}


def _unavailable(kind: str) -> str | None:
    """Why the ``kind`` runs cannot happen here (None when they can)."""
    if kind == "teststreams" and importlib.util.find_spec("hpcproc_teststreams") is None:
        return (
            "teststreams: the test transport's distribution is not installed"
            " (make venv installs tests/plugin_transport)"
        )
    return None


def _has_fault_injection(kind: str) -> bool:
    async def check() -> bool:
        transport = create(kind, **REMOTE.get(kind, {}))
        try:
            return isinstance(transport, FaultInjection)
        finally:
            await transport.close()

    return asyncio.run(check())


# ---------------------------------------------------------------------- harness


@dataclass
class Cluster:
    """What a scenario gets: it runs on node ``a``; ``b`` is the other node."""

    kind: str
    a: hp.Node
    transport: Any
    b: hp.NodeId
    dead: hp.NodeId  # a node that existed and has closed
    stop_b: Callable[[], Awaitable[Any]]
    logs: list[str]
    logged: asyncio.Event

    async def break_link(self) -> None:
        """The network fault hook between a and b (tests using it are marked
        ``fault_injection``)."""
        faults = require_fault_injection(self.transport)
        await faults.break_connection(self.a.node_id.address, self.b.address)


class Servers:
    """Node servers (separate OS processes) for the cross-process runs, per transport;
    all stopped at teardown."""

    def __init__(self) -> None:
        self._all: list[NodeServerProcess] = []
        self._shared: dict[str, NodeServerProcess] = {}
        self._dead: dict[str, hp.NodeId] = {}

    def _start(self, kind: str) -> NodeServerProcess:
        env = dict(os.environ, HPCPROC_COOKIE=COOKIE)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        server = NodeServerProcess(kind, env=env, cwd=str(ROOT))
        self._all.append(server)
        return server

    def shared(self, kind: str) -> NodeServerProcess:
        server = self._shared.get(kind)
        if server is None or not server.alive:
            server = self._shared[kind] = self._start(kind)
        return server

    def fresh(self, kind: str) -> NodeServerProcess:
        return self._start(kind)

    def dead(self, kind: str) -> hp.NodeId:
        if kind not in self._dead:
            server = self._start(kind)
            server.stop()
            self._dead[kind] = server.node_id
        return self._dead[kind]

    def close(self) -> None:
        for server in self._all:
            server.stop()
            server.kill()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["inmemory", *REMOTE])
def kind(request: pytest.FixtureRequest) -> str:
    """The transport of a scenario: ``inmemory`` (both nodes here) or one of
    :data:`REMOTE`. Skips, with the reason, a transport that is not installed, and a
    ``fault_injection`` scenario on a transport without the fault hook."""
    name = str(request.param)
    reason = _unavailable(name)
    if reason is not None:
        pytest.skip(reason)
    if request.node.get_closest_marker("fault_injection") and not _has_fault_injection(name):
        pytest.skip(
            f"{name}: the transport does not implement the fault-injection interface"
            " hpcproc.transports.faults.FaultInjection (break_connection)"
        )
    return name


def _skip_unless_available(kind: str) -> None:
    reason = _unavailable(kind)
    if reason is not None:
        pytest.skip(reason)


Scenario = Callable[[Cluster], Coroutine[Any, Any, Any]]


def run_cluster(kind: str, servers: Servers, body: Scenario, *, fresh: bool = False) -> Any:
    """Run ``body(cluster)`` as a process on node a; return its result."""
    logs: list[str] = []
    logged = asyncio.Event()

    def sink(line: str) -> None:
        logs.append(line)
        logged.set()

    if kind == "inmemory":

        async def main() -> Any:
            transport = create("inmemory")
            a = await hp.Node(transport, log_sink=sink).start()
            b = await hp.Node(transport).start()
            d = await hp.Node(transport).start()
            dead = d.node_id
            await d.close()
            cluster = Cluster(kind, a, transport, b.node_id, dead, b.close, logs, logged)
            try:
                return await asyncio.wait_for(a.run(body, cluster), TIMEOUT)
            finally:
                await a.close()
                await b.close()
                await transport.close()

        return asyncio.run(main())

    server = servers.fresh(kind) if fresh else servers.shared(kind)
    dead = servers.dead(kind)

    async def main_remote() -> Any:
        transport = create(kind, **REMOTE[kind])
        a = await hp.Node(transport, log_sink=sink).start()

        async def stop_b() -> None:
            await asyncio.to_thread(server.stop)

        cluster = Cluster(kind, a, transport, server.node_id, dead, stop_b, logs, logged)
        try:
            return await asyncio.wait_for(a.run(body, cluster), TIMEOUT)
        finally:
            await a.close()
            await transport.close()

    try:
        return asyncio.run(main_remote())
    finally:
        if fresh:
            server.stop()


async def expect_ref(ref: hp.MonitorRef) -> Any:
    msg = await hp.receive(hp.match_if(lambda m: getattr(m, "ref", None) == ref), timeout=WAIT)
    assert msg is not None, "no notification arrived"
    return msg


async def sync_with(node: hp.NodeId) -> None:
    """A controller round trip: everything posted to ``node`` before has been handled."""
    await hp.whereis_remote(node, "logger", timeout=WAIT)


# ---------------------------------------------------------------------- remote processes


@dataclass(frozen=True)
class Ping:
    sender: hp.Pid
    n: int


@dataclass(frozen=True)
class Pong:
    n: int


@dataclass(frozen=True)
class Done:
    pass


class _Never:
    pass


async def pong_server() -> None:
    while True:
        ping = await hp.expect(Ping)
        await hp.send(ping.sender, Pong(ping.n))


async def ends_normally() -> None:
    return None


async def crashes() -> None:
    raise ValueError("remote boom")


async def waits_forever() -> None:
    await hp.expect(_Never)


async def echo() -> None:
    while True:
        sender, msg = await hp.expect(tuple)
        await hp.send(sender, msg)


async def terminates() -> None:
    hp.terminate()


async def stubborn(reply: hp.Pid) -> None:
    await hp.send(reply, "ready")
    while True:
        try:
            await hp.expect(_Never)
        except Exception:
            continue


async def catcher(reply: hp.Pid) -> None:
    try:
        await hp.send(reply, "ready")
        await hp.expect(_Never)
    except hp.ProcessExitException as exc:
        await hp.send(reply, ("caught", exc.reason, exc.sender))


async def chan_replier() -> None:
    port = await hp.expect(hp.SendPort)
    await hp.send_chan(port, ("reply from", hp.self_node()))


async def floods(reply: hp.Pid, n: int) -> None:
    for i in range(n):
        await hp.send(reply, i)
    await hp.send(reply, "wanted")
    await hp.send(reply, Done())


async def collector(reply: hp.Pid) -> None:
    got: list[Any] = []
    while True:
        msg = await hp.expect()
        if msg == "report":
            await hp.reconnect(reply)
            await hp.send(reply, ("report", tuple(got)))
        else:
            got.append(msg)


async def sayer(reply: hp.Pid, text: str) -> None:
    hp.say(text)
    await hp.send(reply, "said")


async def add(a: int, b: int) -> int:
    return a + b


def not_async() -> int:
    return 1


# ---------------------------------------------------------------------- messages


def test_ping_thousands_of_round_trips_in_order(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> list[int]:
        pid = await hp.spawn(c.b, pong_server)
        me = hp.self_pid()
        seen = []
        for n in range(2000):
            await hp.send(pid, Ping(me, n))
            pong = await hp.expect(Pong, timeout=WAIT)
            assert pong is not None
            seen.append(pong.n)
        return seen

    assert run_cluster(kind, servers, body) == list(range(2000))


def test_math_remote_dispatches_on_match_and_match_if(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> list[Any]:
        server = await hp.spawn(c.b, math_server)
        me = hp.self_pid()
        out = []
        for msg in (Add(me, 10, 22), Divide(me, 6, 3), Divide(me, 1, 0)):
            await hp.send(server, msg)
            out.append(await hp.expect(timeout=WAIT))
        return out

    assert run_cluster(kind, servers, body) == [32, 2.0, DivByZero()]


def test_timeout0_finds_remote_message_behind_10000_unwanted(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        await hp.spawn(c.b, floods, hp.self_pid(), 10000)
        assert await hp.expect(Done, timeout=WAIT) == Done()
        return await hp.expect(str, timeout=0), await hp.expect(int, timeout=0)

    assert run_cluster(kind, servers, body) == ("wanted", 0)


def test_send_to_terminated_remote_process_is_dropped(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid, ref = await hp.spawn_monitor(c.b, ends_normally)
        await expect_ref(ref)
        await hp.send(pid, "into the void")
        live = await hp.spawn(c.b, echo)
        await hp.send(live, (hp.self_pid(), "still works"))
        return await hp.expect(str, timeout=WAIT), await hp.get_process_info(pid)

    assert run_cluster(kind, servers, body) == ("still works", None)


def test_typed_channel_send_port_in_message_carries_reply(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        sp, rp = hp.new_chan()
        pid = await hp.spawn(c.b, chan_replier)
        await hp.send(pid, sp)
        return await hp.receive_chan(rp, timeout=WAIT), c.b

    (tag, node), b = run_cluster(kind, servers, body)
    assert tag == "reply from" and node == b


def test_spawn_closure_travels_by_value(kind: str, servers: Servers) -> None:
    secret = [41]

    async def body(c: Cluster) -> Any:
        me = hp.self_pid()

        async def closure() -> None:
            await hp.send(me, (secret[0] + 1, hp.self_node()))

        await hp.spawn(c.b, closure)
        return await hp.expect(tuple, timeout=WAIT), c.b

    (value, node), b = run_cluster(kind, servers, body)
    assert value == 42 and node == b


def test_call_runs_function_remotely_and_returns_result(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        return await hp.call(c.b, add, 20, 22)

    assert run_cluster(kind, servers, body) == 42


#: The transport that carries node b for each kind (the node server runs on this host).
CARRIER = {"inmemory": "inmemory", "tcp": "tcp", "shm+tcp": "shm"}


def test_node_stats_name_the_transport_carrying_each_connected_peer(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        before = await hp.get_node_stats(c.a.node_id)
        assert await hp.call(c.b, add, 1, 2) == 3  # connects both ways
        mine = await hp.get_node_stats(c.a.node_id)
        theirs = await hp.get_node_stats(c.b)
        return before.peer_transports, mine.peer_transports, theirs.peer_transports

    before, mine, theirs = run_cluster(kind, servers, body)
    assert before == ()  # connections are opened on first use
    carrier = CARRIER.get(kind, kind)
    assert len(mine) == 1 and mine[0][1] == carrier, mine
    # b (shared by the tests) may still know nodes a of earlier tests: all of one kind.
    assert theirs and {t for _, t in theirs} == {carrier}, theirs


# ---------------------------------------------------------------------- spawning


def test_spawn_terminate_1000_remote_spawns_all_end(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> int:
        refs = [(await hp.spawn_monitor(c.b, ends_normally))[1] for _ in range(1000)]
        normal = 0
        for ref in refs:
            normal += (await expect_ref(ref)).reason == hp.DiedNormal()
        return normal

    assert run_cluster(kind, servers, body) == 1000


def test_spawn_invalid_non_async_function_fails_in_caller(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        try:
            await hp.spawn(c.b, not_async)  # type: ignore[arg-type]
        except hp.SpawnError as exc:
            return str(exc), str(c.b)
        return "no error", ""

    msg, node = run_cluster(kind, servers, body)
    assert "not_async" in msg and node in msg


def test_spawn_invalid_raising_on_start_names_function_and_node(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        try:
            await hp.spawn(c.b, add, 1, 2, 3)
        except hp.SpawnError as exc:
            return str(exc), str(c.b)
        return "no error", ""

    msg, node = run_cluster(kind, servers, body)
    assert "add" in msg and "raised while starting" in msg and node in msg


@pytest.mark.parametrize("remote", list(REMOTE))
def test_spawn_invalid_function_not_loadable_remotely(
    remote: str, servers: Servers, tmp_path: Path
) -> None:
    _skip_unless_available(remote)
    (tmp_path / "only_here_mod.py").write_text(
        textwrap.dedent(
            """
            async def only_here() -> None:
                return None
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here_mod  # type: ignore[import-not-found]

        async def body(c: Cluster) -> Any:
            try:
                await hp.spawn(c.b, only_here_mod.only_here)
            except hp.SpawnError as exc:
                return str(exc), str(c.b)
            return "no error", ""

        msg, node = run_cluster(remote, servers, body)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here_mod", None)
    assert "only_here_mod.only_here" in msg and "cannot load" in msg and node in msg


# ---------------------------------------------------------------------- termination


def test_terminate_remote_reports_died_exception(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        _, ref = await hp.spawn_monitor(c.b, terminates)
        return (await expect_ref(ref)).reason

    reason = run_cluster(kind, servers, body)
    assert isinstance(reason, hp.DiedException) and "terminated" in reason.reason


def test_kill_remote_is_uncatchable_and_reports_reason(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid, ref = await hp.spawn_monitor(c.b, stubborn, hp.self_pid())
        assert await hp.expect(str, timeout=WAIT) == "ready"
        await hp.kill(pid, "remote enough")
        return (await expect_ref(ref)).reason

    reason = run_cluster(kind, servers, body)
    assert isinstance(reason, hp.DiedException) and "remote enough" in reason.reason


def test_exit_remote_can_be_caught(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, catcher, hp.self_pid())
        assert await hp.expect(str, timeout=WAIT) == "ready"
        await hp.exit(pid, "stop please")
        return await hp.expect(tuple, timeout=WAIT), hp.self_pid()

    (tag, reason, sender), me = run_cluster(kind, servers, body)
    assert (tag, reason, sender) == ("caught", "stop please", me)


# ---------------------------------------------------------------------- registry


def test_registry_remote_register_whereis_nsend(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> list[Any]:
        me = hp.self_pid()
        pid = await hp.spawn(c.b, echo)
        name = f"echo-{kind}-{me.lid}"
        await hp.register_remote(c.b, name, pid)
        out: list[Any] = [await hp.whereis_remote(c.b, name, timeout=WAIT) == pid]
        await hp.nsend_remote(c.b, name, (me, "by remote name"))
        out.append(await hp.expect(str, timeout=WAIT))
        out.append(await hp.whereis_remote(c.b, "no-such-name", timeout=WAIT))
        try:
            await hp.register_remote(c.b, name, me)
        except hp.ProcessRegistrationException:
            out.append("taken")
        out.append(hp.whereis(name))  # names belong to their node
        return out

    assert run_cluster(kind, servers, body) == [True, "by remote name", None, "taken", None]


def test_registry_monitoring_remote_name_dropped_on_death(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid, ref = await hp.spawn_monitor(c.b, waits_forever)
        name = f"doomed-{kind}-{hp.self_pid().lid}"
        await hp.register_remote(c.b, name, pid)
        before = await hp.whereis_remote(c.b, name, timeout=WAIT) == pid
        await hp.kill(pid, "x")
        await expect_ref(ref)
        return before, await hp.whereis_remote(c.b, name, timeout=WAIT)

    assert run_cluster(kind, servers, body) == (True, None)


def test_registry_monitoring_name_of_a_remote_process_dropped_on_death(
    kind: str, servers: Servers
) -> None:
    """A name registered here for a process of another node goes when it dies."""

    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        name = f"remote-doomed-{kind}-{hp.self_pid().lid}"
        hp.register(name, pid)
        ref = await hp.monitor(pid)
        before = hp.whereis(name) == pid
        await hp.kill(pid, "x")
        await expect_ref(ref)
        # The registry's watch went to node b on the control connection and ours on
        # our pair connection, so either may be first there, and its death notice
        # first here (on b's control connection both): the round trip on it brings
        # the other one in.
        await sync_with(c.b)
        return before, hp.whereis(name)

    assert run_cluster(kind, servers, body) == (True, None)


def test_registry_monitoring_name_on_another_node_dropped_when_our_process_dies(
    kind: str, servers: Servers
) -> None:
    """register_remote of one of our processes: its name there goes when it dies."""

    async def body(c: Cluster) -> Any:
        pid = hp.spawn_local(waits_forever)
        ref = await hp.monitor(pid)
        name = f"ours-doomed-{kind}-{pid.lid}"
        await hp.register_remote(c.b, name, pid)
        before = await hp.whereis_remote(c.b, name, timeout=WAIT) == pid
        await hp.kill(pid, "x")
        await expect_ref(ref)
        # Our node told b of the death before this request (one FIFO per node pair).
        return before, await hp.whereis_remote(c.b, name, timeout=WAIT)

    assert run_cluster(kind, servers, body) == (True, None)


@pytest.mark.fault_injection
def test_registry_name_of_a_remote_process_dropped_on_disconnect(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        name = f"remote-cut-{kind}-{hp.self_pid().lid}"
        hp.register(name, pid)
        ref = await hp.monitor(pid)
        await sync_with(c.b)
        await c.break_link()
        note = await expect_ref(ref)
        return note.reason, hp.whereis(name)

    assert run_cluster(kind, servers, body) == (hp.DiedDisconnect(), None)


def test_registry_replaced_name_survives_the_death_of_its_old_remote_process(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        old = await hp.spawn(c.b, waits_forever)
        new = await hp.spawn(c.b, waits_forever)
        name = f"replaced-{kind}-{hp.self_pid().lid}"
        hp.register(name, old)
        await hp.register_remote(c.a.node_id, name, new, replace=True)
        other = f"unregistered-{kind}-{hp.self_pid().lid}"
        hp.register(other, old)
        hp.unregister(other)
        ref = await hp.monitor(old)
        await hp.kill(old, "x")
        await expect_ref(ref)
        await sync_with(c.b)  # any late word of old's death has come back by now
        result = hp.whereis(name) == new, hp.whereis(other)
        await hp.kill(new, "x")
        return result

    assert run_cluster(kind, servers, body) == (True, None)


def test_unpicklable_nsend_remote_exit_and_spawn_fail_in_the_caller(
    kind: str, servers: Servers
) -> None:
    import threading

    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        pid = await hp.spawn(c.b, echo)
        name = f"echo-unpicklable-{kind}-{me.lid}"
        await hp.register_remote(c.b, name, pid)
        out = []
        lock = threading.Lock()
        try:
            await hp.nsend_remote(c.b, name, (me, lock))
        except hp.SerializationError:
            out.append("nsend")
        try:
            await hp.exit(pid, lock)
        except hp.SerializationError:
            out.append("exit")

        async def holds_lock() -> None:
            assert lock is not None

        try:
            await hp.spawn(c.b, holds_lock)
        except hp.SpawnError as exc:
            out.append("spawn" if "cannot pickle" in str(exc) else str(exc))
        # The node's control channel to b still works, and a message is copied when
        # nsend_remote is called: changing it afterwards does not change what arrives.
        payload = ["as sent"]
        await hp.nsend_remote(c.b, name, (me, payload))
        payload.append("changed later")
        out.append(await hp.expect(list, timeout=WAIT))
        await hp.kill(pid, "x")
        return out

    assert run_cluster(kind, servers, body) == ["nsend", "exit", "spawn", ["as sent"]]


def test_remote_process_info_and_node_stats(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        await hp.send(pid, "queued")
        await sync_with(c.b)
        info = await hp.get_process_info(pid)
        stats = await hp.get_node_stats(c.b)
        await hp.kill(pid, "x")
        return info, stats, c.b

    info, stats, b = run_cluster(kind, servers, body)
    assert info.message_queue_length == 1 and info.node == b
    assert stats.node == b and stats.processes >= 2


# ---------------------------------------------------------------------- logger


def test_logs_of_another_node_can_be_redirected_here(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        await hp.redirect_logs(c.b)
        await hp.spawn(c.b, sayer, hp.self_pid(), "hello from b")
        assert await hp.expect(str, timeout=WAIT) == "said"
        await asyncio.wait_for(c.logged.wait(), WAIT)
        return list(c.logs), str(c.b)

    logs, b = run_cluster(kind, servers, body, fresh=True)
    assert len(logs) == 1 and "hello from b" in logs[0] and b in logs[0]


# ---------------------------------------------------------------------- monitors and links


def test_monitor_remote_normal_termination(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid, ref = await hp.spawn_monitor(c.b, ends_normally)
        note = await expect_ref(ref)
        return note.pid == pid, note.reason

    assert run_cluster(kind, servers, body) == (True, hp.DiedNormal())


def test_monitor_remote_abnormal_termination(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        _, ref = await hp.spawn_monitor(c.b, crashes)
        return (await expect_ref(ref)).reason

    reason = run_cluster(kind, servers, body)
    assert isinstance(reason, hp.DiedException) and "remote boom" in reason.reason


def test_link_remote_normal_termination_raises_nothing(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn_link(c.b, ends_normally)
        ref = await hp.monitor(pid)
        await expect_ref(ref)
        await sync_with(c.b)
        return await hp.expect(timeout=0)

    assert run_cluster(kind, servers, body) is None


def test_link_remote_abnormal_termination_raises_link_exception(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        pid = None
        try:
            pid = await hp.spawn_link(c.b, crashes)
            await hp.expect(_Never, timeout=WAIT)
        except hp.ProcessLinkException as exc:
            return exc.pid == pid, exc.reason
        return "no exception", None

    same, reason = run_cluster(kind, servers, body)
    assert same is True and isinstance(reason, hp.DiedException)


def test_monitor_remote_dead_process_reports_unknown_id(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid, ref = await hp.spawn_monitor(c.b, ends_normally)
        await expect_ref(ref)
        ref2 = await hp.monitor(pid)
        return (await expect_ref(ref2)).reason

    assert run_cluster(kind, servers, body) == hp.DiedUnknownId()


def test_link_remote_dead_process_raises_unknown_id(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid, ref = await hp.spawn_monitor(c.b, ends_normally)
        await expect_ref(ref)
        try:
            await hp.link(pid)
            await hp.expect(_Never, timeout=WAIT)
        except hp.ProcessLinkException as exc:
            return exc.reason
        return "no exception"

    assert run_cluster(kind, servers, body) == hp.DiedUnknownId()


@pytest.mark.fault_injection
def test_monitor_reports_disconnect(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        ref = await hp.monitor(pid)
        await sync_with(c.b)
        await c.break_link()
        note = await expect_ref(ref)
        return note.pid == pid, note.reason

    assert run_cluster(kind, servers, body) == (True, hp.DiedDisconnect())


@pytest.mark.fault_injection
def test_link_reports_disconnect_as_link_exception(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        await hp.link(pid)
        await sync_with(c.b)
        try:
            await c.break_link()
            await hp.expect(_Never, timeout=WAIT)
        except hp.ProcessLinkException as exc:
            return exc.pid == pid, exc.reason
        return "no exception", None

    assert run_cluster(kind, servers, body) == (True, hp.DiedDisconnect())


def test_monitor_unreachable_node_reports_disconnect(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = hp.Pid(c.dead, 12345)
        ref = await hp.monitor(pid)
        return (await expect_ref(ref)).reason

    assert run_cluster(kind, servers, body) == hp.DiedDisconnect()


def test_link_unreachable_node_raises_disconnect(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        try:
            await hp.link(hp.Pid(c.dead, 12345))
            await hp.expect(_Never, timeout=WAIT)
        except hp.ProcessLinkException as exc:
            return exc.reason
        return "no exception"

    assert run_cluster(kind, servers, body) == hp.DiedDisconnect()


def test_unmonitor_remote_means_no_notification(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        ref = await hp.monitor(pid)
        witness = await hp.monitor(pid)
        await hp.unmonitor(ref)
        await hp.kill(pid, "x")
        await expect_ref(witness)
        return await hp.receive(hp.match_if(lambda m: getattr(m, "ref", None) == ref), timeout=0)

    assert run_cluster(kind, servers, body) is None


def test_unlink_remote_means_no_exception(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        await hp.link(pid)
        witness = await hp.monitor(pid)
        await hp.unlink(pid)
        await hp.kill(pid, "x")
        await expect_ref(witness)
        await sync_with(c.b)
        return await hp.expect(timeout=0)

    assert run_cluster(kind, servers, body) is None


def test_monitor_node_of_dead_node_reports_disconnect(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        ref = await hp.monitor_node(c.dead)
        note = await expect_ref(ref)
        return type(note), note.node == c.dead, note.reason

    assert run_cluster(kind, servers, body) == (
        hp.NodeMonitorNotification,
        True,
        hp.DiedDisconnect(),
    )


def test_monitor_live_node_reports_node_down_when_it_closes(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        pref = await hp.monitor(pid)
        nref = await hp.monitor_node(c.b)
        await c.stop_b()
        pnote = await expect_ref(pref)
        nnote = await expect_ref(nref)
        return pnote.reason, nnote.node == c.b, nnote.reason

    assert run_cluster(kind, servers, body, fresh=True) == (
        hp.DiedNodeDown(),
        True,
        hp.DiedNodeDown(),
    )


def test_link_node_raises_when_node_closes(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        await hp.link_node(c.b)
        # Stopped from a plain task: the link exception is raised in an hpcproc call.
        stopper = asyncio.ensure_future(c.stop_b())
        try:
            await hp.expect(_Never, timeout=WAIT)
        except hp.NodeLinkException as exc:
            return exc.node == c.b, exc.reason
        finally:
            await stopper
        return "no exception", None

    assert run_cluster(kind, servers, body, fresh=True) == (True, hp.DiedNodeDown())


# ---------------------------------------------------------------------- reconnect


@pytest.mark.fault_injection
def test_reconnect_after_disconnect_drops_messages_until_reconnect(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        pid = await hp.spawn(c.b, collector, me)
        await hp.send(pid, "m1")
        await hp.send(pid, "report")
        first = await hp.expect(tuple, timeout=WAIT)
        await c.break_link()
        await hp.send(pid, "m2")  # dropped: the connection to pid was lost
        await hp.send(pid, "m2b")  # still dropped until reconnect
        await hp.reconnect(pid)
        await hp.send(pid, "m3")
        await hp.send(pid, "report")
        second = await hp.expect(tuple, timeout=WAIT)
        return first, second

    first, second = run_cluster(kind, servers, body)
    assert first == ("report", ("m1",))
    assert second == ("report", ("m1", "m3"))


async def monitors_then_reports(target: hp.Pid, reply: hp.Pid) -> None:
    ref = await hp.monitor(target)
    note = await expect_ref(ref)
    await hp.send(reply, ("monitor", note.reason))


async def links_then_reports(target: hp.Pid, reply: hp.Pid) -> None:
    hp.trap_exits(True)
    await hp.link(target)
    sig = await hp.expect(hp.ExitSignal, timeout=WAIT)
    assert sig is not None, "no exit signal arrived"
    await hp.send(reply, ("link", sig.from_ == target, sig.reason))


@contextlib.contextmanager
def connects_refused(node: hp.Node) -> Iterator[None]:
    """Inside, every new connect of ``node``'s endpoint fails (``ConnectError``); the
    connections it has keep working."""

    async def refused(*_: Any, **__: Any) -> Any:
        raise ConnectError(ConnectErrorCode.FAILED, "refused by the test")

    endpoint: Any = node.endpoint
    endpoint.connect = refused
    try:
        yield
    finally:
        del endpoint.connect


def test_a_pair_connection_that_cannot_open_fires_the_senders_monitor_and_link(
    kind: str, servers: Servers
) -> None:
    """Disconnect counts as failure for a sender's own connection too: when its pair
    connection to a process cannot be opened while that process's node stays up (its
    messages there are dropped until ``reconnect``), its monitor of the process and its
    link to it fire with ``DiedDisconnect`` at once, not never."""

    async def body(c: Cluster) -> Any:
        target = await hp.spawn(c.b, waits_forever)  # the control connection is open now
        node_ref = await hp.monitor_node(c.b)
        with connects_refused(c.a):
            me = hp.self_pid()
            hp.spawn_local(monitors_then_reports, target, me)
            hp.spawn_local(links_then_reports, target, me)
            got = [await hp.expect(tuple, timeout=WAIT) for _ in range(2)]
        assert None not in got, got
        # Node b was not lost: its monitor stays quiet past a control round trip, and
        # the target is alive.
        await sync_with(c.b)
        node_down = await hp.receive(
            hp.match_if(lambda m: getattr(m, "ref", None) == node_ref), timeout=0
        )
        # Alive, and holding no watch of the two (they fired here: b was not told).
        info = await hp.get_process_info(target)
        await hp.kill(target, "x")
        assert info is not None
        return sorted(got, key=lambda m: str(m[0])), node_down, info.monitored_by, info.linked_by

    assert run_cluster(kind, servers, body) == (
        [("link", True, hp.DiedDisconnect()), ("monitor", hp.DiedDisconnect())],
        None,
        (),
        (),
    )


def _send_fails(*_: Any) -> Any:
    """A pair connection's ``send_nowait`` that fails as a broken link does."""
    raise hp.transports.SendError(hp.transports.SendErrorCode.FAILED, "broken by the test")


async def _send_fails_async(*args: Any) -> Any:
    """Its ``send``."""
    _send_fails(*args)


def test_a_pair_connection_that_fails_fires_the_senders_monitor_and_drops_the_rest(
    kind: str, servers: Servers
) -> None:
    """A send that fails on the pair connection (the node staying up) fires the
    sender's monitor of the receiver with ``DiedDisconnect``; later messages are
    dropped until ``reconnect``, and then delivered again."""

    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        target = await hp.spawn(c.b, collector, me)
        ref = await hp.monitor(target)  # opens the pair connection
        await hp.send(target, "m1")
        # Delivered before the pair breaks (the report after it comes on a new one).
        await hp.send(target, "report")
        first = await hp.expect(tuple, timeout=WAIT)
        proc = c.a.local_process(me.lid)
        assert proc is not None and proc.conns is not None
        conn = proc.conns[target]
        conn.send_nowait, conn.send = _send_fails, _send_fails_async
        await hp.send(target, "m2")  # fails: the monitor fires
        note = await expect_ref(ref)
        await hp.send(target, "m3")  # dropped: the pair is broken
        await hp.reconnect(target)
        await hp.send(target, "report")
        report = await hp.expect(tuple, timeout=WAIT)
        await hp.kill(target, "x")
        return first, note.reason, report

    assert run_cluster(kind, servers, body) == (
        ("report", ("m1",)),
        hp.DiedDisconnect(),
        ("report", ("m1",)),
    )


async def _echo_arrays() -> None:
    while True:
        sender, array = await hp.expect(tuple)
        await hp.send(sender, array)


def test_a_remote_message_that_cannot_go_out_at_once_is_serialized_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message the pair connection does not take at once (the in-memory transport
    never does) is sent by awaiting it with the frames serialized for the first try:
    it used to be serialized again, which for an array costs as much as a tenth of its
    round trip (256 KiB over mpi)."""
    import numpy as np

    from hpcproc import _remote

    from ._two_nodes import run_two_nodes

    serialized: list[Any] = []
    serialize = _remote.serialize

    def counting(msg: Any) -> Any:
        serialized.append(msg)
        return serialize(msg)

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        echo = await hp.spawn(b.node_id, _echo_arrays)
        array = np.arange(1000, dtype=np.int64)
        await hp.send(echo, (hp.self_pid(), array))  # opens the pair connection
        await hp.expect(np.ndarray, timeout=WAIT)
        monkeypatch.setattr(_remote, "serialize", counting)
        await hp.send(echo, (hp.self_pid(), array))
        monkeypatch.undo()
        back = await hp.expect(np.ndarray, timeout=WAIT)
        await hp.kill(echo, "done")
        return [type(m) for m in serialized], np.array_equal(back, array)

    assert run_two_nodes(body, 20.0) == ([tuple], True)


async def _greets_then_ends_on_cue(reply: hp.Pid) -> None:
    _, watcher = await hp.expect(tuple)
    await hp.send(watcher, "hi")  # opens the pair connection to the watcher
    await hp.send(reply, "ready")
    await hp.expect(str)


async def monitors_greets_then_reports(target: hp.Pid, reply: hp.Pid) -> None:
    ref = await hp.monitor(target)
    # Behind the monitor request on the pair connection: the target sees the monitor
    # in place before it sees this.
    await hp.send(target, ("hello", hp.self_pid()))
    note = await expect_ref(ref)
    await hp.send(reply, ("monitor", note.reason))


@pytest.mark.parametrize("when", ["at once", "after waiting"])
def test_a_death_notice_whose_pair_connection_fails_goes_by_the_control_queue(
    kind: str, servers: Servers, when: str
) -> None:
    """An ended process's notice to a watcher elsewhere goes on their pair connection;
    if that send fails, the notice still reaches the watcher (the node's control
    queue), with the process's own reason: whether the send fails at once or the
    connection had no room (the notice waits, ``RemoteSender.process_ended``) and
    then fails."""

    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        target = hp.spawn_local(_greets_then_ends_on_cue, me)
        await hp.spawn(c.b, monitors_greets_then_reports, target, me)
        assert await hp.expect(str, timeout=WAIT) == "ready"
        proc = c.a.local_process(target.lid)
        assert proc is not None and proc.conns is not None
        (conn,) = proc.conns.values()
        if when == "at once":
            conn.send_nowait = _send_fails
        else:
            conn.send_nowait, conn.send = (lambda *_: False), _send_fails_async
        await hp.send(target, "end")
        return await hp.expect(tuple, timeout=WAIT)

    assert run_cluster(kind, servers, body) == ("monitor", hp.DiedNormal())


def test_watches_of_an_ended_process_are_removed_on_the_target_node(
    kind: str, servers: Servers
) -> None:
    async def watches_then_ends(target: hp.Pid, reply: hp.Pid) -> None:
        await hp.monitor(target)
        await hp.link(target)
        await hp.send(reply, "watching")

    async def body(c: Cluster) -> Any:
        target = await hp.spawn(c.b, waits_forever)
        watcher = hp.spawn_local(watches_then_ends, target, hp.self_pid())
        ref = await hp.monitor(watcher)
        assert await hp.expect(str, timeout=WAIT) == "watching"
        await expect_ref(ref)
        info = await hp.get_process_info(target)
        await hp.kill(target, "x")
        assert info is not None
        return info.monitored_by, info.linked_by

    assert run_cluster(kind, servers, body) == ((), ())


async def sink_forever() -> None:
    while True:
        await hp.expect()


async def sends_to(targets: tuple[hp.Pid, ...], n: int, reply: hp.Pid) -> None:
    for target in targets:
        for i in range(n):
            await hp.send(target, i)
    await hp.send(reply, "sent")


def test_one_connection_per_communicating_pair_opened_lazily_and_reused(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        before = (await hp.get_node_stats(c.b)).incoming_connections
        b1 = await hp.spawn(c.b, sink_forever)
        b2 = await hp.spawn(c.b, sink_forever)
        spawned = (await hp.get_node_stats(c.b)).incoming_connections
        hp.spawn_local(sends_to, (b1, b2), 50, me)
        hp.spawn_local(sends_to, (b1,), 50, me)
        for _ in range(2):
            assert await hp.expect(str, timeout=WAIT) == "sent"
        after = (await hp.get_node_stats(c.b)).incoming_connections
        await hp.kill(b1, "x")
        await hp.kill(b2, "x")
        return spawned - before, after - spawned

    # Spawning uses only the controller connection (at most one new); three sender ->
    # receiver pairs communicated, 150 messages: three connections.
    ctl, pairs = run_cluster(kind, servers, body)
    assert ctl in (0, 1)
    assert pairs == 3


def test_remote_requests_to_an_unreachable_node_raise_node_unreachable(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> list[str]:
        out = []
        for request in (
            lambda: hp.spawn(c.dead, ends_normally),
            lambda: hp.whereis_remote(c.dead, "logger", timeout=WAIT),
            lambda: hp.get_node_stats(c.dead),
        ):
            try:
                await request()
            except hp.NodeUnreachableError:
                out.append("unreachable")
        return out

    assert run_cluster(kind, servers, body) == ["unreachable"] * 3


def test_call_of_a_killed_function_raises_call_error(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> str:
        async def killer() -> None:
            pid = await hp.expect(hp.Pid, timeout=WAIT)
            await hp.kill(pid, "stop it")

        k = hp.spawn_local(killer)

        async def reports_then_waits() -> None:
            await hp.send(k, hp.self_pid())
            await hp.expect(_Never)

        try:
            await hp.call(c.b, reports_then_waits)
        except hp.CallError as exc:
            return str(exc)
        return "no error"

    assert "stop it" in run_cluster(kind, servers, body)


@pytest.mark.parametrize("remote", list(REMOTE))
def test_monitor_reports_disconnect_when_remote_os_process_is_killed(
    remote: str, servers: Servers
) -> None:
    _skip_unless_available(remote)
    server = servers.fresh(remote)

    async def body(c: Cluster) -> Any:
        pid = await hp.spawn(c.b, waits_forever)
        ref = await hp.monitor(pid)
        nref = await hp.monitor_node(c.b)
        await asyncio.to_thread(server.kill)  # SIGKILL: no goodbye from node b
        return (await expect_ref(ref)).reason, (await expect_ref(nref)).reason

    async def main() -> Any:
        transport = create(remote, **REMOTE[remote])
        a = await hp.Node(transport).start()

        async def stop_b() -> None:
            await asyncio.to_thread(server.kill)

        cluster = Cluster(
            remote, a, transport, server.node_id, servers.dead(remote), stop_b, [], asyncio.Event()
        )
        try:
            return await asyncio.wait_for(a.run(body, cluster), TIMEOUT)
        finally:
            await a.close()
            await transport.close()

    try:
        assert asyncio.run(main()) == (hp.DiedDisconnect(), hp.DiedDisconnect())
    finally:
        server.kill()


async def _watch_node_and_end(node: hp.NodeId) -> None:
    await hp.monitor_node(node)


def test_process_ending_with_a_node_monitor_drops_it_cleanly(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        pid = hp.spawn_local(_watch_node_and_end, c.b)
        ref = await hp.monitor(pid)
        note = await expect_ref(ref)
        # The node still serves the other node after the watch was dropped.
        echoed = await hp.call(c.b, _identity, 7)
        return note.reason, echoed, [ctx.get("exception") for ctx in errors]

    assert run_cluster(kind, servers, body) == (hp.DiedNormal(), 7, [])


async def _identity(x: int) -> int:
    return x


async def _spawn_monitor_and_end(node: hp.NodeId, report: hp.Pid) -> None:
    pid, _ref = await hp.spawn_monitor(node, waits_forever)
    await hp.send(report, pid)


async def _end_while_a_task_spawn_monitors(node: hp.NodeId) -> None:
    # A task acting for this process starts a spawn_monitor and waits for its reply;
    # the process ends before the reply, with the monitor ref still without a pid.
    spawning = asyncio.ensure_future(hp.spawn_monitor(node, waits_forever))
    await asyncio.sleep(0)  # one step of the task: it posted the request and waits
    assert not spawning.done()


def test_a_process_that_ends_beside_a_pending_spawn_monitor_is_reported_dead(
    servers: Servers,
) -> None:
    """Its watchers are told, and nothing raises in its exit: the pending ref has no
    target to unmonitor. Both nodes on one loop (inmemory), so the order is fixed:
    the spawn reply is handled only after the process's exit."""

    async def body(c: Cluster) -> Any:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        pid, ref = await hp.spawn_monitor(c.a.node_id, _end_while_a_task_spawn_monitors, c.b)
        note = await expect_ref(ref)
        return pid == note.pid and type(note.reason) is hp.DiedNormal, errors

    assert run_cluster("inmemory", servers, body) == (True, [])


async def _reports_then_waits(reply: hp.Pid) -> None:
    await hp.send(reply, hp.self_pid())
    await hp.expect(_Never)


@pytest.mark.parametrize("spawn", ["spawn_monitor", "spawn_link"])
def test_a_spawn_given_up_on_leaves_no_watch_on_the_new_process(
    servers: Servers, spawn: str
) -> None:
    """A ``spawn_monitor`` or ``spawn_link`` cancelled after its request went: the
    process still starts, but without a monitor or link that nobody holds. Both nodes
    on one loop (inmemory), so the reply comes after the cancellation."""

    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        spawning = asyncio.ensure_future(getattr(hp, spawn)(c.b, _reports_then_waits, me))
        await asyncio.sleep(0)  # one step: it posted the request and waits
        spawning.cancel()
        await asyncio.gather(spawning, return_exceptions=True)
        pid = await hp.expect(hp.Pid, timeout=WAIT)
        await sync_with(c.b)  # behind the spawn's reply: its undoing went to b before
        info = await hp.get_process_info(pid)
        await hp.kill(pid, "done")
        assert info is not None
        return spawning.cancelled(), info.monitored_by, info.linked_by

    assert run_cluster("inmemory", servers, body) == (True, (), ())


@pytest.mark.parametrize("spawn", ["spawn_monitor", "spawn_link"])
def test_a_spawn_given_up_on_as_its_reply_is_handled_leaves_no_watch(
    servers: Servers, spawn: str
) -> None:
    """The same, cancelled after its reply was handled (the watch recorded here) but
    before the caller took the pid: no watch on either side, and the new process's
    end does not reach the caller (a link would kill it)."""
    from hpcproc._control import Reply

    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        handlers = c.a.controller._handlers
        on_reply = handlers[Reply]
        outside: list[bool] = []

        def reply_then_cancel(nid: hp.NodeId, msg: Any) -> None:
            on_reply(nid, msg)
            outside.append(asyncio.current_task() is not spawning)
            spawning.cancel()  # the caller has not run since the reply

        handlers[Reply] = reply_then_cancel
        try:
            spawning = asyncio.ensure_future(getattr(hp, spawn)(c.b, _reports_then_waits, me))
            await asyncio.gather(spawning, return_exceptions=True)
        finally:
            handlers[Reply] = on_reply
        pid = await hp.expect(hp.Pid, timeout=WAIT)
        await sync_with(c.b)  # behind the undoing
        info = await hp.get_process_info(pid)
        ours = {key for watches in c.a.watches.remote.values() for key in watches}
        await hp.kill(pid, "done")
        await sync_with(c.b)  # behind a death notice, were one sent
        stray = await hp.expect(timeout=0)
        assert info is not None
        return outside, spawning.cancelled(), info.monitored_by, info.linked_by, ours, stray

    assert run_cluster("inmemory", servers, body) == ([True], True, (), (), set(), None)


def test_spawn_monitor_is_removed_remotely_when_its_watcher_ends(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        watcher = hp.spawn_local(_spawn_monitor_and_end, c.b, hp.self_pid())
        ref = await hp.monitor(watcher)
        target = await hp.expect(hp.Pid, timeout=WAIT)
        await expect_ref(ref)
        # The unmonitor was posted before the watcher's DOWN was delivered, on the
        # same ordered control connection as this query: one query suffices.
        info = await hp.get_process_info(target)
        await hp.kill(target, "done")
        return info is not None and info.monitored_by, errors

    assert run_cluster(kind, servers, body) == ((), [])
