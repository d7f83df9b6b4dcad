"""Process-layer semantics within one node (one process).

Ported from distributed-process's test suite (``TestCH``): each test is named after the
promise it checks; the cross-node versions live in ``test_process_cluster.py``. Every
test runs on each transport of :data:`LOCAL`: the in-memory transport, and
``teststreams``, the test transport written to the abstract methods of ``base.py`` only
(``tests/plugin_transport``, found through its entry point).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import sys
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

import hpcproc as hp
from hpcproc.transports import Transport, create

TIMEOUT = 20.0
WAIT = 10.0  # bound on every single wait inside a scenario

#: The transports every test runs on; TRANSPORT is the current one (set per test).
LOCAL = ["inmemory", "teststreams"]
TRANSPORT = "inmemory"


@pytest.fixture(autouse=True, params=LOCAL)
def local_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on each transport of :data:`LOCAL`; skips, with the reason, one
    that is not installed."""
    name = str(request.param)
    if name == "teststreams" and importlib.util.find_spec("hpcproc_teststreams") is None:
        pytest.skip(
            "teststreams: the test transport's distribution is not installed"
            " (make venv installs tests/plugin_transport)"
        )
    monkeypatch.setattr(sys.modules[__name__], "TRANSPORT", name)
    return name


def new_transport() -> Transport:
    """A transport of the current test's kind (see :data:`LOCAL`)."""
    return create(TRANSPORT)


def run(body: Callable[..., Coroutine[Any, Any, Any]], *args: Any, **node_opts: Any) -> Any:
    """Run ``body(*args)`` as a process on a fresh node; return its result."""

    async def main() -> Any:
        transport = new_transport()
        node = await hp.Node(transport, **node_opts).start()
        try:
            return await asyncio.wait_for(node.run(body, *args), TIMEOUT)
        finally:
            await node.close()
            await transport.close()

    return asyncio.run(main())


async def expect_notification(ref: hp.MonitorRef) -> Any:
    msg = await hp.receive(hp.match_if(lambda m: getattr(m, "ref", None) == ref), timeout=WAIT)
    assert msg is not None, "no monitor notification arrived"
    return msg


# ---------------------------------------------------------------------- helpers (processes)


async def ends_normally() -> None:
    return None


async def crashes() -> None:
    raise ValueError("boom")


class _Never:
    """No message is ever of this type."""


async def waits_forever() -> None:
    await hp.expect(_Never)


async def echo() -> None:
    while True:
        sender, msg = await hp.expect(tuple)
        await hp.send(sender, msg)


@dataclass(frozen=True)
class Add:
    sender: hp.Pid
    a: float
    b: float


@dataclass(frozen=True)
class Divide:
    sender: hp.Pid
    a: float
    b: float


@dataclass(frozen=True)
class DivByZero:
    pass


async def math_server() -> None:
    while True:

        async def add(m: Add) -> None:
            await hp.send(m.sender, m.a + m.b)

        async def divide(m: Divide) -> None:
            await hp.send(m.sender, m.a / m.b)

        async def div_zero(m: Divide) -> None:
            await hp.send(m.sender, DivByZero())

        await hp.receive(
            hp.match_if(lambda m: isinstance(m, Divide) and m.b == 0, div_zero),
            hp.match(Divide, divide),
            hp.match(Add, add),
        )


# ---------------------------------------------------------------------- messages


def test_math_dispatches_on_match_and_match_if() -> None:
    async def body() -> list[Any]:
        server = hp.spawn_local(math_server)
        me = hp.self_pid()
        out = []
        for msg in (Add(me, 10, 22), Divide(me, 6, 3), Divide(me, 1, 0)):
            await hp.send(server, msg)
            out.append(await hp.expect(timeout=WAIT))
        return out

    assert run(body) == [32, 2.0, DivByZero()]


def test_receive_keeps_unmatched_messages_in_order() -> None:
    async def body() -> tuple[Any, list[Any]]:
        me = hp.self_pid()
        for m in (1, "a", 2, "b", 3):
            await hp.send(me, m)
        got = await hp.receive(hp.match(str), timeout=0)
        rest = [await hp.expect(timeout=0) for _ in range(4)]
        return got, rest

    assert run(body) == ("a", [1, 2, "b", 3])


