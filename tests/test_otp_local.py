"""hpcproc.otp on one node: GenServer, supervisors, process groups and map.

Every scenario runs as a process on an in-memory node; restarts are observed through
messages the children send when they start (no polling, no sleeps). The cross-node
promises (node loss) are in ``test_otp_cluster.py``.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

import hpcproc as hp
from hpcproc import otp
from hpcproc.transports import create

from ._two_nodes import run_two_nodes

TIMEOUT = 60.0
WAIT = 15.0


def run(body: Callable[..., Coroutine[Any, Any, Any]], *args: Any, nodes: int = 1) -> Any:
    """Run ``body(*args, other_nodes)`` as a process on a fresh in-memory node."""

    async def main() -> Any:
        transport = create("inmemory")
        all_nodes = [await hp.Node(transport).start() for _ in range(nodes)]
        try:
            others = [n.node_id for n in all_nodes[1:]]
            return await asyncio.wait_for(all_nodes[0].run(body, *args, others), TIMEOUT)
        finally:
            for n in all_nodes:
                await n.close()
            await transport.close()

    return asyncio.run(main())


async def nothing_left() -> bool:
    """True when the caller's mailbox is empty."""
    return await hp.receive(hp.match_any(), timeout=0) is None


async def expect_msg(pred: Callable[[Any], bool]) -> Any:
    msg = await hp.receive(hp.match_if(pred), timeout=WAIT)
    assert msg is not None, "expected message did not arrive"
    return msg


# ---------------------------------------------------------------------- servers


class Counter(otp.GenServer):
    async def init(self, *args: Any) -> None:
        self.n = args[0] if args else 0
        self.held: list[otp.Caller] = []
        self.info: list[Any] = []

    async def handle_call(self, request: Any, caller: otp.Caller) -> Any:
        if request == "crash":
            raise ZeroDivisionError("crash requested")
        if request == "hold":
            self.held.append(caller)
            return otp.NOREPLY
        if request == "info":
            return list(self.info)
        if request == "get":
            return self.n
        self.n += request
        return self.n

    async def handle_cast(self, msg: Any) -> None:
        if msg == "release":
            for caller in self.held:
                await otp.reply(caller, "late")
            self.held.clear()
        else:
            self.n += msg

    async def handle_info(self, msg: Any) -> None:
        self.info.append(msg)


class FailsInit(otp.GenServer):
    async def init(self, *args: Any) -> None:
        raise KeyError("no config")


def test_call_returns_handle_call_value_and_cast_is_handled_in_order() -> None:
    async def body(_: Any) -> Any:
        pid = await otp.start(Counter, 10, name="counter")
        await otp.cast(pid, 5)
        by_pid = await otp.call(pid, 1)
        by_name = await otp.call("counter", 1)
        by_remote_name = await otp.call(("counter", hp.self_node()), 0)
        await otp.stop(pid)
        return by_pid, by_name, by_remote_name, await nothing_left()

    assert run(body) == (16, 17, 17, True)


def test_crash_in_handle_call_raises_server_down_with_remote_traceback() -> None:
    async def body(_: Any) -> Any:
        pid = await otp.start(Counter)
        ref = await hp.monitor(pid)
        try:
            await otp.call(pid, "crash", timeout=None)
        except otp.ServerDown as exc:
            down = await expect_msg(lambda m: getattr(m, "ref", None) == ref)
            return exc.remote_traceback, str(exc.reason), down.reason, await nothing_left()
        return None

    tb, reason, died, empty = run(body)
    assert "ZeroDivisionError: crash requested" in tb and "handle_call" in tb
    assert reason == "ZeroDivisionError: crash requested"
    assert isinstance(died, hp.DiedException)
    assert empty


def test_call_to_a_server_that_dies_raises_server_down_at_once_without_timeout() -> None:
    async def killer(pid: hp.Pid) -> None:
        await hp.kill(pid, "killed in test")

    async def body(_: Any) -> Any:
        pid = await otp.start(Counter)
        hp.spawn_local(killer, pid)
        try:
            await otp.call(pid, "hold", timeout=None)  # would wait forever without the monitor
        except otp.ServerDown as exc:
            return exc.reason, await nothing_left()
        return None

    reason, empty = run(body)
    assert isinstance(reason, hp.DiedException) and "killed in test" in reason.reason and empty


