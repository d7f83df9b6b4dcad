"""The idle poller of ``EndPoint.receive`` (hpcproc.transports._busy_poll), and the
transports that poll (tcp, shm, mpi) on event loops whose ready queue it cannot read."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from hpcproc.testing.peer import PeerProcess
from hpcproc.transports import _busy_poll, create
from hpcproc.transports._busy_poll import (
    CROWD_HOLD,
    CROWD_PERIOD,
    CROWD_SAMPLES,
    FAIR_STREAK,
    LATE,
    NO_POLL_PERIOD,
    STARVED_POLLS,
    YIELD_ENV,
    Budget,
    Crowding,
    IdlePoller,
    ready_queue,
)
from hpcproc.transports._multiplex import EventQueue
from hpcproc.transports.base import (
    ConnectionClosed,
    ConnectionOpened,
    EndPoint,
    Event,
    Received,
    Transport,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _cpus_not_crowded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The poller's mechanics, whatever else runs on the machine: a busy machine would
    otherwise turn polling off (see the crowding tests below for that)."""
    monkeypatch.setattr(_busy_poll, "_crowding", Crowding("0"))


def _run(body: object) -> None:
    asyncio.run(asyncio.wait_for(body, TIMEOUT))  # type: ignore[arg-type]


def test_negative_budget_is_refused() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="busy_poll_us"):
            IdlePoller(loop, -1)
    finally:
        loop.close()


# pytest-mpi skips tests whose keywords include "mpi" outside mpiexec: not this one.
@pytest.mark.parametrize("name", ["tcp", "shm", pytest.param("mpi", id="mpi-singleton")])
def test_every_polling_transport_takes_the_one_option_and_refuses_a_negative_one(
    name: str,
) -> None:
    if name == "mpi" and importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed")
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="busy_poll_us"):
            create(name, busy_poll_us=bad)


class _FindsOnTheThird:
    """A ``poll_once`` whose third call queues ``ConnectionClosed(7)`` on ``events``."""

    def __init__(self, events: EventQueue) -> None:
        self.events = events
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls == 3:
            self.events.put(ConnectionClosed(7))
        return True


def test_poll_finds_an_event_without_sleeping() -> None:
    async def body() -> None:
        events = EventQueue()
        poll_once = _FindsOnTheThird(events)
        poller = IdlePoller(asyncio.get_running_loop(), 1e6)  # long enough never to give up
        assert await poller.receive(events, poll_once) == ConnectionClosed(7)
        assert poll_once.calls == 3

    _run(body())


def test_queued_event_is_returned_without_polling() -> None:
    async def body() -> None:
        events = EventQueue()
        events.put(ConnectionClosed(1))
        polled: list[int] = []
        poller = IdlePoller(asyncio.get_running_loop(), 1e6)
        assert await poller.receive(events, lambda: bool(polled.append(1)) or True) == (
            ConnectionClosed(1)
        )
        assert polled == []

    _run(body())


def test_disabled_or_nothing_to_poll_waits_on_the_loop() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        for max_us, has_links in ((0.0, True), (1e6, False)):
            events = EventQueue()
            calls = 0

            def poll_once(has_links: bool = has_links) -> bool:
                nonlocal calls
                calls += 1
                return has_links

            loop.call_later(0.01, events.put, ConnectionClosed(2))
            assert await IdlePoller(loop, max_us).receive(events, poll_once) == (
                ConnectionClosed(2)
            )
            assert calls == (0 if max_us == 0 else 1)

    _run(body())


def test_other_ready_callbacks_run_before_polling() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        events = EventQueue()
        order: list[str] = []
        loop.call_soon(order.append, "ready callback")

        def poll_once() -> bool:
            order.append("poll")
            events.put(ConnectionClosed(3))
            return True

        await IdlePoller(loop, 1e6).receive(events, poll_once)
        assert order == ["ready callback", "poll"]

    _run(body())


def test_budget_halves_after_a_silence_doubles_after_a_near_miss_within_its_bounds() -> None:
    budget = Budget(100e-6)
    assert budget.value == budget.maximum == 100e-6
    assert budget.minimum == 100e-6 / 16
    for _ in range(10):
        budget.missed(gave_up=1.0, now=1.0 + 2 * LATE * budget.maximum)  # a silence
    assert budget.value == budget.minimum
    budget.missed(gave_up=1.0, now=1.0 + budget.maximum)  # a near miss
    assert budget.value == 2 * budget.minimum
    for _ in range(10):
        budget.grow()
    assert budget.value == budget.maximum
    assert Budget(100e-6, 10e-6).minimum == 10e-6
    assert Budget(0.0, 10e-6).minimum == 0.0