def test_matchers_are_tried_in_order_for_each_message() -> None:
    async def body() -> Any:
        me = hp.self_pid()
        await hp.send(me, 5)
        return await hp.receive(
            hp.match(int, lambda m: ("first", m)), hp.match_any(lambda m: ("second", m)), timeout=0
        )

    assert run(body) == ("first", 5)


def test_match_any_takes_oldest_message() -> None:
    async def body() -> list[Any]:
        me = hp.self_pid()
        for m in ("x", 1, b"y"):
            await hp.send(me, m)
        return [await hp.receive(hp.match_any(), timeout=0) for _ in range(3)]

    assert run(body) == ["x", 1, b"y"]


def test_receive_timeout_returns_none_when_nothing_matches() -> None:
    async def body() -> tuple[Any, Any]:
        await hp.send(hp.self_pid(), "unwanted")
        got = await hp.receive(hp.match(int), timeout=0.05)
        return got, await hp.expect(timeout=0)

    assert run(body) == (None, "unwanted")


def test_timeout0_finds_wanted_message_behind_10000_unwanted() -> None:
    async def body() -> tuple[Any, int]:
        me = hp.self_pid()
        for i in range(10000):
            await hp.send(me, i)
        await hp.send(me, "wanted")
        got = await hp.expect(str, timeout=0)
        info = await hp.get_process_info(me)
        assert info is not None
        return got, info.message_queue_length

    assert run(body) == ("wanted", 10000)


def test_timeout0_polls_without_waiting_for_later_messages() -> None:
    async def body() -> Any:
        return await hp.expect(timeout=0)

    assert run(body) is None


def test_receive_waits_for_a_later_matching_message() -> None:
    async def later(target: hp.Pid) -> None:
        await hp.send(target, "noise")
        await asyncio.sleep(0)
        await hp.send(target, 42)

    async def body() -> tuple[Any, Any]:
        hp.spawn_local(later, hp.self_pid())
        got = await hp.expect(int, timeout=WAIT)
        return got, await hp.expect(timeout=0)

    assert run(body) == (42, "noise")


def test_a_waiting_selective_receive_rescans_after_another_task_took_a_message() -> None:
    """A receive that found no match among the waiting messages waits for new ones
    only; if another task of the process takes a waiting message meanwhile, the
    positions moved, and the match that then arrives is still found."""

    async def body() -> tuple[Any, Any, Any]:
        me = hp.self_pid()
        for m in (1, 2):
            await hp.send(me, m)
        waiting = asyncio.create_task(hp.receive(hp.match_if(lambda m: m == "x"), timeout=WAIT))
        await asyncio.sleep(0)  # it looked at 1 and 2 and waits
        took = await hp.expect(int, timeout=0)
        await hp.send(me, "x")
        return took, await waiting, await hp.expect(timeout=0)

    assert run(body) == (1, "x", 2)


def test_async_handler_result_is_returned() -> None:
    async def handler(m: int) -> int:
        await asyncio.sleep(0)
        return m * 2

    async def body() -> Any:
        await hp.send(hp.self_pid(), 21)
        return await hp.receive(hp.match(int, handler), timeout=0)

    assert run(body) == 42


def test_send_to_terminated_process_is_silently_dropped() -> None:
    async def body() -> Any:
        pid = hp.spawn_local(ends_normally)
        ref = await hp.monitor(pid)
        await expect_notification(ref)
        await hp.send(pid, "into the void")
        return await hp.get_process_info(pid)

    assert run(body) is None


def test_local_send_copies_mutable_messages() -> None:
    async def body() -> tuple[list[int], bool]:
        original = [1, 2, 3]
        await hp.send(hp.self_pid(), original)
        original.append(4)
        got = await hp.expect(list, timeout=0)
        return got, got is original

    assert run(body) == ([1, 2, 3], False)


def test_unsafe_send_passes_the_object_itself() -> None:
    async def body() -> bool:
        original = [1, 2, 3]
        await hp.unsafe_send(hp.self_pid(), original)
        got = await hp.expect(list, timeout=0)
        return got is original

    assert run(body) is True