def test_call_timeout_leaves_nothing_in_the_mailbox_and_drops_the_late_reply() -> None:
    async def body(_: Any) -> Any:
        pid = await otp.start(Counter, 1)
        try:
            await otp.call(pid, "hold", timeout=0.05)
        except otp.CallTimeout:
            pass
        else:
            return "no timeout"
        await otp.cast(pid, "release")  # the server now sends the late reply
        after = await otp.call(pid, "get")  # its reply comes after the late one
        empty = await nothing_left()
        await otp.stop(pid)
        return after, empty, await nothing_left()

    assert run(body) == (1, True, True)


def test_server_down_on_an_unknown_name_and_a_dead_pid() -> None:
    async def body(_: Any) -> Any:
        pid = await otp.start(Counter)
        await otp.stop(pid)
        out = []
        for server in ("nobody", pid):
            try:
                await otp.call(server, 1)
            except otp.ServerDown as exc:
                out.append(type(exc.reason).__name__)
        return out, await nothing_left()

    assert run(body) == (["str", "DiedUnknownId"], True)


def test_reply_later_from_another_process_reaches_the_caller() -> None:
    async def body(_: Any) -> Any:
        pid = await otp.start(Counter)

        async def releaser() -> None:
            await otp.cast(pid, "release")

        hp.spawn_local(releaser)
        return await otp.call(pid, "hold", timeout=WAIT)

    assert run(body) == "late"


def test_init_failure_raises_start_error_with_remote_traceback() -> None:
    async def body(_: Any) -> Any:
        try:
            await otp.start(FailsInit)
        except otp.StartError as exc:
            return exc.remote_traceback, await nothing_left()
        return None

    tb, empty = run(body)
    assert "KeyError: 'no config'" in tb and empty


class SlowInit(otp.GenServer):
    """Reports ("initialising", pid), then waits in ``init`` until told."""

    async def init(self, *args: Any) -> None:
        await hp.send(args[0], ("initialising", hp.self_pid()))
        await hp.expect(type(None))


def test_an_interrupted_start_kills_the_half_started_server() -> None:
    """A start interrupted by an exit signal leaves no server behind (nobody would
    know its pid, nor be linked to it): it is killed, naming why."""

    async def body(_: Any) -> Any:
        me = hp.self_pid()

        async def starter() -> None:
            try:
                await otp.start(SlowInit, me)
            except hp.ProcessExitException as exc:
                await hp.send(me, ("interrupted", exc.reason))

        s = hp.spawn_local(starter)
        _, server = await expect_msg(lambda m: type(m) is tuple and m[0] == "initialising")
        ref = await hp.monitor(server)
        await hp.exit(s, "changed my mind")
        interrupted = await expect_msg(lambda m: type(m) is tuple and m[0] == "interrupted")
        down = await expect_msg(lambda m: getattr(m, "ref", None) == ref)
        return interrupted, "start was interrupted" in getattr(down.reason, "reason", "")

    assert run(body) == (("interrupted", "changed my mind"), True)


def test_handle_info_gets_plain_messages_and_monitor_notifications() -> None:
    async def body(_: Any) -> Any:
        pid = await otp.start(Counter)
        await hp.send(pid, "plain")
        return await otp.call(pid, "info")

    assert run(body) == ["plain"]


class Trapper(otp.GenServer):
    """Traps exits, links to a process that dies when told, reports what it got."""

    async def init(self, *args: Any) -> None:
        self.report_to: hp.Pid = args[0]
        hp.trap_exits(True)

    async def handle_cast(self, msg: Any) -> None:
        doomed = hp.spawn_local(crash_when_told)
        await hp.link(doomed)
        await hp.send(doomed, "now")

    async def handle_info(self, msg: Any) -> None:
        await hp.send(self.report_to, ("info", msg))


async def crash_when_told() -> None:
    await hp.expect(str)
    raise ValueError("told to crash")


def test_a_server_that_traps_exits_gets_exit_signals_in_handle_info() -> None:
    async def body(_: Any) -> Any:
        pid = await otp.start(Trapper, hp.self_pid())
        await otp.cast(pid, "link-and-crash")
        _, signal = await expect_msg(lambda m: isinstance(m, tuple) and m[0] == "info")
        alive = await hp.get_process_info(pid)
        return signal, alive is not None

    signal, alive = run(body)
    assert isinstance(signal, hp.ExitSignal)
    assert isinstance(signal.reason, hp.DiedException)
    assert "told to crash" in str(signal.reason)
    assert alive  # trapping: the link did not take the server down