def test_polls_that_keep_finding_work_still_let_the_loop_run_every_fair_streak() -> None:
    """A receiver whose polls always find something never suspends on its own: every
    FAIR_STREAK + 1st receive the poller gives the loop its turn instead (turn False,
    turn_and_poll -1.0), so other callbacks and I/O are not starved."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        poller = IdlePoller(loop, 100.0)
        events = EventQueue()

        def poll_once() -> bool:
            events.put(ConnectionClosed(1))
            return True

        turns = [poller.turn(time.perf_counter()) for _ in range(2 * (FAIR_STREAK + 1))]
        assert turns.count(False) == 2 and not turns[FAIR_STREAK] and not turns[-1]
        results = []
        for _ in range(2 * (FAIR_STREAK + 1)):
            results.append(poller.turn_and_poll(events._items, lambda _arg: poll_once(), None))
            events._items.clear()
        assert results.count(-1.0) == 2 and results[FAIR_STREAK] == -1.0

    _run(body())


def test_a_callers_own_ready_handle_does_not_count_as_other_work() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        poller = IdlePoller(loop, 100.0)
        assert poller.enabled
        assert not poller.others_ready()
        mine = loop.call_soon(lambda: None)
        now = time.perf_counter()
        assert not poller.others_ready(mine)
        assert poller.turn(now, mine)
        assert poller.turn(now, None, 1)  # one own callback ready: it
        assert poller.others_ready()
        assert not poller.turn(now)
        theirs = loop.call_soon(lambda: None)
        assert poller.others_ready(mine)
        assert not poller.turn(now, mine, 1)  # two ready, one of them the caller's
        assert poller.turn(now, mine, 2)
        # Nothing is polled while other work is ready.
        assert not poller.spin(lambda: True, mine)
        mine.cancel()
        theirs.cancel()

    _run(body())


class _QueuesWhenHashed:
    """A ready handle whose hash queues another callback: what a thread's
    ``call_soon_threadsafe`` does when it runs between two steps of a loop over the
    ready queue (or while a timer handle's ``__eq__`` runs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queued: list[asyncio.Handle] = []

    def __hash__(self) -> int:
        self.queued.append(self.loop.call_soon(lambda: None))
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


def test_a_callback_queued_while_the_ready_queue_is_read_is_no_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen: ``RuntimeError: deque mutated during iteration`` out of ``turn`` killed
    a node's dispatcher (64 ranks at start-up; the job hung). (``turn`` now counts the
    caller's ready callbacks instead of reading them; ``poll_looking`` still reads.)"""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        ready: Any = ready_queue(loop)
        handle = _QueuesWhenHashed(loop)
        mine = {handle}
        ready.appendleft(handle)  # never run: removed below, before the loop's next turn
        try:
            now = time.perf_counter()
            monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))
            poller = IdlePoller(loop, 100.0)
            before = len(handle.queued)
            poller.poll_looking(lambda: True, now, lambda: mine)
            assert len(handle.queued) > before
        finally:
            ready.remove(handle)
            for queued in handle.queued:
                queued.cancel()

    _run(body())


class _LoopWithoutReadyQueue:
    """Stands for an event loop that keeps no ``_ready`` deque (a future asyncio)."""


class _LoopWithOtherReady:
    """An event loop whose ``_ready`` is something else than asyncio's deque."""

    _ready = (object(),)


@pytest.mark.parametrize("stand_in", [_LoopWithoutReadyQueue, _LoopWithOtherReady])
def test_loop_without_a_readable_ready_queue_waits_without_polling(stand_in: type) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        fake: Any = stand_in()
        assert ready_queue(fake) is None
        poller = IdlePoller(fake, 1e6)
        assert not poller.enabled
        events = EventQueue()
        polled: list[str] = []

        def poll_once() -> bool:
            polled.append("poll")
            return True

        def step() -> bool:
            polled.append("spin")
            return True

        loop.call_later(0.01, events.put, ConnectionClosed(4))
        assert await poller.receive(events, poll_once) == ConnectionClosed(4)
        assert not poller.poll_now(events, poll_once)
        assert not poller.spin(step)
        assert poller.others_ready()
        assert polled == []

    _run(body())


# --------------------------------------------------------------------------- uvloop

ROUND_TRIPS = 50


def _run_on_uvloop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")
    loop = uvloop.new_event_loop()
    try:
        assert ready_queue(loop) is None
        loop.run_until_complete(asyncio.wait_for(main(), 60.0))
    finally:
        loop.close()


async def _event(endpoint: EndPoint, kind: type[Event]) -> Any:
    event = await asyncio.wait_for(endpoint.receive(), TIMEOUT)
    assert isinstance(event, kind), event
    return event


async def _make(name: str, **options: Any) -> Transport:
    made = create(name, **options)
    return await made if inspect.isawaitable(made) else made  # type: ignore[no-any-return]


async def _echo_round_trips(transport: Transport, peer: PeerProcess, every: int) -> None:
    """:data:`ROUND_TRIPS` pings to ``peer``'s echo server, a reply taken by
    ``receive_nowait`` for every ``every``-th ping (by ``receive`` if it has none yet)
    and by ``receive`` for the others; then ``peer`` and ``transport`` are stopped."""
    try:
        endpoint = await transport.new_endpoint()
        conn = await asyncio.wait_for(endpoint.connect(peer.address), TIMEOUT)
        await _event(endpoint, ConnectionOpened)  # the echo server connects back
        for i in range(ROUND_TRIPS):
            await conn.send([b"ping %d" % i])
            received = endpoint.receive_nowait() if i % every == 0 else None
            if received is None:
                received = await _event(endpoint, Received)
            assert isinstance(received, Received), received
            assert [bytes(f) for f in received.frames] == [b"ping %d" % i]
        await conn.close()
    finally:
        await peer.stop(TIMEOUT)
        await asyncio.wait_for(transport.close(), TIMEOUT)