def test_immutable_messages_are_not_copied() -> None:
    async def body() -> bool:
        msg = ("text", 1, (b"bytes", 2.0))
        await hp.send(hp.self_pid(), msg)
        return (await hp.expect(tuple, timeout=0)) is msg

    assert run(body) is True


# ---------------------------------------------------------------------- channels


def test_typed_channel_carries_reply_locally() -> None:
    async def replier() -> None:
        port = await hp.expect(hp.SendPort)
        await hp.send_chan(port, "pong")

    async def body() -> Any:
        sp, rp = hp.new_chan()
        pid = hp.spawn_local(replier)
        await hp.send(pid, sp)
        return await hp.receive_chan(rp, timeout=WAIT)

    assert run(body) == "pong"


def test_receive_chan_timeout_returns_none() -> None:
    async def body() -> tuple[Any, Any]:
        _, rp = hp.new_chan()
        await hp.send(hp.self_pid(), "mailbox message")
        return await hp.receive_chan(rp, timeout=0.05), await hp.receive_chan(rp, timeout=0)

    assert run(body) == (None, None)


def test_chan_lifecycle_messages_stay_on_their_channel_and_die_with_owner() -> None:
    async def owner(reply: hp.Pid) -> None:
        sp1, rp1 = hp.new_chan()
        sp2, rp2 = hp.new_chan()
        await hp.send(reply, (sp1, sp2))
        first = await hp.receive_chan(rp2, timeout=WAIT)
        second = await hp.receive_chan(rp1, timeout=WAIT)
        await hp.send(reply, ("got", first, second, await hp.expect(timeout=0)))

    async def body() -> Any:
        me = hp.self_pid()
        pid = hp.spawn_local(owner, me)
        ref = await hp.monitor(pid)
        sp1, sp2 = await hp.expect(tuple, timeout=WAIT)
        await hp.send_chan(sp1, "on one")
        await hp.send_chan(sp2, "on two")
        got = await hp.expect(tuple, timeout=WAIT)
        note = await expect_notification(ref)
        # Sending on a port whose owner ended is dropped silently.
        await hp.send_chan(sp1, "late")
        return got, note.reason

    got, reason = run(body)
    assert got == ("got", "on two", "on one", None)
    assert reason == hp.DiedNormal()


def test_match_chan_mixes_channels_and_mailbox() -> None:
    async def body() -> list[Any]:
        sp, rp = hp.new_chan()
        await hp.send_chan(sp, "chan")
        await hp.send(hp.self_pid(), 7)
        out = []
        for _ in range(2):
            out.append(
                await hp.receive(
                    hp.match(int, lambda m: ("mailbox", m)),
                    hp.match_chan(rp, lambda m: ("chan", m)),
                    timeout=0,
                )
            )
        return out

    assert run(body) == [("mailbox", 7), ("chan", "chan")]


def test_receive_on_another_process_port_raises() -> None:
    async def holder(reply: hp.Pid) -> None:
        _, rp = hp.new_chan()
        await hp.unsafe_send(reply, rp)
        await hp.expect(int, timeout=WAIT)

    async def body() -> str:
        pid = hp.spawn_local(holder, hp.self_pid())
        rp = await hp.expect(hp.ReceivePort, timeout=WAIT)
        try:
            await hp.receive_chan(rp, timeout=0)
        except ValueError as exc:
            return str(exc)
        finally:
            await hp.send(pid, 0)
        return "no error"

    assert "another process" in run(body)


# ---------------------------------------------------------------------- spawning


def test_spawn_local_runs_the_process_with_its_arguments() -> None:
    async def child(reply: hp.Pid, x: int, y: int) -> None:
        await hp.send(reply, (hp.self_pid(), x + y))

    async def body() -> bool:
        pid = hp.spawn_local(child, hp.self_pid(), 2, 3)
        got = await hp.expect(tuple, timeout=WAIT)
        return bool(got == (pid, 5))

    assert run(body)


