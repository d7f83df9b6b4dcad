"""A process is a context, and exit signals follow Erlang (issue 12, points 1 and 2).

Each scenario runs over two in-memory nodes and over TCP/teststreams between two OS
processes (the ``kind`` fixture of :mod:`tests.test_process_cluster`).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from typing import Any

import pytest

import hpcproc as hp

from .test_process_cluster import WAIT, Cluster, Servers, kind, run_cluster, servers

__all__ = ["kind", "servers"]


class Go:
    pass


async def crash_when_told() -> None:
    await hp.expect(Go)
    raise ValueError("told to crash")


async def add(a: int, b: int) -> int:
    return a + b


async def slow_add(a: int, b: int) -> int:
    await asyncio.sleep(WAIT)
    return a + b


async def trapping_reporter(reply: hp.Pid) -> None:
    hp.trap_exits(True)
    await hp.send(reply, "trapping")
    got = await hp.expect(hp.ExitSignal)
    await hp.send(reply, ("trapped", got.from_, got.reason))


# ---------------------------------------------------------------------- point 1


def test_tasks_a_process_creates_act_on_its_behalf(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        out: dict[str, Any] = {}
        out["wait_for call"] = await asyncio.wait_for(hp.call(c.b, add, 1, 2), WAIT)
        out["gather call"] = await asyncio.gather(*(hp.call(c.b, add, i, 1) for i in range(3)))
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(hp.call(c.b, add, 2, 2))
            t2 = tg.create_task(hp.expect(str, timeout=WAIT))
            tg.create_task(hp.send(me, "from a task"))
        out["taskgroup"] = (t1.result(), t2.result())
        async with asyncio.timeout(WAIT):
            out["timeout call"] = await hp.call(c.b, add, 3, 3)
        await hp.send(me, 7)
        out["wait_for expect"] = await asyncio.wait_for(hp.expect(int), WAIT)
        await hp.send(me, 8)
        out["gather expect"] = await asyncio.gather(hp.expect(int, timeout=WAIT))
        await hp.send(me, 9)
        async with asyncio.timeout(WAIT):
            out["timeout expect"] = await hp.expect(int)
        out["self in task"] = await asyncio.create_task(_self_pid()) == me
        return out

    assert run_cluster(kind, servers, body) == {
        "wait_for call": 3,
        "gather call": [1, 2, 3],
        "taskgroup": (4, "from a task"),
        "timeout call": 6,
        "wait_for expect": 7,
        "gather expect": [8],
        "timeout expect": 9,
        "self in task": True,
    }


async def _self_pid() -> hp.Pid:
    return hp.self_pid()


def test_a_thread_can_hand_work_back_to_its_process(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        loop = asyncio.get_running_loop()
        me = hp.self_pid()

        def in_thread() -> int:
            # A coroutine handed back to the loop runs in the thread's copy of the
            # process's context, so it acts for the process.
            fut = asyncio.run_coroutine_threadsafe(hp.call(c.b, add, 20, 22), loop)
            return fut.result(WAIT)

        value = await asyncio.to_thread(in_thread)

        def outside() -> str:
            try:
                hp.self_pid()
            except hp.NotInProcessError:
                return "refused in a thread"
            return "allowed"

        return value, await asyncio.to_thread(outside), hp.self_pid() == me

    assert run_cluster(kind, servers, body) == (42, "refused in a thread", True)


def test_several_tasks_receiving_at_once_get_distinct_messages_in_order(
    kind: str, servers: Servers
) -> None:
    n_tasks, n = 4, 200

    async def taker(k: int) -> list[int]:
        got = []
        while True:
            msg = await hp.expect(int, timeout=WAIT)
            if msg is None or msg < 0:
                return got
            got.append(msg)

    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        tasks = [asyncio.create_task(taker(k)) for k in range(n_tasks)]
        await asyncio.sleep(0)  # all of them waiting before the messages come

        async def feeder(me: hp.Pid) -> None:
            for i in range(n):
                await hp.send(me, i)
            for _ in range(n_tasks):
                await hp.send(me, -1)

        await hp.spawn(c.b, feeder, me)
        return await asyncio.gather(*tasks)

    results = run_cluster(kind, servers, body)
    everything = sorted(m for got in results for m in got)
    assert everything == list(range(n))  # none lost, none duplicated
    for got in results:
        assert got == sorted(got)  # each task sees its share in the order sent


def test_selective_receives_of_several_tasks_each_get_their_own_type(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        wants_str = asyncio.create_task(hp.expect(str, timeout=WAIT))
        wants_int = asyncio.create_task(hp.expect(int, timeout=WAIT))
        await asyncio.sleep(0)
        await hp.send(me, 1)
        await hp.send(me, "one")
        return await asyncio.gather(wants_str, wants_int)

    assert run_cluster(kind, servers, body) == ["one", 1]


def test_tasks_acting_for_a_process_are_cancelled_when_it_ends(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        seen: list[str] = []
        ended = asyncio.Event()

        async def child() -> None:
            try:
                await hp.expect(Go)
            except asyncio.CancelledError:
                seen.append("cancelled")
                ended.set()
                raise

        async def owner() -> None:
            asyncio.create_task(child())  # noqa: RUF006 (left running on purpose)
            await asyncio.sleep(0)

        await hp.monitor(hp.spawn_local(owner))
        await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        await asyncio.wait_for(ended.wait(), WAIT)
        return seen

    assert run_cluster(kind, servers, body) == ["cancelled"]


# ---------------------------------------------------------------------- point 2


@pytest.mark.parametrize("where", ["sleep", "wait_for", "event", "to_thread", "gather", "future"])
def test_link_exception_is_raised_at_any_await_and_caught_there(
    kind: str, servers: Servers, where: str
) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn_link(c.b, crash_when_told)
        await hp.send(pid, Go())
        release = threading.Event()
        try:
            if where == "sleep":
                await asyncio.sleep(WAIT)
            elif where == "wait_for":
                await asyncio.wait_for(asyncio.Event().wait(), WAIT)
            elif where == "event":
                await asyncio.wait_for(asyncio.shield(asyncio.Event().wait()), WAIT)
            elif where == "to_thread":
                await asyncio.to_thread(release.wait, WAIT)
            elif where == "gather":
                await asyncio.gather(asyncio.sleep(WAIT), asyncio.sleep(WAIT))
            else:
                await asyncio.get_running_loop().create_future()
        except hp.ProcessLinkException as exc:
            return "caught", exc.pid == pid, exc.reason
        finally:
            release.set()
        return "not raised"

    assert run_cluster(kind, servers, body) == (
        "caught",
        True,
        hp.DiedException("ValueError: told to crash"),
    )


def test_uncaught_link_signal_ends_the_process_with_it_not_as_killed(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        pid = await hp.spawn_link(c.b, crash_when_told)
        await hp.send(pid, Go())
        await asyncio.sleep(WAIT)

    with pytest.raises(hp.ProcessLinkException, match="told to crash"):
        run_cluster(kind, servers, body)


def test_trap_exits_turns_a_process_link_signal_into_a_message(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        assert hp.trap_exits(True) is False
        pid = await hp.spawn_link(c.b, crash_when_told)
        await hp.send(pid, Go())
        await asyncio.sleep(0)  # a plain await: nothing is raised
        got = await hp.expect(hp.ExitSignal, timeout=WAIT)
        return got.from_ == pid, got.reason

    assert run_cluster(kind, servers, body) == (True, hp.DiedException("ValueError: told to crash"))


def test_trap_exits_turns_exit_from_another_process_into_a_message(
    kind: str, servers: Servers
) -> None:
    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        pid = await hp.spawn(c.b, trapping_reporter, me)
        assert await hp.expect(str, timeout=WAIT) == "trapping"
        await hp.exit(pid, "please stop")
        return await hp.expect(tuple, timeout=WAIT), me

    got, me = run_cluster(kind, servers, body)
    assert got == ("trapped", me, "please stop")


def test_trap_exits_turns_a_node_link_signal_into_a_message(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        hp.trap_exits(True)
        await hp.link_node(c.b)
        await c.stop_b()
        got = await hp.expect(hp.ExitSignal, timeout=WAIT)
        return got.from_ == c.b, got.reason

    assert run_cluster(kind, servers, body, fresh=True) == (True, hp.DiedNodeDown())


def test_node_link_exception_is_raised_in_asyncio_sleep(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        await hp.link_node(c.b)
        stopper = asyncio.ensure_future(c.stop_b())
        try:
            await asyncio.sleep(WAIT)
        except hp.NodeLinkException as exc:
            return exc.node == c.b, exc.reason
        finally:
            await stopper
        return "not raised", None

    assert run_cluster(kind, servers, body, fresh=True) == (True, hp.DiedNodeDown())


def test_unlink_node_means_no_exception(kind: str, servers: Servers) -> None:
    async def body(c: Cluster) -> Any:
        await hp.link_node(c.b)
        await hp.unlink_node(c.b)
        ref = await hp.monitor_node(c.b)
        await c.stop_b()
        note = await hp.expect(hp.NodeMonitorNotification, timeout=WAIT)
        await asyncio.sleep(0)
        return note.ref == ref, await hp.expect(timeout=0)

    assert run_cluster(kind, servers, body, fresh=True) == (True, None)


# ---------------------------------------------------------------------- Python 3.10


def test_the_python_3_10_way_into_the_context_keeps_the_promises(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``asyncio.Task`` takes no context (3.10), a process's body enters the
    context at its first step (``_Body._first_send``) or first throw: run here by
    turning the 3.11 way off, since CI runs 3.11."""
    from hpcproc import _process

    monkeypatch.setattr(_process, "_TASK_CONTEXT", False)

    async def waits() -> None:
        await asyncio.sleep(WAIT)

    async def body(c: Cluster) -> Any:
        me = hp.self_pid()
        out: dict[str, Any] = {}
        out["self in task"] = await asyncio.create_task(_self_pid()) == me
        out["gather call"] = await asyncio.gather(hp.call(c.b, add, 1, 1))
        pid = await hp.spawn_link(c.b, crash_when_told)
        await hp.send(pid, Go())
        try:
            await asyncio.sleep(WAIT)
        except hp.ProcessLinkException as exc:
            out["caught at sleep"] = exc.pid == pid
        # Killed before its first step: the throw is what enters its context.
        victim = hp.spawn_local(waits)
        ref = await hp.monitor(victim)
        await hp.kill(victim, "before its first step")
        note = await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
        assert note is not None
        out["killed"] = note.ref == ref and isinstance(note.reason, hp.DiedException)
        # An ended process is freed without the cycle collector.
        gc.disable()
        try:
            ended = hp.spawn_local(add, 1, 2)
            proc = c.a.local_process(ended.lid)
            gone = weakref.ref(proc)
            del proc
            ref = await hp.monitor(ended)
            await hp.expect(hp.ProcessMonitorNotification, timeout=WAIT)
            out["freed"] = gone() is None
        finally:
            gc.enable()
        return out

    assert run_cluster("inmemory", servers, body) == {
        "self in task": True,
        "gather call": [2],
        "caught at sleep": True,
        "killed": True,
        "freed": True,
    }