def test_stop_runs_terminate_and_waits_for_the_end() -> None:
    async def body(_: Any) -> Any:
        pid = await otp.start(Worker, "w", hp.self_pid())
        await expect_msg(lambda m: m[0] == "started")
        await otp.stop(pid, "bye")
        got = await expect_msg(lambda m: m[0] == "terminated")
        info = await hp.get_process_info(pid)
        return got, info

    assert run(body) == (("terminated", "w", "bye"), None)


# ---------------------------------------------------------------------- supervisors


class Worker(otp.GenServer):
    """Reports ("started", tag, pid) and ("terminated", tag, reason) to ``report``."""

    async def init(self, *args: Any) -> None:
        self.tag, self.report = args
        await hp.send(self.report, ("started", self.tag, hp.self_pid()))

    async def handle_call(self, request: Any, caller: otp.Caller) -> Any:
        if request == "crash":
            raise RuntimeError(f"{self.tag} crashed")
        return (self.tag, request)

    async def terminate(self, reason: Any) -> None:
        await hp.send(self.report, ("terminated", self.tag, reason))


async def started(tag: str) -> hp.Pid:
    msg = await expect_msg(lambda m: type(m) is tuple and m[:2] == ("started", tag))
    return msg[2]  # type: ignore[no-any-return]


async def crash(pid: hp.Pid) -> None:
    await hp.kill(pid, "crash in test")


def specs(report: hp.Pid, *tags: str, **kw: Any) -> list[otp.ChildSpec]:
    return [otp.ChildSpec(t, Worker, (t, report), **kw) for t in tags]


async def start_three(strategy: str, **kw: Any) -> tuple[hp.Pid, dict[str, hp.Pid]]:
    me = hp.self_pid()
    sup = await otp.start_supervisor(specs(me, "a", "b", "c"), strategy, **kw)  # type: ignore[arg-type]
    return sup, {t: await started(t) for t in "abc"}


@pytest.mark.parametrize(
    ("strategy", "restarted"),
    [("one_for_one", "b"), ("one_for_all", "abc"), ("rest_for_one", "bc")],
)
def test_strategy_restarts_the_right_children(strategy: str, restarted: str) -> None:
    async def body(_: Any) -> Any:
        sup, pids = await start_three(strategy)
        await crash(pids["b"])
        new = {t: await started(t) for t in restarted}
        rows = await otp.which_children(sup)
        now = {r.id: r.pid for r in rows}
        same = {t for t in "abc" if now[t] == pids[t]}
        changed = {t for t in "abc" if now[t] == new.get(t) and now[t] != pids[t]}
        await otp.stop(sup)
        return "".join(sorted(same)), "".join(sorted(changed)), [r.id for r in rows]

    same, changed, order = run(body)
    assert changed == restarted
    assert same == "".join(t for t in "abc" if t not in restarted)
    assert order == ["a", "b", "c"]


async def quits() -> None:
    return None


async def crashes() -> None:
    raise ValueError("function child crashed")


async def reports_then_waits(report: hp.Pid, tag: str) -> None:
    await hp.send(report, ("started", tag, hp.self_pid()))
    await hp.expect(type(None))


@pytest.mark.parametrize(
    ("restart", "normal_restarted", "crash_restarted"),
    [("permanent", True, True), ("transient", False, True), ("temporary", False, False)],
)
def test_restart_type_decides_which_ends_restart(
    restart: str, normal_restarted: bool, crash_restarted: bool
) -> None:
    async def body(_: Any) -> Any:
        me = hp.self_pid()
        out = []
        for how in ("normal", "crash"):
            spec = otp.ChildSpec("w", Worker, ("w", me), restart=restart)  # type: ignore[arg-type]
            sup = await otp.start_supervisor([spec])
            pid = await started("w")
            ref = await hp.monitor(pid)
            if how == "normal":
                await otp.stop(pid)
            else:
                await crash(pid)
            # On one node a death notifies every monitor at once: once ours is here,
            # the supervisor's is queued before the request below.
            await expect_msg(lambda m, ref=ref: getattr(m, "ref", None) == ref)  # type: ignore[misc]
            rows = await otp.which_children(sup)
            restarted = bool(rows) and rows[0].pid not in (None, pid)
            if restarted:
                await started("w")
            out.append((restarted, len(rows)))
            await otp.stop(sup)
        return out

    (normal, _), (crashed, n_rows_crash) = run(body)
    assert normal == normal_restarted and crashed == crash_restarted
    assert (n_rows_crash == 0) == (restart == "temporary")


async def reports_then_returns(report: hp.Pid, tag: str) -> None:
    await hp.send(report, ("started", tag, hp.self_pid()))