def test_spawn_terminate_1000_local_spawns_all_end() -> None:
    async def body() -> tuple[int, int]:
        refs = []
        for _ in range(1000):
            pid = hp.spawn_local(ends_normally)
            refs.append(await hp.monitor(pid))
        normal = 0
        for ref in refs:
            note = await expect_notification(ref)
            normal += note.reason == hp.DiedNormal()
        stats = await hp.get_node_stats(hp.self_node())
        return normal, stats.processes

    normal, processes = run(body)
    assert normal == 1000
    assert processes == 2  # this process and the logger


def test_an_ended_process_is_freed_without_the_cycle_collector() -> None:
    # A reference cycle through an ended process (its body, its context) leaves it to
    # the cyclic garbage collector, whose passes over thousands of ended processes
    # halved the spawn rate: with the collector off, dropping the last reference must
    # free the process (and what it holds) at once.
    freed: list[bool] = []

    async def main() -> None:
        node = await hp.Node(new_transport()).start()
        try:

            async def body() -> None:
                pid = hp.spawn_local(ends_normally)
                proc = node.local_process(pid.lid)
                assert proc is not None
                ref = await hp.monitor(pid)
                await expect_notification(ref)
                gone = weakref.ref(proc)
                del proc
                freed.append(gone() is None)

            await asyncio.wait_for(node.run(body), TIMEOUT)
        finally:
            await node.close()

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
    assert freed == [True]


def test_a_task_that_outlives_its_process_is_told_which_process_ended() -> None:
    async def body() -> str:
        started = asyncio.Event()
        go = asyncio.Event()
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def late() -> None:
            started.set()
            await go.wait()
            try:
                hp.self_pid()
            except hp.NotInProcessError as exc:
                outcome.set_result(str(exc))
            else:
                outcome.set_result("no error")

        async def parent() -> None:
            asyncio.get_running_loop().create_task(late())
            await started.wait()

        pid = hp.spawn_local(parent)
        ref = await hp.monitor(pid)
        await expect_notification(ref)
        go.set()
        text = await asyncio.wait_for(outcome, WAIT)
        return text.replace(repr(pid), "PID")

    assert run(body) == "this task acts for process PID, which has ended"


def test_spawn_invalid_non_async_function_names_function_and_node() -> None:
    def not_async() -> int:
        return 1

    async def body() -> str:
        try:
            hp.spawn_local(not_async)  # type: ignore[arg-type]
        except hp.SpawnError as exc:
            assert str(hp.self_node()) in str(exc)
            return str(exc)
        return "no error"

    assert "not_async" in run(body)


def test_spawn_invalid_bad_arguments_names_function() -> None:
    async def body() -> str:
        try:
            await hp.spawn(hp.self_node(), ends_normally, "unexpected")
        except hp.SpawnError as exc:
            return str(exc)
        return "no error"

    msg = run(body)
    assert "ends_normally" in msg and "raised while starting" in msg


def test_call_returns_the_result_of_the_function() -> None:
    async def add(a: int, b: int) -> int:
        return a + b

    async def body() -> Any:
        return await hp.call(hp.self_node(), add, 1, 2)

    assert run(body) == 3


def test_call_reraises_the_exception_of_the_function() -> None:
    async def body() -> str:
        try:
            await hp.call(hp.self_node(), crashes)
        except ValueError as exc:
            return str(exc)
        return "no error"

    assert run(body) == "boom"


def test_node_run_returns_result_and_raises_failure() -> None:
    async def fails() -> None:
        raise KeyError("k")

    async def ok() -> int:
        return 5

    async def main() -> tuple[int, str]:
        transport = new_transport()
        async with hp.Node(transport) as node:
            value = await node.run(ok)
            with pytest.raises(KeyError) as info:
                await node.run(fails)
        await transport.close()
        return value, str(info.value)

    assert asyncio.run(main()) == (5, "'k'")


# ---------------------------------------------------------------------- outside a process


@pytest.mark.parametrize(
    "call",
    [
        lambda: hp.self_pid(),
        lambda: hp.spawn_local(ends_normally),
        lambda: hp.whereis("logger"),
        lambda: hp.say("x"),
        lambda: hp.new_chan(),
    ],
)
def test_process_only_function_outside_a_process_raises_clear_error(
    call: Callable[[], Any],
) -> None:
    with pytest.raises(hp.NotInProcessError, match="inside a process"):
        call()


