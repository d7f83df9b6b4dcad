"""Signals between two processes keep their place among the pair's messages.

As in Erlang: a monitor or link set before a message is in place when the message
arrives, an exit signal sent after a message arrives after it, and the notice of a
process's death comes after the last message it sent. Each of these used to travel
on the node's control connection while the messages took the process pair's own, and
the transport orders messages per connection only.

Two nodes of the in-memory transport in this process. One connection (the control
connection, or a pair's) is *held*: its messages wait until the test lets them go,
at a point the event loop orders (a process's end), never after a sleep. That is the
order a congested connection, or a network, may produce; each test fails with the
signal on the control connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

import hpcproc as hp
from hpcproc import otp
from hpcproc._control import Died
from hpcproc.transports import create
from hpcproc.transports.base import Buffer

from ._two_nodes import run_two_nodes

TIMEOUT = 20.0
WAIT = 10.0


class Held:
    """A connection whose messages wait until :meth:`release`, then go out in order."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.held: list[list[bytes]] = []
        self._flush: asyncio.Task[None] | None = None
        self._released = asyncio.Event()

    def send_nowait(self, frames: Sequence[Buffer]) -> bool:
        self.held.append([bytes(f) for f in frames])
        if self._flush is not None and self._flush.done():
            self._flush = None
            self.release()
        return True

    async def send(self, frames: Sequence[Buffer]) -> None:
        self.send_nowait(frames)

    def release(self) -> asyncio.Task[None]:
        """Send what is held (once, in order); later messages follow it."""
        if self._flush is None:
            self._released.set()
            self._flush = asyncio.ensure_future(self._send_held())
        return self._flush

    async def _send_held(self) -> None:
        while self.held:
            await self.real.send(self.held.pop(0))

    async def close(self) -> None:
        await self._released.wait()  # closing does not let the held messages go
        await self.release()
        await self.real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def release_when_ended(node: hp.Node, pid: hp.Pid, held: Held) -> None:
    """Release ``held`` once process ``pid`` of ``node`` has ended (and the node has
    sent what its end sends: its done callback ran before this one)."""
    proc = node.local_process(pid.lid)
    assert proc is not None
    proc.add_done_callback(lambda _: held.release())


def release_when_death_arrives(node: hp.Node, held: Held) -> None:
    """Release ``held`` at the event loop's next round after ``node`` acted on the
    notice of a death from another node: after any process woken by the notice has
    run (the loop runs its ready callbacks in order)."""
    handlers = node.controller._handlers
    on_died = handlers[Died]

    def died(nid: hp.NodeId, msg: Any) -> None:
        on_died(nid, msg)
        asyncio.get_running_loop().call_soon(held.release)

    handlers[Died] = died


async def hold_control(a: hp.Node, b: hp.Node) -> Held:
    """Hold ``a``'s control connection to ``b`` (opened first)."""
    await hp.get_node_stats(b.node_id)
    out = a.remote._control[b.node_id]
    held = out.conn = Held(out.conn)
    return held


async def ends_at_first_message() -> None:
    await hp.expect(timeout=WAIT)