class QuitsAfterInit(Worker):
    """A Worker that stops normally right after it started (it had nothing to do)."""

    async def init(self, *args: Any) -> None:
        await super().init(*args)
        await otp.cast(hp.self_pid(), "quit")

    async def handle_cast(self, msg: Any) -> None:
        await hp.exit(hp.self_pid(), "normal")


@pytest.mark.parametrize("kind", ["server", "function"])
def test_a_remote_transient_child_that_ends_normally_at_once_is_not_restarted(kind: str) -> None:
    """The supervisor monitors a child from its start, so a child on another node that
    ends right after it started is reported with its reason. (Monitored only once
    started, such a child was reported as ``DiedUnknownId``, restarted as if it had
    crashed, and the supervisor escalated.)"""

    async def body(others: list[hp.NodeId]) -> Any:
        me, (b,) = hp.self_pid(), others
        if kind == "server":
            spec = otp.ChildSpec("w", QuitsAfterInit, ("w", me), restart="transient", node=b)
        else:
            spec = otp.ChildSpec("w", reports_then_returns, (me, "w"), restart="transient", node=b)
        sup = await otp.start_supervisor([spec], max_restarts=3, max_seconds=3600, nodes=[b])
        pid = await started("w")
        ref = await hp.monitor(pid)
        # The child's node tells the supervisor (its monitor is the older) before us,
        # on the one control connection: its notification is queued before the
        # request below.
        await expect_msg(lambda m: getattr(m, "ref", None) == ref)
        rows = await otp.which_children(sup)
        again = await hp.receive(hp.match_if(lambda m: m[:2] == ("started", "w")), timeout=0)
        await otp.stop(sup)
        return [(row.id, row.pid) for row in rows], again

    assert run(body, nodes=2) == ([("w", None)], None)


def test_restart_intensity_exceeded_ends_the_supervisor_naming_the_child() -> None:
    async def body(_: Any) -> Any:
        sup, pids = await start_three("one_for_one", max_restarts=2, max_seconds=3600)
        ref = await hp.monitor(sup)
        pid = pids["b"]
        for _ in range(2):
            await crash(pid)
            pid = await started("b")
        others = [await hp.monitor(pids[t]) for t in "ac"]
        await crash(pid)
        down = await expect_msg(lambda m: getattr(m, "ref", None) == ref)
        ends = [await expect_msg(lambda m, r=r: getattr(m, "ref", None) == r) for r in others]  # type: ignore[misc]
        return down.reason, [e.reason for e in ends]

    reason, children = run(body)
    assert isinstance(reason, hp.DiedException)
    assert "SupervisorEscalation" in reason.reason and "child 'b'" in reason.reason
    assert all(not r.normal for r in children)


def test_children_start_in_order_and_stop_in_reverse_order() -> None:
    async def body(_: Any) -> Any:
        sup, _pids = await start_three("one_for_one")
        await otp.stop(sup)
        got = []
        while (m := await hp.receive(hp.match_any(), timeout=0)) is not None:
            got.append(m[:2])
        return got

    assert run(body) == [("terminated", t) for t in "cba"]


def test_child_management_calls() -> None:
    async def body(_: Any) -> Any:
        me = hp.self_pid()
        sup = await otp.start_supervisor(specs(me, "a"))
        await started("a")
        pid_b = await otp.start_child(sup, otp.ChildSpec("b", Worker, ("b", me)))
        await started("b")
        errors = []
        try:
            await otp.start_child(sup, otp.ChildSpec("b", Worker, ("b", me)))
        except otp.SupervisorError as exc:
            errors.append(str(exc))
        await otp.terminate_child(sup, "b")
        stopped = await otp.which_children(sup)
        try:
            await otp.restart_child(sup, "a")
        except otp.SupervisorError as exc:
            errors.append(str(exc))
        new_b = await otp.restart_child(sup, "b")
        await started("b")
        await otp.terminate_child(sup, "b")
        await otp.delete_child(sup, "b")
        final = [r.id for r in await otp.which_children(sup)]
        await otp.stop(sup)
        return pid_b != new_b, [(r.id, r.pid is None) for r in stopped], final, errors

    changed, stopped, final, errors = run(body)
    assert changed and stopped == [("a", False), ("b", True)] and final == ["a"]
    assert "exists already" in errors[0] and "is running" in errors[1]