@pytest.mark.parametrize("name", ["tcp", "shm"])
def test_transport_on_uvloop_exchanges_with_another_process_without_polling(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On uvloop (no readable ready queue) every receive is a plain wait: round trips
    with a peer process, whose links are the ones the transport would poll, work."""
    monkeypatch.setenv("HPCPROC_COOKIE", "test-cookie-for-busy-poll")

    async def main() -> None:
        transport = await _make(name, busy_poll_us=1e6)
        await _echo_round_trips(transport, await PeerProcess.start(name, timeout=30.0), every=2)

    _run_on_uvloop(main)


class _CountedWakes:
    """A ring reader that counts :meth:`wake` calls (everything else is the reader's)."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1
        self._reader.wake()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


@pytest.mark.parametrize("name", ["tcp", "shm"])
def test_a_receive_looks_at_idle_links_without_reading_or_waking_each(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint linked to three peer processes, ping-ponging with one: tcp reads
    only the sockets that are readable (not every link on every turn), shm does not
    wake the idle links' readers (nor keep their own polls going) on every receive;
    the idle peers still get their answers. Both used to cost every receive a pass
    over all links: 63 idle ones made an 8 B round trip 5x (tcp) and 4x (shm)
    slower."""
    monkeypatch.setenv("HPCPROC_COOKIE", "test-cookie-for-busy-poll")
    monkeypatch.setenv("HPCPROC_TICK", "60")  # no heartbeat on the idle links meanwhile
    rounds = 4 * FAIR_STREAK  # the loop runs now and then, the links' own polls too

    async def main() -> None:
        transport = await _make(name)
        peers = [await PeerProcess.start(name, timeout=30.0) for _ in range(3)]
        try:
            endpoint: Any = await transport.new_endpoint()
            conns = []
            for peer in peers:
                conns.append(await asyncio.wait_for(endpoint.connect(peer.address), TIMEOUT))
                await _event(endpoint, ConnectionOpened)  # the echo server connects back
            idle = [endpoint._links[peer.address] for peer in peers[1:]]
            reads = [0]
            for link in idle:
                if name == "tcp":
                    read = link._on_readable

                    def counted(read: Callable[[], None] = read) -> None:
                        reads[0] += 1
                        read()

                    link._on_readable = counted
                else:
                    link._reader = _CountedWakes(link._reader)
            for i in range(rounds):
                await conns[0].send([b"ping %d" % i])
                received = await _event(endpoint, Received)
                assert bytes(received.frames[0]) == b"ping %d" % i
            if name == "tcp":
                assert reads[0] < rounds // 10, reads  # was: every link on every turn
            else:
                wakes = [link._reader.wakes for link in idle]
                assert max(wakes) < rounds // 10, wakes  # was: every link on every receive
                polling = [link for link in endpoint._links.values() if link._polling]
                assert endpoint._spinning == len(polling)
            for conn in conns[1:]:
                await conn.send([b"late"])
                received = await _event(endpoint, Received)
                assert bytes(received.frames[0]) == b"late"
            for conn in conns:
                await conn.close()
        finally:
            for peer in peers:
                await peer.stop(TIMEOUT)
            await asyncio.wait_for(transport.close(), TIMEOUT)

    asyncio.run(asyncio.wait_for(main(), 60.0))


def test_mpi_transport_on_uvloop_exchanges_messages_without_polling() -> None:
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed")

    async def main() -> None:
        transport = await _make("mpi", busy_poll_us=1e6)
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            conn = await asyncio.wait_for(a.connect(b.address), TIMEOUT)
            await _event(b, ConnectionOpened)
            for i in range(ROUND_TRIPS):
                await conn.send([b"m %d" % i, bytes(40000)])  # a large one waits for MPI
                received = await _event(b, Received)
                assert bytes(received.frames[0]) == b"m %d" % i
        finally:
            await asyncio.wait_for(transport.close(), TIMEOUT)

    _run_on_uvloop(main)


# ---------------------------------------------------------------------- crowded CPUs


def test_more_ranks_on_the_host_than_cpus_never_poll() -> None:
    runnable = [1]
    crowded = Crowding("auto", ranks=4, cpus=2, machine_cpus=2, runnable=lambda: runnable[0])
    assert crowded.fixed is True
    assert crowded(0.0) and crowded(1.0)
    assert Crowding("auto", ranks=2, cpus=2, machine_cpus=2, runnable=lambda: 1).fixed is None


def test_ranks_bound_to_cpus_of_their_own_share_the_hosts_cpus_not_their_masks() -> None:
    from hpcproc import _host

    assert _host._shared_cpus(1, 2) == 2  # bound to one of the 2 CPUs it could have
    assert _host._shared_cpus(16, 64) == 64  # bound to a socket of a 64-CPU node
    assert _host._shared_cpus(2, 2) == 2  # unbound: the ranks share its mask
    assert _host._shared_cpus(3, None) == 3  # nothing else known
    assert _host.parse_cpu_list("0-3,8,10-11\n") == 7
    assert _host.parse_cpu_list("5") == 1
    for bad in ("zero", "3-1"):
        with pytest.raises(ValueError):
            _host.parse_cpu_list(bad)
    assert _host.shared_cpus() >= _host.usable_cpus()


def test_the_cgroups_cpus_are_read_from_either_cgroup_version(tmp_path: Path) -> None:
    from hpcproc import _host

    membership = tmp_path / "cgroup"
    root = tmp_path / "fs"
    # v1: a cpuset hierarchy of its own (effective_cpus first, else cpus).
    membership.write_text("9:memory:/job\nbroken line\n3:cpuset,cpuacct:/job/step\n")
    (root / "cpuset/job/step").mkdir(parents=True)
    (root / "cpuset/job/step/cpuset.cpus").write_text("0-7\n")
    assert _host._cgroup_cpus(membership, str(root)) == 8
    (root / "cpuset/job/step/cpuset.effective_cpus").write_text("2-3\n")
    assert _host._cgroup_cpus(membership, str(root)) == 2
    # v2: one unified hierarchy.
    membership.write_text("0::/slurm/job_7/step_0\n")
    (root / "slurm/job_7/step_0").mkdir(parents=True)
    (root / "slurm/job_7/step_0/cpuset.cpus.effective").write_text("0,4-5\n")
    assert _host._cgroup_cpus(membership, str(root)) == 3
    # Nothing readable: unknown, not an error.
    assert _host._cgroup_cpus(tmp_path / "absent", str(root)) is None
    membership.write_text("0::/elsewhere\n")
    assert _host._cgroup_cpus(membership, str(root)) is None


# One write per rank: with PYTHONUNBUFFERED set (as in a CI run), print writes its pieces one
# by one, and the two ranks' lines came out interleaved ("PROBEPROBE [...]" in 10 of
# 30 runs).
_CROWDING_PROBE = (
    "import json, sys; from hpcproc import _host; from hpcproc.transports import _busy_poll; "
    "sys.stdout.write('PROBE ' + json.dumps([_host.ranks_on_host(), _host.usable_cpus(), "
    "_host.shared_cpus(), _busy_poll.crowding().fixed]) + '\\n'); sys.stdout.flush()"
)


@pytest.mark.parametrize("bind", [True, False], ids=["bound-to-a-core-each", "unbound"])
def test_a_launchers_ranks_are_oversubscribed_only_when_they_outnumber_the_cpus(
    bind: bool,
) -> None:
    """Real ranks of ``mpiexec``: two ranks bound to a core each (``-bind-to core``)
    are not oversubscribed (they were taken for it: mask 1 < 2 ranks, and every
    receive then yielded the CPU); more unbound ranks than CPUs are."""
    import json
    import subprocess
    import sys

    pytest.importorskip("mpi4py", reason="needs the mpich wheel's mpiexec")
    from .test_mpi_two_ranks import mpiexec

    cpus = len(os.sched_getaffinity(0))
    if cpus < 2 or (not bind and cpus > 8):
        pytest.skip(f"needs 2 to 8 CPUs, this process has {cpus}")
    ranks = 2 if bind else cpus + 1
    command = [mpiexec(), "-n", str(ranks), *(["-bind-to", "core"] if bind else [])]
    env = {k: v for k, v in os.environ.items() if k != _busy_poll.YIELD_ENV}
    done = subprocess.run(
        [*command, sys.executable, "-c", _CROWDING_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert len(rows) == ranks, done.stdout + done.stderr
    for on_host, mask, shared, fixed in rows:
        assert on_host == ranks
        if bind:
            assert (mask, shared, fixed) == (1, cpus, None)
        else:
            assert (mask, shared, fixed) == (cpus, cpus, True)


def test_the_environment_variable_forces_either_way_and_a_bad_value_names_it() -> None:
    assert Crowding("1", runnable=lambda: 0)(0.0) is True
    assert Crowding("0", ranks=64, cpus=2, runnable=lambda: 99)(0.0) is False
    with pytest.raises(ValueError, match=YIELD_ENV):
        Crowding("sometimes")


def test_more_other_runnable_tasks_than_cpus_is_crowded_for_a_while() -> None:
    runnable = [3]  # this process and as many others as CPUs
    crowded = Crowding("auto", ranks=2, cpus=2, machine_cpus=2, runnable=lambda: runnable[0])
    now = 0.0
    assert not crowded(now)
    runnable[0] = 4
    assert not crowded(now + CROWD_PERIOD / 2)  # read at most once per period
    for _ in range(CROWD_SAMPLES - 1):  # a burst is not a trend
        now += CROWD_PERIOD
        assert not crowded(now)
    now += CROWD_PERIOD
    assert crowded(now)
    runnable[0] = 3
    assert crowded(now + CROWD_HOLD / 2)  # held, whatever the count now
    now += CROWD_HOLD
    for _ in range(CROWD_SAMPLES - 1):  # a rank asleep for a moment is not the end
        assert crowded(now)
        now += CROWD_PERIOD
    assert not crowded(now)
    runnable_unknown = Crowding("auto", machine_cpus=2, runnable=lambda: None)
    assert not runnable_unknown(0.0)


def test_linked_peers_bound_within_this_processs_cpus_crowd_them_while_linked() -> None:
    """Peers (by pid) whose affinity masks lie within this process's own, with it,
    outnumbering those CPUs: crowded, whatever the machine-wide count, until the last
    link to one of them is gone; then the count decides again."""
    runnable = [1]
    two = frozenset({0, 1})
    crowding = Crowding("auto", machine_cpus=2, runnable=lambda: runnable[0], own_cpus=two)
    assert not crowding(0.0)
    crowding.peer_linked(101, two)
    crowding.peer_linked(101, two)  # a second link to the same process counts once
    crowding.peer_linked(102, frozenset({1, 2}))  # not within ours: may run elsewhere
    crowding.peer_linked(103, None)  # mask unknown
    assert not crowding.confined and not crowding(1.0)
    crowding.peer_linked(104, frozenset({1}))  # three processes on two CPUs
    assert crowding.confined and crowding.crowded
    assert crowding(2.0) and crowding.next_check == float("inf")
    crowding.peer_unlinked(101)
    assert crowding(3.0)  # one link to 101 is left
    crowding.peer_unlinked(101)
    assert not crowding.confined and not crowding.crowded
    assert crowding.next_check == float("-inf")  # the count is read at the next look
    runnable[0] = 4
    now = 4.0
    for _ in range(CROWD_SAMPLES - 1):
        assert not crowding(now)
        now += CROWD_PERIOD
    assert crowding(now)  # the count crowds it again by itself


def test_a_peer_bound_to_this_processs_one_cpu_crowds_it_unless_forced_or_unknown() -> None:
    one = frozenset({3})
    for mode, own, confined in (("auto", one, True), ("0", one, False), ("auto", None, False)):
        crowding = Crowding(mode, machine_cpus=8, runnable=lambda: 1, own_cpus=own)
        crowding.peer_linked(7, one)
        assert crowding.confined is confined and crowding(0.0) is confined
        crowding.peer_unlinked(7)
        assert not crowding(1.0)
    forced = Crowding("1", runnable=lambda: 0, own_cpus=one)
    forced.peer_linked(7, one)
    forced.peer_unlinked(7)
    assert forced(0.0)  # forced crowded stays so
    oversubscribed = Crowding("auto", ranks=4, cpus=2, runnable=lambda: 0, own_cpus=one)
    oversubscribed.peer_linked(7, one)
    oversubscribed.peer_unlinked(7)
    assert oversubscribed(0.0)  # the launcher's answer holds for the whole job
    unlinked = Crowding("auto", machine_cpus=8, runnable=lambda: 1, own_cpus=one)
    unlinked.peer_unlinked(9)  # never linked: nothing to undo
    assert unlinked.count_link(0) == 0  # not a process of this host: nothing counted
    assert not unlinked(0.0)


def test_the_crowd_lasts_as_long_as_the_count_says_so() -> None:
    """Past its hold a crowd is not ended by the first reading, nor by a single
    reading under the CPU count among readings over it."""
    runnable = [4]
    crowded = Crowding("auto", ranks=2, cpus=2, machine_cpus=2, runnable=lambda: runnable[0])
    now = 0.0
    for _ in range(CROWD_SAMPLES):
        crowded(now)
        now += CROWD_PERIOD
    assert crowded(now)
    for _ in range(5):  # five holds' worth, every reading over the CPU count
        now += CROWD_HOLD
        assert crowded(now)
    for _ in range(5):  # then one reading under it per hold
        now += CROWD_HOLD
        runnable[0] = 3
        assert crowded(now)
        runnable[0] = 4
        for _ in range(CROWD_SAMPLES):
            now += CROWD_PERIOD
            assert crowded(now)
    # Crowded all along, seen every millisecond for 20 holds.
    assert all(crowded(now + ms * 1e-3) for ms in range(1, int(20 * CROWD_HOLD * 1e3)))


def test_a_spin_that_runs_out_gives_the_cpu_away_and_looks_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the end of its budget a spin (and the mpi receive's ``turn_and_poll``) gives
    the CPU away once and looks again: what came meanwhile (from a task the spin kept
    from the CPU) is taken, and for the receive counts as a near miss (its budget
    doubles); with nothing, it gives up as before."""
    yielded: list[None] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yielded.append(None))

    async def body() -> None:
        events = EventQueue()
        poller = IdlePoller(asyncio.get_running_loop(), 20.0)
        assert poller.spin(lambda: bool(yielded))  # true only once the CPU was given away
        assert len(yielded) == 1
        yielded.clear()
        assert not poller.spin(lambda: False)
        assert len(yielded) == 1
        yielded.clear()

        def comes_once_yielded(_: object) -> bool:
            if yielded and not events:
                events.put(ConnectionClosed(3))
            return True

        poller.budget.value = poller.budget.maximum / 4  # (shrunk by a silence)
        assert poller.turn_and_poll(events._items, comes_once_yielded, None) == 0.0
        assert (len(yielded), events.pop_ready()) == (1, ConnectionClosed(3))
        assert poller.budget.value == poller.budget.maximum / 2  # a near miss: doubled
        yielded.clear()
        assert poller.turn_and_poll(events._items, lambda _: True, None) > 0  # gave up
        assert len(yielded) == 1

    _run(body())


def test_a_crowded_machine_polls_by_yielding_the_cpu_between_looks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On crowded CPUs a receive still polls, but gives the CPU away between two
    looks; a wait that is not a receive (``spin``) does not poll at all."""
    monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))
    yields: list[None] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(None))

    async def body() -> None:
        loop = asyncio.get_running_loop()
        events = EventQueue()
        poll_once = _FindsOnTheThird(events)
        poller = IdlePoller(loop, 1e6)
        assert poller.polling_off(0.0)
        assert not poller.spin(lambda: True)
        assert await poller.receive(events, poll_once) == ConnectionClosed(7)
        assert poll_once.calls == 3
        assert len(yields) == 2  # between the looks, not after the one that found it

    _run(body())


def test_starved_spins_stop_spinning_for_a_while_but_not_a_yielding_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spins starved of the CPU, :data:`STARVED_POLLS` in a row, turn spinning off for
    :data:`NO_POLL_PERIOD` (the peer needs that CPU); on crowded CPUs a receive polls
    by yielding all the same, since it gives the CPU away between its looks."""
    yields: list[None] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(None))

    def starve(poller: IdlePoller, now: float, times: int = STARVED_POLLS) -> IdlePoller:
        for _ in range(times):
            poller.probed(now, True)
        return poller

    async def body() -> None:
        loop = asyncio.get_running_loop()
        events = EventQueue()
        monkeypatch.setattr(_busy_poll, "_crowding", Crowding("0"))
        now = time.perf_counter()
        # A preemption is not a trend; a few in a row are, for a while.
        assert not starve(IdlePoller(loop, 1e6), now, STARVED_POLLS - 1).polling_off(now)
        poller = starve(IdlePoller(loop, 1e6), now)
        assert poller.polling_off(now) and not poller.polling_off(now + NO_POLL_PERIOD)
        # Starved an hour from now: off for the rest of the test, however slow it runs.
        later = time.perf_counter() + 3600
        poller = starve(IdlePoller(loop, 1e6), later)
        poll_once = _CountedPolls()
        assert not poller.poll_now(events, poll_once)
        assert poll_once.calls == 0
        assert not poller.turn(time.perf_counter())

        monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))
        poller = starve(IdlePoller(loop, 1e6), later)
        assert poller.turn(time.perf_counter())
        poll_once = _FindsOnTheThird(events)
        assert await poller.receive(events, poll_once) == ConnectionClosed(7)
        assert (poll_once.calls, len(yields)) == (3, 2)
        looks: list[None] = []
        assert poller.poll_looking(lambda: bool(looks.append(None)) or len(looks) == 2, 0.0)
        assert len(looks) == 2

    _run(body())