def test_a_monitor_is_in_place_before_a_message_sent_after_it_arrives() -> None:
    """The message ends the process: its monitor must report that end, not that the
    process did not exist (``otp.stop`` reported a server it stopped "not running")."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        target = b.spawn_local(ends_at_first_message)
        held = await hold_control(a, b)
        release_when_ended(b, target, held)
        ref = await hp.monitor(target)
        await hp.send(target, "stop")
        note = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        assert note.ref == ref
        return note.reason

    assert isinstance(run_two_nodes(body, TIMEOUT), hp.DiedNormal)


async def raises_at_first_message() -> None:
    await hp.expect(timeout=WAIT)
    raise RuntimeError("boom")


def test_a_link_is_in_place_before_a_message_sent_after_it_arrives() -> None:
    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        target = b.spawn_local(raises_at_first_message)
        held = await hold_control(a, b)
        release_when_ended(b, target, held)
        await hp.link(target)
        await hp.send(target, "crash")
        with pytest.raises(hp.ProcessLinkException) as caught:
            await hp.expect(timeout=WAIT)
        return caught.value.reason

    assert isinstance(run_two_nodes(body, TIMEOUT), hp.DiedException)


async def sends_then_ends(to: hp.Pid, crash: bool) -> None:
    await hp.send(to, "first")
    await hp.expect(timeout=WAIT)
    await hp.send(to, "last")
    if crash:  # (a link fires only for an abnormal end)
        raise RuntimeError("ends abnormally")


@pytest.mark.parametrize("watch", ["monitor", "link"])
def test_the_notice_of_a_death_comes_after_the_last_message_of_the_dead(watch: str) -> None:
    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        sender = b.spawn_local(sends_then_ends, me, watch == "link")
        if watch == "monitor":
            await hp.monitor(sender)
        else:
            hp.trap_exits(True)
            await hp.link(sender)
        assert await hp.expect(timeout=WAIT) == "first"
        sproc = b.local_process(sender.lid)
        assert sproc is not None and sproc.conns is not None
        held = sproc.conns[me] = Held(sproc.conns[me])
        release_when_ended(b, sender, held)
        await hp.send(sender, "go")
        return [await hp.expect(timeout=WAIT) for _ in range(2)]

    last, notice = run_two_nodes(body, TIMEOUT)
    assert last == "last"
    if watch == "monitor":
        assert type(notice) is hp.ProcessMonitorNotification
        assert type(notice.reason) is hp.DiedNormal
    else:
        assert type(notice) is hp.ExitSignal
        assert type(notice.reason) is hp.DiedException


async def sends_to_then_ends(to: hp.Pid) -> None:
    await hp.send(to, "opens the connection")
    await hp.expect(timeout=WAIT)
    await hp.send(to, "last")


async def reports_its_messages(to: hp.Pid) -> None:
    got = [await hp.expect(timeout=WAIT)]
    await hp.send(to, "first arrived")
    got += [await hp.expect(timeout=WAIT) for _ in range(2)]
    await hp.send(to, got)


async def tells_of_a_death(target: hp.Pid, to: hp.Pid, ready: hp.Pid) -> None:
    await hp.monitor(target)
    await hp.send(ready, "watching")
    await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
    await hp.send(to, "death")


def test_the_notice_of_a_death_comes_after_the_last_messages_of_the_dead_to_its_node() -> None:
    """The dead process's last message to *another* process of the watcher's node
    is delivered before the watcher hears of the death (as Erlang's one channel per
    pair of nodes orders them): what a call needs, whose server replies to the caller
    while its death reaches the node's call watch."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        keeper = hp.spawn_local(reports_its_messages, me)
        sender = b.spawn_local(sends_to_then_ends, keeper)
        hp.spawn_local(tells_of_a_death, sender, keeper, me)
        ready = {await hp.expect(str, timeout=WAIT) for _ in range(2)}
        assert ready == {"watching", "first arrived"}
        sproc = b.local_process(sender.lid)
        assert sproc is not None and sproc.conns is not None
        held = sproc.conns[keeper] = Held(sproc.conns[keeper])
        release_when_death_arrives(a, held)
        await hp.send(sender, "go")
        return await hp.expect(list, timeout=WAIT)

    # The watcher tells the keeper of the death as soon as it hears of it.
    assert run_two_nodes(body, TIMEOUT) == ["opens the connection", "last", "death"]


async def traps_and_reports(to: hp.Pid) -> None:
    hp.trap_exits(True)
    await hp.send(to, "ready")
    got = [await hp.expect(timeout=WAIT) for _ in range(3)]
    await hp.send(to, [g if type(g) is str else type(g).__name__ for g in got])


def test_an_exit_signal_sent_after_a_message_arrives_after_it() -> None:
    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        target = b.spawn_local(traps_and_reports, me)
        assert await hp.expect(timeout=WAIT) == "ready"
        await hp.send(target, "hello")  # the pair's connection is open from here on
        proc = a.local_process(me.lid)
        assert proc is not None and proc.conns is not None
        held = proc.conns[target] = Held(proc.conns[target])
        await hp.send(target, "message")
        await hp.exit(target, "bye")
        await held.release()
        return await hp.expect(list, timeout=WAIT)

    assert run_two_nodes(body, TIMEOUT) == ["hello", "message", "ExitSignal"]


