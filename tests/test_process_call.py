"""``call`` cleans up after itself and reports remote failures (issue 12, point 3).

Over two in-memory nodes and between two OS processes (see
:mod:`tests.test_process_cluster`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import hpcproc as hp

from .test_process_cluster import WAIT, Cluster, Servers, kind, run_cluster, servers, sync_with

__all__ = ["kind", "servers"]


class _Never:
    pass


def plain(a: int) -> int:
    return a


async def tells_then_waits(reply: hp.Pid) -> int:
    await hp.send(reply, ("helper", hp.self_pid()))
    await hp.expect(_Never)
    return 0


async def fails_deep(x: int) -> int:
    return _inner_failure(x)


def _inner_failure(x: int) -> int:
    raise ValueError(f"bad input {x}")


class _Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


async def fails_unpicklably() -> None:
    raise _Unpicklable("lost on the way")


def test_call_refuses_a_plain_function_before_sending_anything(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        try:
            # A dead node: anything sent would fail with another error.
            await hp.call(c.dead, plain, 1)  # type: ignore[arg-type]
        except TypeError as exc:
            return str(exc)
        return "accepted"

    text = run_cluster(kind, servers, body)
    assert "plain" in text and "async def" in text


@pytest.mark.parametrize("how", ["timeout=", "wait_for", "asyncio.timeout", "cancel"])
def test_abandoned_call_kills_its_process_and_leaves_nothing_in_the_mailbox(
    kind: str, servers: Servers, how: str
) -> None:
    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        call = hp.call(c.b, tells_then_waits, me, timeout=WAIT if how != "timeout=" else None)
        if how == "timeout=":
            call.close()
            call = hp.call(c.b, tells_then_waits, me, timeout=0.2)
        task = asyncio.ensure_future(call)
        _, helper = await hp.expect(tuple, timeout=WAIT)
        ref = await hp.monitor(helper)
        raised: Any = None
        try:
            if how == "timeout=":
                await task
            elif how == "wait_for":
                await asyncio.wait_for(task, 0.2)
            elif how == "asyncio.timeout":
                async with asyncio.timeout(0.2):
                    await task
            else:
                task.cancel()
                await task
        except (TimeoutError, asyncio.CancelledError) as exc:
            raised = type(exc).__name__
        note = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        await sync_with(c.b)
        left = []
        while (msg := await hp.expect(timeout=0)) is not None:
            left.append(msg)
        return raised, note.ref == ref, note.reason, left

    raised, same, reason, left = run_cluster(kind, servers, body)
    assert raised == ("CancelledError" if how == "cancel" else "TimeoutError")
    assert same and isinstance(reason, hp.DiedException) and "call abandoned" in reason.reason
    assert left == []


def test_remote_exception_carries_the_remote_traceback_and_node(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        try:
            await hp.call(c.b, fails_deep, 3)
        except ValueError as exc:
            cause = exc.__cause__
            assert isinstance(cause, hp.RemoteError)
            return str(exc), str(c.b) in str(cause), cause.traceback
        return None

    text, names_node, tb = run_cluster(kind, servers, body)
    assert text == "bad input 3" and names_node
    assert "_inner_failure" in tb and "fails_deep" in tb and "ValueError: bad input 3" in tb


def test_unpicklable_remote_exception_arrives_as_remote_error(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        try:
            await hp.call(c.b, fails_unpicklably)
        except hp.RemoteError as exc:
            return "lost on the way" in exc.traceback
        return None

    assert run_cluster(kind, servers, body) is True