class _CountedPolls:
    """A ``poll_once`` that finds nothing (but has links to poll), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return True


def test_a_yielding_poll_gives_up_after_its_budget_which_then_halves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))
    monkeypatch.setattr(os, "sched_yield", lambda: None)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        events = EventQueue()
        poll_once = _CountedPolls()

        poller = IdlePoller(loop, 1e6)
        full = poller.yield_budget.value
        loop.call_later(0.01, events.put, ConnectionClosed(4))  # a timer: the loop runs
        assert await poller.receive(events, poll_once) == ConnectionClosed(4)
        assert poll_once.calls > 1
        assert poller.yield_budget.value == full / 2

    _run(body())


def test_a_poller_that_does_not_yield_does_not_poll_on_crowded_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A routing endpoint's sub-endpoints: the routing endpoint polls for them."""
    monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))

    async def body() -> None:
        loop = asyncio.get_running_loop()
        events = EventQueue()
        poll_once = _CountedPolls()

        poller = IdlePoller(loop, 1e6, yields=False)
        loop.call_later(0.01, events.put, ConnectionClosed(4))
        assert await poller.receive(events, poll_once) == ConnectionClosed(4)
        assert not poller.poll_now(events, poll_once)
        assert poll_once.calls == 0
        # poll_looking polls for it all the same...
        looks = 0

        def look() -> bool:
            nonlocal looks
            looks += 1
            return looks == 2

        assert poller.poll_looking(look, time.perf_counter())
        assert looks == 2

    _run(body())