def test_process_only_function_in_plain_asyncio_task_raises() -> None:
    async def main() -> None:
        with pytest.raises(hp.NotInProcessError):
            await hp.send(hp.Pid(hp.NodeId(b"x"), 1), "m")

    asyncio.run(main())


# ---------------------------------------------------------------------- termination


def test_terminate_ends_process_with_died_exception() -> None:
    async def terminates() -> None:
        hp.terminate()

    async def body() -> Any:
        pid = hp.spawn_local(terminates)
        ref = await hp.monitor(pid)
        return (await expect_notification(ref)).reason

    reason = run(body)
    assert isinstance(reason, hp.DiedException) and "terminated" in reason.reason


def test_kill_local_is_uncatchable_and_reports_reason() -> None:
    async def stubborn(reply: hp.Pid) -> None:
        await hp.send(reply, "ready")
        while True:
            try:
                await hp.expect(int)
            except Exception:
                continue

    async def body() -> Any:
        pid = hp.spawn_local(stubborn, hp.self_pid())
        ref = await hp.monitor(pid)
        assert await hp.expect(str, timeout=WAIT) == "ready"
        await hp.kill(pid, "enough")
        return (await expect_notification(ref)).reason

    reason = run(body)
    assert isinstance(reason, hp.DiedException)
    assert "enough" in reason.reason and "killed-by" in reason.reason


def test_exit_can_be_caught_by_the_target() -> None:
    async def catcher(reply: hp.Pid) -> None:
        try:
            await hp.send(reply, "ready")
            await hp.expect(int)
        except hp.ProcessExitException as exc:
            await hp.send(reply, ("caught", exc.reason, exc.sender))

    async def body() -> Any:
        pid = hp.spawn_local(catcher, hp.self_pid())
        assert await hp.expect(str, timeout=WAIT) == "ready"
        await hp.exit(pid, "please stop")
        return await hp.expect(tuple, timeout=WAIT), hp.self_pid()

    (tag, reason, sender), me = run(body)
    assert (tag, reason, sender) == ("caught", "please stop", me)


def test_uncaught_exit_ends_process_with_reason() -> None:
    async def body() -> Any:
        pid = hp.spawn_local(waits_forever)
        ref = await hp.monitor(pid)
        await hp.exit(pid, "go away")
        return (await expect_notification(ref)).reason

    reason = run(body)
    assert isinstance(reason, hp.DiedException) and "go away" in reason.reason


# ---------------------------------------------------------------------- monitors, links


def test_monitor_normal_termination_reports_died_normal() -> None:
    async def body() -> Any:
        pid, ref = await hp.spawn_monitor(hp.self_node(), ends_normally)
        note = await expect_notification(ref)
        return note.pid == pid, note.reason

    assert run(body) == (True, hp.DiedNormal())


def test_monitor_abnormal_termination_reports_exception() -> None:
    async def body() -> Any:
        _, ref = await hp.spawn_monitor(hp.self_node(), crashes)
        return (await expect_notification(ref)).reason

    reason = run(body)
    assert isinstance(reason, hp.DiedException) and "boom" in reason.reason


def test_monitor_local_dead_process_reports_unknown_id_at_once() -> None:
    async def body() -> Any:
        pid, ref = await hp.spawn_monitor(hp.self_node(), ends_normally)
        await expect_notification(ref)
        ref2 = await hp.monitor(pid)
        return (await hp.receive(hp.match_if(lambda m: m.ref == ref2), timeout=0)).reason

    assert run(body) == hp.DiedUnknownId()


def test_unmonitor_means_no_notification() -> None:
    async def body() -> Any:
        pid = hp.spawn_local(waits_forever)
        ref = await hp.monitor(pid)
        witness = await hp.monitor(pid)
        await hp.unmonitor(ref)
        await hp.kill(pid, "x")
        await expect_notification(witness)
        return await hp.receive(hp.match_if(lambda m: getattr(m, "ref", None) == ref), timeout=0)

    assert run(body) is None