def test_a_signal_to_a_process_that_ended_is_answered() -> None:
    """A monitor or link sent on a pair connection whose receiver has ended reports
    that the process does not exist (the connection's messages are dropped, its
    signals are not)."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        target = b.spawn_local(ends_at_first_message)
        await hp.monitor(target)
        await hp.send(target, "stop")
        first = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        assert type(first.reason) is hp.DiedNormal
        await hp.monitor(target)  # on the pair connection the first monitor opened
        second = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        await hp.link(target)
        with pytest.raises(hp.ProcessLinkException) as caught:
            await hp.expect(timeout=WAIT)
        return second.reason, caught.value.reason

    second, linked = run_two_nodes(body, TIMEOUT)
    assert type(second) is hp.DiedUnknownId
    assert type(linked) is hp.DiedUnknownId


class Stoppable(otp.GenServer):
    async def handle_call(self, request: Any, caller: otp.Caller) -> Any:
        return request


def test_otp_stop_of_a_remote_server_waits_for_its_end_with_the_control_connection_held() -> None:
    """``otp.stop`` monitors the server, then sends the stop on the pair: the server
    must not end before its monitor is in place (it reported ``ServerDown``, "not
    running", for a server it had just stopped)."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        server = await otp.start(Stoppable, node=b.node_id)
        assert await otp.call(server, "up") == "up"
        held = await hold_control(a, b)
        release_when_ended(b, server, held)
        await otp.stop(server, timeout=WAIT)
        return b.local_process(server.lid)

    assert run_two_nodes(body, TIMEOUT) is None


class AnswersThenStops(otp.GenServer):
    async def handle_call(self, request: Any, caller: otp.Caller) -> Any:
        if request != "answer, then stop":
            return request
        await otp.reply(caller, request)
        await hp.exit(hp.self_pid(), "normal")  # the server ends normally, at once
        return otp.NOREPLY


def test_a_call_gets_the_reply_its_server_sent_before_it_stopped() -> None:
    """The server answers the call, then ends; its reply travels to the caller, its
    death to the node's call watch. The call must return the reply (it raised
    ``ServerDown``, and the reply was dropped: review R3)."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        server = await otp.start(AnswersThenStops, node=b.node_id)
        assert await otp.call(server, "warm-up") == "warm-up"  # the reply connection
        sproc = b.local_process(server.lid)
        assert sproc is not None and sproc.conns is not None
        held = sproc.conns[me] = Held(sproc.conns[me])
        # The reply goes out only once the death was put off until the reply arrived
        # (what the fix does), or once the call has ended without it.
        defer = a.incoming.after_messages_of

        def deferred(pid: hp.Pid, fn: Any) -> bool:
            if not defer(pid, fn):
                return False
            asyncio.get_running_loop().call_soon(held.release)
            return True

        a.incoming.after_messages_of = deferred  # type: ignore[method-assign]
        try:
            return await otp.call(server, "answer, then stop", timeout=WAIT)
        finally:
            held.release()

    assert run_two_nodes(body, TIMEOUT) == "answer, then stop"


class NeverAnswers(otp.GenServer):
    async def handle_call(self, request: Any, caller: otp.Caller) -> Any:
        return otp.NOREPLY


def test_calls_time_out_while_another_server_s_node_does_not_answer_a_connect() -> None:
    """The node's call watch monitors every server called from the node and times the
    calls out. It must not wait for a connection to open (``hp.monitor`` does, to
    keep its place before the caller's later messages; the watch sends none): one
    node that does not answer would stop every call of this node from timing out."""

    async def main() -> Any:
        transport = create("inmemory")
        a, b, c = [await hp.Node(transport).start() for _ in range(3)]
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        connect = a.endpoint.connect

        async def hangs_for_c(address: Any, **options: Any) -> Any:
            if address == c.node_id.address:
                await never  # a host that does not answer
            return await connect(address, **options)

        a.endpoint.connect = hangs_for_c  # type: ignore[method-assign]

        async def body() -> Any:
            silent = await otp.start(NeverAnswers, node=b.node_id)
            unreachable = c.spawn_local(ends_at_first_message)
            stuck = asyncio.ensure_future(otp.call(unreachable, "x", timeout=None))
            await asyncio.sleep(0)  # (a yield: the watch is asked to monitor it)
            try:
                with pytest.raises(otp.CallTimeout):
                    await otp.call(silent, "y", timeout=0.2)
            finally:
                stuck.cancel()
            return True

        try:
            return await asyncio.wait_for(a.run(body), TIMEOUT)
        finally:
            never.cancel()
            for node in (a, b, c):
                await node.close()
            await transport.close()

    assert asyncio.run(main()) is True


async def sends_from_two_tasks(to: hp.Pid) -> None:
    await hp.expect(timeout=WAIT)  # "go": the watcher's monitor is in place
    await asyncio.gather(hp.send(to, 1), hp.send(to, 2))


async def keeps_everything() -> None:
    while True:
        await hp.expect()


def test_two_tasks_opening_a_pair_connection_at_once_open_one() -> None:
    """Two tasks of a process send to the same process while the connect is under
    way (it yields, as tcp's does while a link is set up). The pair must end up with
    one connection, which the process's end closes: the other node acts on its death
    only once its connections there are closed, and a second one, never closed, held
    the notice back for good (review of the change)."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        connect = b.endpoint.connect

        async def yields_first(address: Any, **options: Any) -> Any:
            await asyncio.sleep(0)
            return await connect(address, **options)

        b.endpoint.connect = yields_first  # type: ignore[method-assign]
        sink = hp.spawn_local(keeps_everything)
        sender = b.spawn_local(sends_from_two_tasks, sink)
        await hp.monitor(sender)
        await hp.send(sender, "go")
        note = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        await hp.kill(sink, "done")
        return type(note.reason)

    assert run_two_nodes(body, TIMEOUT) is hp.DiedNormal


def test_an_exit_signal_before_the_first_message_of_a_pair_arrives_first() -> None:
    """With no pair connection yet, an exit sent before a message must not take the
    control queue while the message opens the pair's connection."""

    async def body(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        target = b.spawn_local(traps_and_reports, me)
        assert await hp.expect(timeout=WAIT) == "ready"
        held = await hold_control(a, b)
        try:
            await hp.exit(target, "bye")
            await hp.send(target, "message")
            await hp.send(target, "another")
            return await hp.expect(list, timeout=WAIT)
        finally:
            held.release()

    assert run_two_nodes(body, TIMEOUT) == ["ExitSignal", "message", "another"]


class Congested(Held):
    """A held connection on which nothing goes out at once (a congested link)."""

    def send_nowait(self, frames: Sequence[Buffer]) -> bool:
        return False

    async def send(self, frames: Sequence[Buffer]) -> None:
        await self._released.wait()
        await self.real.send(frames)


async def sends_to_both_then_ends(near: hp.Pid, far: hp.Pid) -> None:
    await hp.send(near, "hello")
    await hp.send(far, "hello")
    await hp.expect(timeout=WAIT)


async def monitors_the_pid_it_gets(to: hp.Pid) -> None:
    await hp.monitor(await hp.expect(hp.Pid, timeout=WAIT))
    await hp.expect(str, timeout=WAIT)  # its "hello": the connection from it is open
    await hp.send(to, "watching")
    await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)


def test_a_congested_connection_of_the_dead_delays_no_other_node() -> None:
    """The dead process's death notice to a watcher behind a congested connection
    waits there; its connections to other nodes still close, so that their watchers
    hear of the death at once (all closed after that one: review of the change)."""

    async def main() -> Any:
        transport = create("inmemory")
        a, b, c = [await hp.Node(transport).start() for _ in range(3)]

        async def body() -> Any:
            me = hp.self_pid()
            far = c.spawn_local(monitors_the_pid_it_gets, me)
            sender = b.spawn_local(sends_to_both_then_ends, me, far)
            await hp.send(far, sender)
            await hp.monitor(sender)
            got = {await hp.expect(str, timeout=WAIT) for _ in range(2)}
            assert got == {"hello", "watching"}
            sproc = b.local_process(sender.lid)
            assert sproc is not None and sproc.conns is not None
            congested = sproc.conns[far] = Congested(sproc.conns[far])
            try:
                await hp.send(sender, "go")
                note = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
                return type(note.reason)
            finally:
                congested.release()

        try:
            return await asyncio.wait_for(a.run(body), TIMEOUT)
        finally:
            for node in (a, b, c):
                await node.close()
            await transport.close()

    assert asyncio.run(main()) is hp.DiedNormal


def test_a_monitor_interrupted_while_connecting_leaves_no_watch() -> None:
    async def main() -> Any:
        transport = create("inmemory")
        a, b = [await hp.Node(transport).start() for _ in range(2)]
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def hangs(address: Any, **options: Any) -> Any:
            await never  # a node that does not answer

        a.endpoint.connect = hangs  # type: ignore[method-assign]

        async def body() -> Any:
            target = b.spawn_local(keeps_everything)
            for watch in (hp.monitor, hp.link):
                task = asyncio.ensure_future(watch(target))
                await asyncio.sleep(0)  # (a yield: it is connecting)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            return dict(a.watches.remote)

        try:
            return await asyncio.wait_for(a.run(body), TIMEOUT)
        finally:
            never.cancel()
            await a.close()
            await b.close()
            await transport.close()

    assert asyncio.run(main()) == {}