def test_poll_looking_leaves_uncrowded_cpus_and_busy_loops_to_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        poller = IdlePoller(loop, 1e6)
        looked: list[None] = []

        def look() -> bool:
            looked.append(None)
            return True

        assert not poller.poll_looking(look, time.perf_counter())  # not crowded (fixture)
        monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))
        poller = IdlePoller(loop, 1e6)
        handle = loop.call_soon(lambda: None)
        assert not poller.poll_looking(look, time.perf_counter())  # another callback
        assert poller.poll_looking(look, time.perf_counter(), lambda: {handle})  # ours
        assert looked == [None]

        # The one handle found ours is remembered (not asked about at every wait)...
        def not_asked() -> set[object]:
            raise AssertionError("the remembered handle was asked about again")

        assert poller.poll_looking(look, time.perf_counter(), not_asked)
        # ...and another one alone in the queue is not taken for it.
        ready: Any = ready_queue(loop)
        handle.cancel()
        ready.remove(handle)  # as if the loop had run it
        other = loop.call_soon(lambda: None)
        try:
            assert not poller.poll_looking(look, time.perf_counter(), lambda: {handle})
            assert looked == [None, None]
        finally:
            other.cancel()

    _run(body())


def test_routing_on_crowded_cpus_takes_replies_over_shm_and_tcp_without_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On crowded CPUs a routing endpoint's ``receive_nowait`` polls both of its
    sub-endpoints: replies of a peer process on this host (shm) and of one that
    routes as if on another host (tcp) are all taken, once each and in order, by
    ``receive_nowait`` alone, while the event loop never runs."""
    monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))
    monkeypatch.setenv("HPCPROC_COOKIE", "test-cookie-for-busy-poll")
    count = 50

    async def main() -> None:
        transport = await _make("shm+tcp")
        near = await PeerProcess.start("shm+tcp", timeout=30.0)
        far = await PeerProcess.start("shm+tcp", options={"separate_hosts": True}, timeout=30.0)
        try:
            endpoint = await transport.new_endpoint()
            conns = {}
            for name, peer in (("near", near), ("far", far)):
                conns[name] = await asyncio.wait_for(endpoint.connect(peer.address), TIMEOUT)
                await _event(endpoint, ConnectionOpened)  # the echo server connects back
            # Ours go over shm to both (same host); far's connection back comes over tcp.
            assert {endpoint.transport_for(p.address) for p in (near, far)} == {"shm"}
            ready = ready_queue(asyncio.get_running_loop())
            assert ready is not None
            for _ in range(1000):  # let the loop settle: polls only while it is idle
                if not ready:
                    break
                await asyncio.sleep(0)
            deadline = time.monotonic() + TIMEOUT
            # From here on, no await: the event loop does not run. One message at a
            # time (several replies taken at once would wake the endpoint's waiting
            # receive for the rest, and the loop would have to run).
            for i in range(count):
                for name, conn in conns.items():
                    ping = b"%s %d" % (name.encode(), i)
                    assert conn.send_nowait([ping])
                    event = None
                    while event is None:
                        event = endpoint.receive_nowait()
                        assert time.monotonic() < deadline, f"no reply to {ping!r}"
                    assert isinstance(event, Received), event
                    assert [bytes(f) for f in event.frames] == [ping]
            for conn in conns.values():
                await conn.close()
        finally:
            await near.stop(TIMEOUT)
            await far.stop(TIMEOUT)
            await asyncio.wait_for(transport.close(), TIMEOUT)

    asyncio.run(asyncio.wait_for(main(), 60.0))


@pytest.mark.parametrize("budget", [1e6, 0.0], ids=["polling budget", "no budget"])
def test_a_crowded_idle_loop_gives_the_cpu_away_only_when_asked_and_only_if_idle(
    budget: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``yield_if_crowded`` (and ``spin(..., yield_when_crowded=True)``) give the CPU
    away on crowded CPUs while the loop has nothing else to run; a plain ``spin`` never
    does, a loop with another ready callback never does, and uncrowded CPUs never do."""
    yields = []
    monkeypatch.setattr(_busy_poll.os, "sched_yield", lambda: yields.append(1))

    async def body() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))
        crowded = IdlePoller(loop, budget)
        assert not crowded.spin(lambda: True)  # not asked to yield
        assert yields == []
        assert crowded.yield_if_crowded()
        if crowded.enabled:
            assert not crowded.spin(lambda: True, yield_when_crowded=True)
        assert len(yields) == (2 if crowded.enabled else 1)
        handle = loop.call_soon(lambda: None)  # another callback is ready: no yield
        assert not crowded.yield_if_crowded()
        assert not crowded.spin(lambda: True, yield_when_crowded=True)
        assert crowded.yield_if_crowded(ours=handle)  # ...unless it is the caller's own
        handle.cancel()
        await asyncio.sleep(0)  # (the loop drops the cancelled handle)
        monkeypatch.setattr(_busy_poll, "_crowding", Crowding("0"))
        yields.clear()
        uncrowded = IdlePoller(loop, budget)
        assert not uncrowded.yield_if_crowded()
        assert uncrowded.spin(lambda: True, yield_when_crowded=True) is uncrowded.enabled
        assert yields == []

    _run(body())