def test_link_normal_termination_raises_nothing() -> None:
    async def body() -> Any:
        pid = await hp.spawn_link(hp.self_node(), ends_normally)
        ref = await hp.monitor(pid)
        await expect_notification(ref)
        return await hp.expect(timeout=0)

    assert run(body) is None


def test_link_abnormal_termination_raises_link_exception_in_linker() -> None:
    async def body() -> Any:
        try:
            pid = await hp.spawn_link(hp.self_node(), crashes)
            await hp.expect(int, timeout=WAIT)
        except hp.ProcessLinkException as exc:
            return exc.pid == pid, exc.reason
        return "no exception"

    same, reason = run(body)
    assert same and isinstance(reason, hp.DiedException)


def test_link_is_unidirectional() -> None:
    async def linker(target: hp.Pid, reply: hp.Pid) -> None:
        await hp.link(target)
        await hp.send(reply, "linked")
        raise RuntimeError("linker fails")

    async def body() -> Any:
        me = hp.self_pid()
        pid = hp.spawn_local(linker, me, me)
        ref = await hp.monitor(pid)
        assert await hp.expect(str, timeout=WAIT) == "linked"
        await expect_notification(ref)
        return await hp.expect(timeout=0)  # no ProcessLinkException raised here

    assert run(body) is None


def test_link_local_dead_process_raises_unknown_id() -> None:
    async def body() -> Any:
        pid, ref = await hp.spawn_monitor(hp.self_node(), ends_normally)
        await expect_notification(ref)
        try:
            await hp.link(pid)
        except hp.ProcessLinkException as exc:
            return exc.reason
        return "no exception"

    assert run(body) == hp.DiedUnknownId()


def test_unlink_means_no_exception() -> None:
    async def body() -> Any:
        pid = hp.spawn_local(waits_forever)
        await hp.link(pid)
        witness = await hp.monitor(pid)
        await hp.unlink(pid)
        await hp.kill(pid, "x")
        await expect_notification(witness)
        return await hp.expect(timeout=0)

    assert run(body) is None


def test_uncaught_link_exception_kills_the_linker() -> None:
    async def linker(target: hp.Pid, reply: hp.Pid) -> None:
        await hp.link(target)
        await hp.send(reply, "linked")
        await asyncio.sleep(3600)  # not an hpcproc call: the link exception ends it here

    async def body() -> Any:
        victim = hp.spawn_local(waits_forever)
        pid = hp.spawn_local(linker, victim, hp.self_pid())
        ref = await hp.monitor(pid)
        assert await hp.expect(str, timeout=WAIT) == "linked"
        await hp.kill(victim, "x")
        return (await expect_notification(ref)).reason

    reason = run(body)
    assert isinstance(reason, hp.DiedException) and "ProcessLinkException" in reason.reason


def test_monitor_channel_reports_owner_death() -> None:
    async def owner(reply: hp.Pid) -> None:
        sp, _ = hp.new_chan()
        await hp.send(reply, sp)
        await hp.expect(int)
        raise RuntimeError("owner fails")

    async def body() -> Any:
        pid = hp.spawn_local(owner, hp.self_pid())
        sp = await hp.expect(hp.SendPort, timeout=WAIT)
        ref = await hp.monitor(sp)
        await hp.send(pid, 1)
        note = await expect_notification(ref)
        return type(note), note.port == sp, note.reason

    kind, same, reason = run(body)
    assert kind is hp.PortMonitorNotification and same
    assert isinstance(reason, hp.DiedException)


# ---------------------------------------------------------------------- registry


def test_registry_register_whereis_nsend_unregister() -> None:
    async def body() -> list[Any]:
        me = hp.self_pid()
        pid = hp.spawn_local(echo)
        hp.register("echo", pid)
        out: list[Any] = [hp.whereis("echo") == pid]
        await hp.nsend("echo", (me, "via name"))
        out.append(await hp.expect(str, timeout=WAIT))
        with pytest.raises(hp.ProcessRegistrationException):
            hp.register("echo", me)
        hp.unregister("echo")
        out.append(hp.whereis("echo"))
        with pytest.raises(hp.ProcessRegistrationException):
            hp.unregister("echo")
        return out

    assert run(body) == [True, "via name", None]