def test_nested_supervisor_escalates_to_its_parent_which_restarts_the_subtree() -> None:
    async def body(_: Any) -> Any:
        me = hp.self_pid()
        inner = otp.supervisor_spec("inner", specs(me, "x"), max_restarts=0, max_seconds=3600)
        top = await otp.start_supervisor([*specs(me, "a"), inner])
        await started("a")
        x = await started("x")
        inner_pid = (await otp.which_children(top))[1].pid
        await crash(x)  # inner's intensity is 0: it escalates
        x2 = await started("x")
        rows = await otp.which_children(top)
        await otp.stop(top)
        return x2 != x, rows[1].pid != inner_pid, rows[1].supervisor

    assert run(body) == (True, True, True)


def test_a_dead_supervisor_takes_its_children_down() -> None:
    async def body(_: Any) -> Any:
        sup, pids = await start_three("one_for_one")
        refs = [await hp.monitor(pids[t]) for t in "abc"]
        await hp.kill(sup, "supervisor killed")
        ends = [await expect_msg(lambda m, r=r: getattr(m, "ref", None) == r) for r in refs]  # type: ignore[misc]
        return [type(e.reason).__name__ for e in ends]

    assert run(body) == ["DiedException"] * 3


async def stubborn(report: hp.Pid, tag: str) -> None:
    await hp.send(report, ("started", tag, hp.self_pid()))
    while True:
        try:
            await hp.expect(type(None))
        except hp.ProcessExitException:
            await hp.send(report, ("ignored exit", tag, None))


@pytest.mark.parametrize("shutdown", [0.05, "brutal_kill"])
def test_shutdown_kills_a_child_that_ignores_the_exit_signal(shutdown: Any) -> None:
    async def body(_: Any) -> Any:
        me = hp.self_pid()
        spec = otp.ChildSpec("s", stubborn, (me, "s"), shutdown=shutdown)
        sup = await otp.start_supervisor([spec])
        pid = await started("s")
        ref = await hp.monitor(pid)
        await otp.terminate_child(sup, "s")
        end = await expect_msg(lambda m: getattr(m, "ref", None) == ref)
        ignored = await hp.receive(hp.match_if(lambda m: m[0] == "ignored exit"), timeout=0)
        await otp.stop(sup)
        return end.reason, ignored is not None

    reason, ignored = run(body)
    assert isinstance(reason, hp.DiedException) and "killed by its supervisor" in reason.reason
    assert ignored == (shutdown != "brutal_kill")


def test_placement_list_and_callable_choose_live_nodes() -> None:
    async def body(others: list[hp.NodeId]) -> Any:
        me = hp.self_pid()
        b, c = others
        children = [
            otp.ChildSpec("listed", reports_then_waits, (me, "listed"), node=[c, b]),
            otp.ChildSpec("chosen", reports_then_waits, (me, "chosen"), node=lambda live: live[-1]),
            otp.ChildSpec("any", reports_then_waits, (me, "any"), node="any"),
        ]
        sup = await otp.start_supervisor(children, nodes=[b, c])
        got = {t: (await started(t))[0] for t in ("listed", "chosen", "any")}
        await otp.stop(sup)
        return got == {"listed": c, "chosen": c, "any": b}

    assert run(body, nodes=3)