def test_the_launchers_rank_count_per_host_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcproc import _host

    for name in [k for k in os.environ if k.startswith(("SLURM_", "PMI_", "OMPI_", "HPCPROC_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    _host.ranks_on_host.cache_clear()
    try:
        assert _host.ranks_on_host() == 4
        monkeypatch.delenv("OMPI_COMM_WORLD_RANK")
        monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
        _host.ranks_on_host.cache_clear()
        assert _host.ranks_on_host() is None  # no launcher: a local run
    finally:
        _host.ranks_on_host.cache_clear()
    assert _host.usable_cpus() >= 1


def test_routing_whose_network_part_cannot_be_looked_at_leaves_its_shm_rings_awake_to_wake_ups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On crowded CPUs, a routing endpoint whose network sub-endpoint cannot be polled
    with the local one (``shm+mpi``, ``shm+ucx``; here tcp made so) does not poll, and
    leaves the shm links as it found them: a peer's replies still wake it up."""
    from hpcproc.transports import tcp

    monkeypatch.setattr(_busy_poll, "_crowding", Crowding("1"))
    monkeypatch.setattr(tcp._TcpEndPoint, "_looker", lambda self: None)
    monkeypatch.setenv("HPCPROC_COOKIE", "test-cookie-for-busy-poll")

    async def main() -> None:
        transport = await _make("shm+tcp")
        await _echo_round_trips(transport, await PeerProcess.start("shm+tcp", timeout=30.0), 1)

    asyncio.run(asyncio.wait_for(main(), 60.0))


# ------------------------------------------------------- processes bound to CPUs

_BOUND_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    os.sched_setaffinity(0, {int(cpu) for cpu in sys.argv[2].split(",")})
    from hpcproc.transports import ConnectionClosed, ConnectionOpened, Received, create
    from hpcproc.transports._busy_poll import crowding as process_crowding

    async def next_event(endpoint, kind):
        event = await asyncio.wait_for(endpoint.receive(), 10)
        assert isinstance(event, kind), event
        return event

    async def main():
        transport = create(sys.argv[3])
        endpoint = await transport.new_endpoint()
        crowding = process_crowding()
        if sys.argv[1] == "listen":
            print(endpoint.address.decode(), flush=True)
            opened = await next_event(endpoint, ConnectionOpened)
            theirs = bytes((await next_event(endpoint, Received)).frames[0]).decode()
            mine = crowding.confined  # while the link lives
            back = await endpoint.connect(opened.remote_address, timeout=10)
            await back.send([b"done"])
            await next_event(endpoint, ConnectionClosed)
        else:
            conn = await endpoint.connect(sys.argv[4].encode(), timeout=10)
            await conn.send([str(crowding.confined).encode()])
            await next_event(endpoint, ConnectionOpened)
            await next_event(endpoint, Received)  # the listener has looked
            await conn.close()
            theirs = mine = None
        await transport.close()
        print(mine, theirs, crowding.confined, flush=True)

    asyncio.run(main())
    """
)


def _two_cpus() -> tuple[str, str, str]:
    """Two CPUs this process may run on, and all of them, as CPU lists."""
    mask = sorted(os.sched_getaffinity(0))
    return str(mask[0]), str(mask[1]), ",".join(map(str, mask))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("name", ["shm", "tcp"])
@pytest.mark.parametrize(
    ("listener", "dialer", "mode", "confined"),
    [
        ("first", "first", "auto", True),
        ("first", "second", "auto", False),
        ("all", "all", "auto", False),
        ("first", "all", "auto", False),
        ("first", "first", "0", False),
    ],
)
def test_processes_bound_to_one_cpu_poll_by_yielding_while_they_are_linked(
    name: str, listener: str, dialer: str, mode: str, confined: bool
) -> None:
    """Two real processes, each bound to CPUs by its own affinity mask, linked by
    ``name`` (shm knows its peer's pid from the socket, tcp from the handshake):
    each counts its CPUs as crowded (its receives then poll by yielding) exactly while
    the link lives and only when both are bound to the same single CPU, which the
    machine-wide count of runnable tasks does not show (an 8 B shm round trip there
    took 245 us spinning, 10 us yielding). ``HPCPROC_YIELD_WHEN_IDLE=0`` overrides."""
    first, second, every = _two_cpus()
    cpus = {"first": first, "second": second, "all": every}
    env = {**os.environ, "HPCPROC_YIELD_WHEN_IDLE": mode}

    async def child(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BOUND_CHILD, *args, stdout=subprocess.PIPE, cwd=ROOT, env=env
        )

    async def main() -> tuple[list[str], list[str]]:
        listening = await child("listen", cpus[listener], name)
        dialing = None
        try:
            assert listening.stdout is not None
            address = await asyncio.wait_for(listening.stdout.readline(), TIMEOUT)
            dialing = await child("dial", cpus[dialer], name, address.decode().strip())
            outs = [await asyncio.wait_for(p.communicate(), TIMEOUT) for p in (listening, dialing)]
            assert listening.returncode == dialing.returncode == 0
            return outs[0][0].decode().split(), outs[1][0].decode().split()
        finally:
            for proc in (listening, dialing):
                if proc is not None and proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    listened, dialed = asyncio.run(main())
    # The listener's view and the dialer's, both while linked; then each after closing.
    assert listened == [str(confined), str(confined), "False"]
    assert dialed == ["None", "None", "False"]