def test_registry_monitoring_name_dropped_on_death() -> None:
    async def body() -> tuple[bool, Any]:
        pid = hp.spawn_local(waits_forever)
        hp.register("doomed", pid)
        before = hp.whereis("doomed") == pid
        ref = await hp.monitor(pid)
        await hp.kill(pid, "x")
        await expect_notification(ref)
        return before, hp.whereis("doomed")

    assert run(body) == (True, None)


def test_get_process_info_reports_names_queue_and_watchers() -> None:
    async def body() -> Any:
        pid = hp.spawn_local(waits_forever)
        hp.register("info-target", pid)
        ref = await hp.monitor(pid)
        await hp.send(pid, "queued")
        info = await hp.get_process_info(pid)
        await hp.kill(pid, "x")
        return info, ref

    info, ref = run(body)
    assert info.registered_names == ("info-target",)
    assert info.message_queue_length == 1
    assert info.monitored_by == (ref,)


# ---------------------------------------------------------------------- logger


def test_say_goes_through_logger_with_node_and_pid() -> None:
    lines: list[str] = []
    logged = asyncio.Event()

    def sink(line: str) -> None:
        lines.append(line)
        logged.set()

    async def body() -> tuple[str, str]:
        hp.say("hello log")
        await asyncio.wait_for(logged.wait(), WAIT)
        return str(hp.self_node()), repr(hp.self_pid())

    node, pid = run(body, log_sink=sink)
    assert len(lines) == 1
    assert "hello log" in lines[0] and node in lines[0] and pid in lines[0]


def test_exit_to_self_can_be_caught_and_process_continues() -> None:
    async def body() -> Any:
        try:
            await hp.exit(hp.self_pid(), "self")
        except hp.ProcessExitException as exc:
            caught = exc.reason
        await hp.send(hp.self_pid(), "after")
        return caught, await hp.expect(str, timeout=WAIT)

    assert run(body) == ("self", "after")


def test_signal_during_spawn_link_is_raised_after_spawn_returns() -> None:
    async def body() -> Any:
        pid = await hp.spawn_link(hp.self_node(), crashes)
        try:
            await hp.expect(_Never, timeout=WAIT)
        except hp.ProcessLinkException as exc:
            return exc.pid == pid
        return "no exception"

    assert run(body) is True


def test_node_closed_from_its_own_process_completes_and_reports_node_down() -> None:
    async def closer(node: hp.Node) -> None:
        await node.close()

    async def watcher(a: hp.Node, victim: hp.Pid) -> Any:
        await hp.monitor(victim)
        await hp.whereis_remote(a.node_id, "logger", timeout=WAIT)  # monitor is in place
        a.spawn_local(closer, a)
        return (await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)).reason

    async def main() -> Any:
        transport = new_transport()
        a = await hp.Node(transport).start()
        b = await hp.Node(transport).start()
        victim = a.spawn_local(waits_forever)
        reason = await asyncio.wait_for(b.run(watcher, a, victim), WAIT)
        await asyncio.wait_for(a.wait_closed(), WAIT)
        await b.close()
        await transport.close()
        return reason, a.closed

    assert asyncio.run(main()) == (hp.DiedNodeDown(), True)


def test_receive_timeout_holds_while_unmatched_messages_arrive() -> None:
    async def noise(target: hp.Pid) -> None:
        for i in range(3):
            await hp.send(target, f"noise {i}")

    async def body() -> tuple[Any, list[Any]]:
        hp.spawn_local(noise, hp.self_pid())
        got = await hp.receive(hp.match(int), timeout=0.2)
        return got, [await hp.expect(timeout=0) for _ in range(3)]

    assert run(body) == (None, ["noise 0", "noise 1", "noise 2"])


def test_every_control_message_type_has_a_handler() -> None:
    from hpcproc import _control as ctl

    messages = {
        obj
        for name in ctl.__all__
        if isinstance(obj := getattr(ctl, name), type) and hasattr(obj, "__dataclass_fields__")
    }
    node = hp.Node(create("inmemory"))
    assert messages == node.controller.message_types