def test_bad_child_spec_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="restart must be one of"):
        otp.ChildSpec("x", Worker, restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shutdown must be"):
        otp.ChildSpec("x", Worker, shutdown=-1)


# ---------------------------------------------------------------------- groups


async def member(report: hp.Pid, group: str) -> None:
    await otp.join(group)
    await hp.send(report, ("joined", group, hp.self_pid()))
    await hp.expect(type(None))


def test_group_members_and_monitor_events_across_nodes() -> None:
    async def body(others: list[hp.NodeId]) -> Any:
        me = hp.self_pid()
        (b,) = others
        await otp.start_pg([b])
        assert await otp.monitor_group("g") == []
        remote = await hp.spawn(b, member, me, "g")
        local = hp.spawn_local(member, me, "g")
        joined: set[hp.Pid] = set()
        while joined != {remote, local}:
            ev = await expect_msg(lambda m: isinstance(m, otp.GroupEvent))
            joined |= set(ev.joined)
        both = set(await otp.members("g"))
        mine = await otp.local_members("g")
        await hp.kill(remote, "x")
        left = await expect_msg(lambda m: isinstance(m, otp.GroupEvent))
        after = await otp.members("g")
        await otp.leave("g", local)
        left2 = await expect_msg(lambda m: isinstance(m, otp.GroupEvent))
        return (
            both == {remote, local},
            mine == [local],
            left.left == (remote,),
            after == [local],
            left2.left == (local,),
            await otp.members("g"),
        )

    assert run(body, nodes=2) == (True, True, True, True, True, [])


def test_groups_without_start_pg_raise_a_clear_error() -> None:
    async def body(_: Any) -> Any:
        with pytest.raises(otp.PgNotStarted, match="start_pg"):
            await otp.members("g")

    run(body)


# ---------------------------------------------------------------------- map


def square(x: Any) -> Any:
    return x * x


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


async def joins_then_waits(group: str, report: hp.Pid) -> None:
    await otp.join(group)
    await hp.send(report, ("joined", hp.self_pid()))
    await hp.expect(type(None))


def test_calls_casts_and_groups_work_again_after_a_connection_break() -> None:
    """A broken connection between two live nodes fails what was under way (the group
    view drops the other node's members) but not what follows: OTP requests and
    replies reopen the pair connections the loss broke (plain sends stay dropped
    until ``hp.reconnect``), and ``start_pg`` connects the scopes again. Calls used
    to time out for good, and the scopes stayed apart."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        server = await otp.start(Counter, 0, node=b.node_id)
        before = await otp.call(server, 1)
        await otp.start_pg([b.node_id])
        assert await otp.monitor_group("g") == []
        member = await hp.spawn(b.node_id, joins_then_waits, "g", me)
        await expect_msg(lambda m: type(m) is tuple and m[0] == "joined")
        seen = [await expect_msg(lambda m: type(m) is otp.GroupEvent)]

        await transport.break_connection(a.node_id.address, b.node_id.address)
        seen.append(await expect_msg(lambda m: type(m) is otp.GroupEvent))  # the loss
        after = await otp.call(server, 2, timeout=WAIT)
        await otp.cast(server, 10)
        after_cast = await otp.call(server, "get", timeout=WAIT)
        await otp.start_pg([b.node_id])
        seen.append(await expect_msg(lambda m: type(m) is otp.GroupEvent))
        await otp.stop(server, timeout=WAIT)
        return (before, after, after_cast), [(e.joined, e.left) for e in seen], member

    values, seen, member = run_two_nodes(body, TIMEOUT)
    assert values == (1, 3, 13)
    assert seen == [((member,), ()), ((), (member,)), ((member,), ())]


def test_map_keeps_input_order_across_nodes_and_numpy_round_trips() -> None:
    async def body(others: list[hp.NodeId]) -> Any:
        nodes = [hp.self_node(), *others]
        ints = await otp.map(square, range(500), nodes=nodes, per_node=2)
        arrays = await otp.map(square, [np.arange(4.0) + i for i in range(5)], nodes=others)
        seen = sorted([i async for i, _ in otp.imap(square, range(50), nodes=nodes)])
        return ints, arrays, seen, await nothing_left()

    ints, arrays, seen, empty = run(body, nodes=3)
    assert ints == [x * x for x in range(500)]
    assert all(np.array_equal(a, (np.arange(4.0) + i) ** 2) for i, a in enumerate(arrays))
    assert seen == list(range(50)) and empty


def test_map_error_fail_fast_or_collect_with_input_and_traceback() -> None:
    async def body(_: Any) -> Any:
        try:
            await otp.map(fails_on_three, range(6))
        except otp.TaskError as exc:
            fast = (exc.index, exc.input, exc.reason, "fails_on_three" in exc.remote_traceback)
        collected = await otp.map(fails_on_three, range(6), errors="collect")
        return fast, [type(v).__name__ for v in collected], await nothing_left()

    fast, collected, empty = run(body)
    assert fast == (3, 3, "ValueError: three", True)
    assert collected == ["int", "int", "int", "TaskError", "int", "int"] and empty


class Blocking(otp.GenServer):
    """Its handle_call waits for a message that never comes (an exit interrupts it)."""

    async def init(self, *args: Any) -> None:
        (self.report,) = args

    async def handle_call(self, request: Any, caller: otp.Caller) -> Any:
        await hp.send(self.report, "in handle_call")
        await hp.expect(type(None))

    async def terminate(self, reason: Any) -> None:
        await hp.send(self.report, ("terminated", reason))


def test_exit_signal_during_handle_call_runs_terminate_and_reaches_the_caller_as_down() -> None:
    async def caller(server: hp.Pid, report: hp.Pid) -> None:
        try:
            await otp.call(server, "x", timeout=None)
        except otp.ServerDown as exc:
            await hp.send(report, ("down", exc.remote_traceback))

    async def body(_: Any) -> Any:
        me = hp.self_pid()
        server = await otp.start(Blocking, me)
        hp.spawn_local(caller, server, me)
        await expect_msg(lambda m: m == "in handle_call")
        await hp.exit(server, "shutdown")
        terminated = await expect_msg(lambda m: m[0] == "terminated")
        down = await expect_msg(lambda m: m[0] == "down")
        return terminated, down

    assert run(body) == (("terminated", "shutdown"), ("down", None))


def test_every_waiting_caller_gets_server_down_and_a_late_notice_is_dropped() -> None:
    async def waiter(server: hp.Pid, report: hp.Pid) -> None:
        try:
            await otp.call(server, "hold", timeout=None)
        except otp.ServerDown as exc:
            await hp.send(report, ("down", type(exc.reason).__name__))

    async def body(_: Any) -> Any:
        me = hp.self_pid()
        server = await otp.start(Counter)
        with pytest.raises(otp.CallTimeout):
            await otp.call(server, "hold", timeout=0.01)  # this call's notice comes late
        for _ in range(3):
            hp.spawn_local(waiter, server, me)
        await otp.call(server, "get")  # the three holds are queued before this
        ref = await hp.monitor(server)
        await hp.kill(server, "x")
        downs = [
            await expect_msg(lambda m: type(m) is tuple and m[0] == "down") for _ in range(3)
        ]
        await expect_msg(lambda m: getattr(m, "ref", None) == ref)
        other = await otp.start(Counter, 5)
        value = await otp.call(other, "get")  # drops the late notice from its channel
        return downs, value, await nothing_left()

    downs, value, empty = run(body)
    assert downs == [("down", "DiedException")] * 3 and value == 5 and empty


class Reverser(otp.GenServer):
    """Holds calls until ``n`` are held, then answers them last first (ten times the request)."""

    async def init(self, *args: Any) -> None:
        self.n = args[0]
        self.held: list[tuple[otp.Caller, int]] = []

    async def handle_call(self, request: Any, caller: otp.Caller) -> Any:
        self.held.append((caller, request))
        if len(self.held) == self.n:
            for held, value in reversed(self.held):
                await otp.reply(held, value * 10)
            self.held.clear()
        return otp.NOREPLY


def test_calls_from_several_tasks_of_one_process_at_once_each_get_their_own_reply() -> None:
    async def body(_: Any) -> Any:
        server = await otp.start(Reverser, 4)
        first = await asyncio.gather(*(otp.call(server, i, timeout=WAIT) for i in range(4)))
        # Now the process's own task has made no call, its tasks did; next the
        # process calls too, and the tasks it then starts begin with its reply slot.
        other = await otp.start(Counter, 7)
        own = await otp.call(other, "get")
        second = await asyncio.gather(
            *(otp.call(server, i, timeout=WAIT) for i in range(10, 13)),
            otp.call(server, 13, timeout=WAIT),
        )
        return first, own, second, await nothing_left()

    first, own, second, empty = run(body)
    assert first == [0, 10, 20, 30] and own == 7 and second == [100, 110, 120, 130]
    assert empty


def test_a_waiting_call_outlives_the_end_of_the_call_watch() -> None:
    from hpcproc.otp import _call_watch

    async def body(_: Any) -> Any:
        held = await otp.start(Counter)
        timed = await otp.start(Counter)
        forever = asyncio.ensure_future(otp.call(held, "hold", timeout=None))
        short = asyncio.ensure_future(otp.call(timed, "hold", timeout=0.2))
        assert await otp.call(held, "get") == 0  # both holds are with their servers now
        assert await otp.call(timed, "get") == 0
        watch = hp.whereis(_call_watch.NAME)
        assert watch is not None
        ref = await hp.monitor(watch)
        await hp.kill(watch, "killed in test")
        await expect_msg(lambda m: getattr(m, "ref", None) == ref)
        with pytest.raises(otp.CallTimeout):
            await asyncio.wait_for(short, WAIT)  # timed out by the next watch
        await hp.kill(held, "killed in test")
        with pytest.raises(otp.ServerDown) as down:
            await asyncio.wait_for(forever, WAIT)  # the next watch's monitor reports it
        assert hp.whereis(_call_watch.NAME) not in (None, watch)
        return down.value.reason, await nothing_left()

    reason, empty = run(body)
    assert isinstance(reason, hp.DiedException) and "killed in test" in reason.reason
    assert empty


def test_a_call_that_outlived_the_call_watch_leaves_nothing_with_the_next() -> None:
    """A call told that the call watch ended registers with the next watch; once it
    returned, it is gone from there too (it stayed until its deadline, or for good
    without a timeout)."""
    from hpcproc.otp import _call_watch

    async def body(_: Any) -> Any:
        held = await otp.start(Counter)
        call = asyncio.ensure_future(otp.call(held, "hold", timeout=None))
        assert await otp.call(held, "get") == 0  # the hold is with the server now
        watch = hp.whereis(_call_watch.NAME)
        assert watch is not None
        ref = await hp.monitor(watch)
        await hp.kill(watch, "killed in test")
        # The watch told the call before it ended, so the call reads that notice (and
        # registers with a new watch) before the reply the cast below brings.
        await expect_msg(lambda m: getattr(m, "ref", None) == ref)
        await otp.cast(held, "release")
        reply = await asyncio.wait_for(call, WAIT)
        state = _call_watch.BY_NODE[hp.self_node()]
        left = dict(state.servers.get(held, {}))
        await otp.stop(held)
        return reply, left

    assert run(body) == ("late", {})


def test_the_reply_channels_of_finished_tasks_are_closed() -> None:
    """Every task of a process that calls a server gets a reply channel of its own;
    it is closed once the task is gone, so that a long-lived process whose short
    tasks make calls keeps a few channels, not one per task (200 here)."""
    from hpcproc._process import current

    async def body(_: Any) -> Any:
        server = await otp.start(Counter, 0)
        proc = current()
        before = len(proc._ports or ())
        for _ in range(100):
            await asyncio.gather(otp.call(server, 1), otp.call(server, 1))
        gc.collect()  # a finished task may sit in a reference cycle
        after = len(proc._ports or ())
        total = await otp.call(server, "get")
        await otp.stop(server)
        return total, before, after

    total, before, after = run(body)
    assert total == 200 and after - before < 10, (before, after)


def test_a_short_call_timeout_is_kept_while_a_longer_call_waits() -> None:
    async def body(_: Any) -> Any:
        held = await otp.start(Counter)
        timed = await otp.start(Counter)
        # The call watch now sleeps until this call's deadline, WAIT from now...
        longer = asyncio.ensure_future(otp.call(held, "hold", timeout=WAIT))
        assert await otp.call(held, "get") == 0
        # ...and must wake up earlier for this one.
        with pytest.raises(otp.CallTimeout):
            await asyncio.wait_for(otp.call(timed, "hold", timeout=0.05), WAIT / 2)
        await otp.cast(held, "release")
        return await asyncio.wait_for(longer, WAIT), await nothing_left()

    assert run(body) == ("late", True)


class Delegating(otp.GenServer):
    """Passes each caller, in a message, to a helper process that answers for it."""

    async def init(self, *args: Any) -> None:
        self.helper = hp.spawn_local(_answer_for_server)

    async def handle_call(self, request: Any, caller: otp.Caller) -> Any:
        await hp.send(self.helper, (caller, request))
        return otp.NOREPLY


async def _answer_for_server() -> None:
    while True:
        caller, request = await hp.expect(tuple)
        assert isinstance(caller, otp.Caller) and caller.pid == caller.port.owner
        await otp.reply(caller, ("from helper", request))


def test_a_caller_passed_in_a_message_lets_another_process_reply() -> None:
    async def body(_: Any) -> Any:
        server = await otp.start(Delegating)
        return [await otp.call(server, i, timeout=WAIT) for i in range(3)], await nothing_left()

    assert run(body) == ([("from helper", i) for i in range(3)], True)


def test_a_server_answers_more_callers_than_it_keeps_reply_ports_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hpcproc.otp import gen_server

    monkeypatch.setattr(gen_server, "_PORTS_KEPT", 2)

    async def one_call(server: hp.Pid, report: hp.Pid, i: int) -> None:
        await hp.send(report, (i, await otp.call(server, i, timeout=WAIT)))

    async def body(_: Any) -> Any:
        me = hp.self_pid()
        server = await otp.start(Counter)
        for i in range(1, 8):
            hp.spawn_local(one_call, server, me, i)
        got = sorted([await expect_msg(lambda m: type(m) is tuple) for _ in range(7)])
        return got, await otp.call(server, "get"), await nothing_left()

    got, total, empty = run(body)
    assert [i for i, _ in got] == list(range(1, 8)) and total == sum(range(1, 8)) and empty


async def never_returns(x: int) -> int:
    await hp.expect(type(None))
    return x


def test_map_timeout_raises_and_leaves_nothing_in_the_mailbox() -> None:
    async def body(_: Any) -> Any:
        with pytest.raises(TimeoutError, match="unfinished"):
            await otp.map(never_returns, range(4), per_node=2, timeout=0.05)
        return await nothing_left()

    assert run(body)
