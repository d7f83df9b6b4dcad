"""How a catchable signal (``exit``, a link firing) reaches its process when it arrives
at an awkward moment: while the process itself is running, during an hpcproc call,
or while another task acting for the process uses the API.

Each scenario orders the steps with futures (no sleeps), runs on two nodes of the
in-memory transport in this process (the second node is only a remote peer), and
would fail as its docstring describes if the promise were broken. Where the moment
matters, the process is handed one event through its endpoint's poll
(:func:`polled_once`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import hpcproc as hp
from hpcproc import _control as ctl
from hpcproc._process import current

from ._two_nodes import run_two_nodes

TIMEOUT = 20.0
WAIT = 10.0  # bound on every single wait inside a scenario


async def sink() -> None:
    await hp.expect(timeout=WAIT)


def run_two(body: Callable[..., Coroutine[Any, Any, Any]]) -> Any:
    """Run ``body(a, b)`` as a process on node ``a``; ``b`` is a second node."""

    async def with_nodes(transport: Any, a: hp.Node, b: hp.Node) -> Any:
        return await body(a, b)

    return run_two_nodes(with_nodes, TIMEOUT)


@contextmanager
def polled_once(node: hp.Node, on_poll: Callable[[], None]) -> Iterator[list[Any]]:
    """The next poll of ``node``'s endpoint by a process (or a request) hands over an
    event that runs ``on_poll`` as it is handled; yields a list that is empty once it
    was."""
    incoming = node.incoming
    real_poll, real_handle = incoming.receive_nowait, incoming.handle_event
    event: Any = object()
    queued = [event]

    def poll() -> Any:
        if queued:
            return queued.pop()
        return real_poll() if real_poll is not None else None

    def handle(got: Any) -> None:
        if got is event:
            on_poll()
        else:
            real_handle(got)

    incoming.receive_nowait, incoming.handle_event = poll, handle  # type: ignore[method-assign]
    try:
        yield queued
    finally:
        incoming.receive_nowait, incoming.handle_event = real_poll, real_handle  # type: ignore[method-assign]


def exit_from(node: hp.Node, target: hp.Pid, sender: hp.Pid, reason: str) -> Callable[[], None]:
    """What the controller does with another node's ``hp.exit(target, reason)``."""
    return lambda: node.controller.handle(sender.node, ctl.Exit(target, sender, reason))


def test_exit_in_the_event_a_receiver_polls_itself_is_raised_at_once() -> None:
    """A process about to wait in ``expect`` first takes an event from the endpoint
    itself. An exit signal that event brings (another node's ``hp.exit``, handled by
    the controller inside the poll) is raised there, not left pending while the
    process sleeps until some later message wakes it (a supervisor's shutdown of a
    remote child then waited for its whole timeout)."""

    async def body(a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        with polled_once(a, exit_from(a, me, hp.Pid(b.node_id, 1), "shutdown")) as queued:
            try:
                await hp.expect(int)  # the mailbox is empty: it polls before it sleeps
                return "no exit", queued
            except hp.ProcessExitException as exc:
                return exc.reason, queued

    assert run_two(body) == ("shutdown", [])


def test_exit_polled_by_a_request_of_the_process_is_raised() -> None:
    """A public ``Node`` method called from inside a process (``whereis_remote`` here)
    polls the endpoint while it waits for its reply, outside any guarded call. An
    exit for the process that this poll handles is raised in the process; it was left
    pending, and the process then slept through it."""

    async def body(a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        other = hp.Pid(b.node_id, 1)
        with polled_once(a, exit_from(a, me, other, "bye")) as queued:
            try:
                await a.whereis_remote(b.node_id, "nobody", timeout=WAIT)
                await asyncio.sleep(WAIT)
                return "slept through the exit", queued
            except hp.ProcessExitException as exc:
                return exc.reason, queued

    assert run_two(body) == ("bye", [])


def test_send_of_another_task_leaves_the_guarded_call_of_the_process_alone() -> None:
    """While the process's own task is in an hpcproc call, a signal waits for the call
    to return (the process gets the call's result, then the signal). A remote send
    by another task of the process, finishing meanwhile, used to end that state, so
    the exit cancelled the process inside the call and its result was lost."""

    async def body(a: hp.Node, b: hp.Node) -> Any:
        proc, me = current(), hp.self_pid()
        q = await hp.spawn(b.node_id, sink)
        call_done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def exiter() -> None:
            await hp.expect(str)
            await hp.exit(me, "bye")
            call_done.set_result("the call's result")

        r = hp.spawn_local(exiter)

        async def helper() -> None:
            await hp.send(q, 1)  # this process's first send to q: it opens a connection
            await hp.send(r, "now")

        async def hpcproc_call() -> str:  # stands for spawn, whereis_remote...
            return await call_done

        task = asyncio.create_task(helper())
        result = None
        try:
            result = await proc.guarded(hpcproc_call())
            await asyncio.sleep(WAIT)
            return "no exit", result
        except hp.ProcessExitException as exc:
            return exc.reason, result
        finally:
            await task

    assert run_two(body) == ("bye", "the call's result")


def test_a_signal_raised_after_two_calls_leaves_no_cancellation_behind() -> None:
    """An exit that arrived during a guarded call is redelivered once the call
    returns; a remote send right after (which takes the slow path while a signal is
    pending) asked for a second redelivery, each cancelled the task, and one
    cancellation request stayed counted after the process caught the exit (which
    breaks ``asyncio.timeout`` and ``TaskGroup`` bookkeeping later)."""

    async def body(a: hp.Node, b: hp.Node) -> Any:
        proc, me = current(), hp.self_pid()
        q = await hp.spawn(b.node_id, sink)
        await hp.send(q, 0)
        call_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def exiter() -> None:
            await hp.exit(me, "bye")
            call_done.set_result(None)

        async def hpcproc_call() -> None:
            await call_done

        hp.spawn_local(exiter)
        await proc.guarded(hpcproc_call())
        await hp.send(q, 1)
        try:
            await asyncio.sleep(WAIT)
            caught = None
        except hp.ProcessExitException as exc:
            caught = exc.reason
        # (Python 3.10 counts no cancellation requests: nothing can stay behind.)
        cancelling = getattr(asyncio.current_task(), "cancelling", lambda: 0)
        return caught, cancelling()

    assert run_two(body) == ("bye", 0)


def test_trap_exits_by_another_task_does_not_take_back_a_signal_under_way() -> None:
    """Once a signal cancelled the suspended process to be raised, another task of the
    process that sets ``trap_exits(True)`` before the process resumes must not turn it
    into a message: the process then got a bare ``CancelledError`` and died
    "cancelled"."""

    async def body(a: hp.Node, b: hp.Node) -> Any:
        me = hp.self_pid()
        loop = asyncio.get_running_loop()
        go: asyncio.Future[None] = loop.create_future()

        async def helper() -> None:
            await go
            hp.trap_exits(True)

        async def exiter() -> None:
            go.set_result(None)  # the helper is scheduled before the process resumes
            await hp.exit(me, "bye")

        task = asyncio.create_task(helper())
        hp.spawn_local(exiter)
        try:
            await asyncio.sleep(WAIT)
            return "slept through the exit"
        except hp.ProcessExitException as exc:
            return exc.reason
        except asyncio.CancelledError:
            return "bare CancelledError"
        finally:
            await task

    assert run_two(body) == "bye"
