"""Conformance scenarios of the mpi transport across two MPI ranks (two OS processes).

Run under a launcher with pytest-mpi, every rank running every test in the same order::

    mpiexec -n 2 python -m pytest --with-mpi tests/mpi/two_rank_scenarios.py
    srun --mpi=pmi2 -N 2 -n 2 python -m pytest --with-mpi tests/mpi/two_rank_scenarios.py

``tests/test_mpi_two_ranks.py`` and ``tests/test_mpi_slurm.py`` do that from a normal
pytest run. The file name does not match ``test_*.py`` on purpose: a plain pytest run
must not collect it in a single process.

Each scenario is SPMD: both ranks run it; they exchange endpoint addresses and meet at
barriers through ``COMM_WORLD`` (the transport uses its own duplicate communicator).
Every wait is bounded, so a rank whose peer failed fails too instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import numpy as np
import pytest

from hpcproc import serialization
from hpcproc import transports as registry
from hpcproc.transports.base import (
    Buffer,
    ConnectError,
    ConnectErrorCode,
    Connection,
    ConnectionClosed,
    ConnectionOpened,
    EndPoint,
    EndPointAddress,
    EndPointClosed,
    ErrorEvent,
    Event,
    EventErrorCode,
    Received,
    SendError,
    SendErrorCode,
    Transport,
)

MPI = pytest.importorskip("mpi4py.MPI")

pytestmark = pytest.mark.mpi(min_size=2)

T = TypeVar("T")
E = TypeVar("E")
WAIT = 20.0  # bound on any single wait
SCENARIO = 90.0  # bound on a whole scenario
MiB = 1 << 20

world = MPI.COMM_WORLD
rank = world.Get_rank()
peer_rank = 1 - rank


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run one scenario in a fresh event loop, bounded."""
    asyncio.run(asyncio.wait_for(scenario(), SCENARIO))


async def bounded(awaitable: Awaitable[T], what: str) -> T:
    try:
        return await asyncio.wait_for(awaitable, WAIT)
    except asyncio.TimeoutError:
        raise AssertionError(f"rank {rank}: {what} did not finish within {WAIT} s") from None


async def barrier(what: str = "barrier") -> None:
    """Meet the other rank without blocking the event loop (the transport keeps running)."""
    request = world.Ibarrier()

    async def done() -> None:
        while not request.Test():
            await asyncio.sleep(0.0005)

    await bounded(done(), what)


async def exchange(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank; the ranks meet first, so it cannot deadlock."""
    await barrier("exchange")
    return list(world.allgather(value))


async def receive(endpoint: EndPoint, kind: type[E]) -> E:
    event = await bounded(endpoint.receive(), f"waiting for {kind.__name__}")
    assert isinstance(event, kind), f"rank {rank}: expected {kind.__name__}, got {event!r}"
    return event


async def peer_address(endpoint: EndPoint) -> EndPointAddress:
    """The address of the other rank's endpoint that matches ``endpoint``."""
    return EndPointAddress((await exchange(bytes(endpoint.address)))[peer_rank])


async def connected_both_ways(endpoint: EndPoint) -> Connection:
    """Connect ``endpoint`` to its peer on the other rank, which connects back; returns
    this side's connection once the peer's has been opened."""
    conn = await bounded(endpoint.connect(await peer_address(endpoint)), "connect()")
    await receive(endpoint, ConnectionOpened)
    return conn


async def new_transport() -> Transport:
    return registry.create("mpi")


class Scene:
    """One transport and endpoints per rank; closes everything at the end, bounded."""

    def __init__(self) -> None:
        self.transport: Transport | None = None

    async def __aenter__(self) -> Scene:
        self.transport = await new_transport()
        return self

    async def endpoint(self) -> EndPoint:
        assert self.transport is not None
        return await self.transport.new_endpoint()

    async def __aexit__(self, *exc: object) -> None:
        assert self.transport is not None
        # Both ranks finish their part before either closes, unless one already failed.
        if exc[0] is None:
            await barrier("end of scenario")
        await bounded(self.transport.close(), "transport close()")


async def drain_until_closed(endpoint: EndPoint) -> None:
    """Receive until ``EndPointClosed`` (events of the peer's close may come first)."""
    for _ in range(100):
        event = await bounded(endpoint.receive(), "EndPointClosed")
        if isinstance(event, EndPointClosed):
            return
    raise AssertionError(f"rank {rank}: no EndPointClosed")


def as_buffer(array: np.ndarray[Any, Any]) -> Buffer:
    """A numpy array as a frame (numpy's stubs lack the buffer protocol before 3.12)."""
    return cast(Buffer, array)


def frames_of(event: Event) -> list[bytes]:
    assert isinstance(event, Received), f"rank {rank}: expected Received, got {event!r}"
    return [bytes(f) for f in event.frames]


# --------------------------------------------------------------------------- scenarios


def test_ping_pong_across_ranks_arrives_in_order() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            addresses = await exchange(bytes(ep.address))
            other = EndPointAddress(addresses[peer_rank])
            conn = await bounded(ep.connect(other), "connect()")
            opened = await receive(ep, ConnectionOpened)
            assert opened.remote_address == other
            pings = 300
            for i in range(pings):
                if rank == 0:
                    await bounded(conn.send([b"ping %d" % i]), "send()")
                    assert frames_of(await bounded(ep.receive(), "pong")) == [b"pong %d" % i]
                else:
                    assert frames_of(await bounded(ep.receive(), "ping")) == [b"ping %d" % i]
                    await bounded(conn.send([b"pong %d" % i]), "send()")
            await barrier()
            await conn.close()
            closed = await receive(ep, ConnectionClosed)
            assert closed.conn_id == opened.conn_id

    run(scenario)


def messages_from(sender: int) -> list[list[bytes]]:
    """What ``sender`` sends in the frame-boundary scenario (the receiver rebuilds it)."""
    rng = np.random.default_rng(5 + sender)
    return [
        [],
        [b""],
        [b"", b"", b""],
        [b"x"],
        [rng.bytes(32 * 1024 - 8)],  # around the inline limit
        [rng.bytes(32 * 1024), b""],
        [b"head", rng.bytes(16 * MiB), b"", rng.bytes(3)],
        [rng.bytes(1 * MiB + 1)],
    ]


def test_frame_boundaries_across_ranks_for_empty_tiny_inline_limit_and_huge_frames() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            conn = await connected_both_ways(ep)
            for message in messages_from(rank):
                await bounded(conn.send(message), "send()")
            for message in messages_from(peer_rank):
                event = await receive(ep, Received)
                assert [len(f) for f in event.frames] == [len(f) for f in message]
                assert frames_of(event) == message

    run(scenario)


def test_many_connections_across_ranks_keep_per_connection_order() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            other = await peer_address(ep)
            n, per = 300, 5
            conns = [await bounded(ep.connect(other), "connect()") for _ in range(n)]
            for round_ in range(per):
                for i, conn in enumerate(conns):
                    await bounded(conn.send([b"%d" % i, b"%d" % round_]), "send()")
            for conn in conns:
                await conn.close()
            ids: dict[int, int] = {}
            seen: dict[int, list[int]] = {}
            closed: set[int] = set()
            for _ in range(n * (per + 2)):
                event = await bounded(ep.receive(), "event")
                if isinstance(event, ConnectionOpened):
                    ids[event.conn_id] = -1
                    seen[event.conn_id] = []
                elif isinstance(event, Received):
                    assert event.conn_id in ids and event.conn_id not in closed
                    which, round_ = (int(bytes(f)) for f in event.frames)
                    if ids[event.conn_id] == -1:
                        ids[event.conn_id] = which
                    assert ids[event.conn_id] == which, "messages of two connections mixed"
                    seen[event.conn_id].append(round_)
                else:
                    assert isinstance(event, ConnectionClosed), f"unexpected {event!r}"
                    closed.add(event.conn_id)
            assert closed == set(ids)
            assert all(rounds == list(range(per)) for rounds in seen.values())
            assert sorted(ids.values()) == list(range(n))

    run(scenario)


def test_several_endpoints_per_rank_reach_every_other_endpoint() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            mine = [await s.endpoint() for _ in range(3)]
            everyone = await exchange([bytes(e.address) for e in mine])
            addresses = [EndPointAddress(a) for per_rank in everyone for a in per_rank]
            for ep in mine:
                for target in addresses:
                    conn = await bounded(ep.connect(target), "connect()")
                    await bounded(conn.send([ep.address, target]), "send()")
                    await conn.close()
            for ep in mine:
                senders: dict[int, bytes] = {}
                payloads: dict[int, list[bytes]] = {}
                closed: set[int] = set()
                for _ in range(3 * len(addresses)):
                    event = await bounded(ep.receive(), "event")
                    if isinstance(event, ConnectionOpened):
                        senders[event.conn_id] = bytes(event.remote_address)
                    elif isinstance(event, Received):
                        assert event.conn_id in senders and event.conn_id not in closed
                        payloads[event.conn_id] = frames_of(event)
                    else:
                        assert isinstance(event, ConnectionClosed), f"unexpected {event!r}"
                        assert event.conn_id in payloads
                        closed.add(event.conn_id)
                assert closed == set(senders)
                for conn_id, (source, target_address) in payloads.items():
                    assert source == senders[conn_id] and target_address == ep.address
                assert sorted(senders.values()) == sorted(bytes(a) for a in addresses)

    run(scenario)


def test_connect_to_missing_or_closed_endpoint_on_other_rank_raises_not_found() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            doomed = await s.endpoint()
            everyone = await exchange([bytes(ep.address), bytes(doomed.address)])
            await doomed.close()
            await barrier("closed")
            _, closed_address = everyone[peer_rank]
            with pytest.raises(ConnectError) as info:
                await bounded(ep.connect(EndPointAddress(closed_address)), "connect()")
            assert info.value.code is ConnectErrorCode.NOT_FOUND
            never = b"mpi:%d:999999" % peer_rank
            with pytest.raises(ConnectError) as info:
                await bounded(ep.connect(EndPointAddress(never)), "connect()")
            assert info.value.code is ConnectErrorCode.NOT_FOUND
            with pytest.raises(ConnectError) as info:
                await bounded(ep.connect(EndPointAddress(b"mpi:7:1")), "connect()")
            assert info.value.code is ConnectErrorCode.NOT_FOUND
            with pytest.raises(ConnectError) as info:
                await bounded(ep.connect(EndPointAddress(b"mpi:one:1")), "connect()")
            assert info.value.code is ConnectErrorCode.FAILED

    run(scenario)


def test_crossing_connects_across_ranks_both_succeed() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            for attempt in range(20):
                ep = await s.endpoint()
                other = await peer_address(ep)
                conn = await bounded(ep.connect(other), f"crossed connect {attempt}")
                await bounded(conn.send([b"%d" % attempt]), "send()")
                opened = await receive(ep, ConnectionOpened)
                assert opened.remote_address == other
                assert frames_of(await receive(ep, Received)) == [b"%d" % attempt]
                await barrier()
                await ep.close()
                await drain_until_closed(ep)

    run(scenario)


def test_break_connection_is_reported_on_both_ranks_and_a_new_connect_starts_a_new_bundle() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            conn = await connected_both_ways(ep)
            other = conn.remote_address
            await bounded(conn.send([b"before"]), "send()")
            assert frames_of(await receive(ep, Received)) == [b"before"]
            await barrier("both delivered")
            if rank == 0:
                assert s.transport is not None
                await s.transport.break_connection(ep.address, other)
            lost = await receive(ep, ErrorEvent)
            assert lost.error.code is EventErrorCode.CONNECTION_LOST
            assert lost.error.remote_address == other
            with pytest.raises(SendError) as info:
                await bounded(conn.send([b"old bundle"]), "send()")
            assert info.value.code is SendErrorCode.FAILED
            await barrier("both saw the break")
            # A new bundle; nothing of the old one may appear on it.
            if rank == 0:
                fresh = await bounded(ep.connect(other), "reconnect")
                await bounded(fresh.send([b"after"]), "send()")
            else:
                opened = await receive(ep, ConnectionOpened)
                assert opened.remote_address == other
                assert frames_of(await receive(ep, Received)) == [b"after"]
            await barrier("new bundle used")
            if rank == 1:
                back = await bounded(ep.connect(other), "connect back on the new bundle")
                await bounded(back.send([b"back"]), "send()")
            else:
                await receive(ep, ConnectionOpened)
                assert frames_of(await receive(ep, Received)) == [b"back"]

    run(scenario)


def test_messages_in_flight_when_the_bundle_breaks_are_never_delivered() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            other = await peer_address(ep)
            if rank == 1:
                conn = await bounded(ep.connect(other), "connect()")
                await barrier("connected")
                await barrier("broken by rank 0")
                # Rank 1 has not processed the DOWN yet when it sends: these go out
                # on the old generation and rank 0 must drop them.
                sent = 0
                try:
                    for i in range(200):
                        await conn.send([b"stale %d" % i])
                        sent += 1
                except SendError as exc:
                    assert exc.code is SendErrorCode.FAILED
                await receive(ep, ErrorEvent)
                fresh = await bounded(ep.connect(other), "reconnect")
                await bounded(fresh.send([b"fresh"]), "send()")
            else:
                opened = await receive(ep, ConnectionOpened)
                await barrier("connected")
                assert s.transport is not None
                await s.transport.break_connection(ep.address, other)
                lost = await receive(ep, ErrorEvent)
                assert lost.error.remote_address == other
                await barrier("broken by rank 0")
                reopened = await receive(ep, ConnectionOpened)
                assert reopened.conn_id != opened.conn_id
                assert frames_of(await receive(ep, Received)) == [b"fresh"]

    run(scenario)


def test_endpoint_close_on_one_rank_is_seen_on_the_other() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            other = await peer_address(ep)
            conn = await bounded(ep.connect(other), "connect()")
            opened = await receive(ep, ConnectionOpened)
            await barrier("connected both ways")
            if rank == 0:
                await bounded(conn.send([b"last words"]), "send()")
                await bounded(ep.close(), "endpoint close()")
                await receive(ep, EndPointClosed)
                with pytest.raises(SendError) as info:
                    await conn.send([b"too late"])
                assert info.value.code is SendErrorCode.FAILED
            else:
                assert frames_of(await receive(ep, Received)) == [b"last words"]
                closed = await receive(ep, ConnectionClosed)
                assert closed.conn_id == opened.conn_id
                lost = await receive(ep, ErrorEvent)
                assert lost.error.code is EventErrorCode.CONNECTION_LOST
                assert lost.error.remote_address == other
                with pytest.raises(SendError) as info:
                    await bounded(conn.send([b"to a closed endpoint"]), "send()")
                assert info.value.code is SendErrorCode.FAILED

    run(scenario)


def test_numpy_array_round_trip_across_ranks_without_serializer_copies() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            conn = await connected_both_ways(ep)
            if rank == 0:
                array = np.arange(4 * MiB, dtype=np.float32)
                await bounded(conn.send(serialization.serialize({"a": array})), "send()")
                event = await receive(ep, Received)
                back = serialization.deserialize(event.frames)["a"]
                assert np.array_equal(back, array * 2)
                # Rebuilt over the received frame: no copy by the serializer.
                assert np.shares_memory(back, np.frombuffer(event.frames[1], np.uint8))
            else:
                event = await receive(ep, Received)
                array = serialization.deserialize(event.frames)["a"]
                await bounded(conn.send(serialization.serialize({"a": array * 2})), "send()")

    run(scenario)


def test_send_buffers_may_be_reused_once_send_returns_across_ranks() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            conn = await connected_both_ways(ep)
            big = np.full(8 * MiB, 7, dtype=np.uint8)
            small = bytearray(b"small")
            await bounded(conn.send([as_buffer(big), small]), "send()")
            big[:] = 0
            small[:] = b"SMALL"
            event = await receive(ep, Received)
            assert bytes(event.frames[1]) == b"small"
            assert np.all(np.frombuffer(event.frames[0], np.uint8) == 7)

    run(scenario)


def test_close_is_bounded_when_the_peer_rank_stops_progressing() -> None:
    # Rank 1 stops calling into the transport (it blocks in a plain MPI barrier), so
    # rank 0's large send can never complete: MPI cannot tell rank 0 why. The send is
    # abandoned by its caller, and closing the transport must still return.
    async def scenario() -> None:
        transport = await new_transport()
        ep = await transport.new_endpoint()
        other = await peer_address(ep)
        if rank == 1:
            await receive(ep, ConnectionOpened)
            world.Barrier()  # blocks this rank's event loop: no MPI progress for it
            await bounded(transport.close(), "transport close()")
            return
        conn = await bounded(ep.connect(other), "connect()")
        payload = np.ones(64 * MiB, dtype=np.uint8)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.send([as_buffer(payload)]), 0.5)
        await bounded(transport.close(), "transport close() with a send outstanding")
        await drain_until_closed(ep)
        world.Barrier()

    run(scenario)


def test_connect_to_a_rank_that_does_not_answer_times_out_and_leaves_no_link_behind() -> None:
    async def scenario() -> None:
        async with Scene() as s:
            ep = await s.endpoint()
            other = await peer_address(ep)
            if rank == 1:
                world.Barrier()  # not progressing: rank 0's HELLO waits unanswered
                await barrier("rank 0 gave up")
                # The late ACCEPT reaches rank 0 after it gave up; it answers DOWN, so
                # the link this rank made for the HELLO dies instead of lingering.
                for _ in range(2000):
                    if not live_links(ep):
                        break
                    await asyncio.sleep(0.001)
                assert not live_links(ep), "a link of an abandoned connect survived"
            else:
                with pytest.raises(ConnectError) as info:
                    await ep.connect(other, timeout=0.3)
                assert info.value.code is ConnectErrorCode.TIMEOUT
                world.Barrier()
                await barrier("rank 0 gave up")
            await barrier("checked")
            # And the pair still works afterwards.
            conn = await bounded(ep.connect(other), "connect()")
            await bounded(conn.send([b"works"]), "send()")
            await receive(ep, ConnectionOpened)
            assert frames_of(await receive(ep, Received)) == [b"works"]

    run(scenario)


def live_links(endpoint: EndPoint) -> list[object]:
    """The live links of an mpi endpoint (white-box: the core's link table)."""
    return list(getattr(endpoint, "_links").values())  # noqa: B009


def test_send_to_a_rank_that_stops_progressing_fails_the_bundle_after_send_timeout() -> None:
    async def scenario() -> None:
        transport = registry.create("mpi", send_timeout=0.5)
        try:
            ep = await transport.new_endpoint()
            other = await peer_address(ep)
            if rank == 1:
                await receive(ep, ConnectionOpened)
                world.Barrier()  # not progressing while rank 0 sends
                # MPI cannot retract a posted send: the message may still arrive, but
                # the bundle is reported lost after it.
                for _ in range(3):
                    event = await bounded(ep.receive(), "CONNECTION_LOST")
                    if isinstance(event, ErrorEvent):
                        assert event.error.code is EventErrorCode.CONNECTION_LOST
                        assert event.error.remote_address == other
                        break
                    assert isinstance(event, Received), f"unexpected {event!r}"
                else:
                    raise AssertionError("no CONNECTION_LOST")
            else:
                conn = await bounded(ep.connect(other), "connect()")
                payload = np.ones(64 * MiB, dtype=np.uint8)
                with pytest.raises(SendError) as info:
                    await bounded(conn.send([as_buffer(payload)]), "send()")
                assert info.value.code is SendErrorCode.FAILED
                lost = await receive(ep, ErrorEvent)
                assert lost.error.code is EventErrorCode.CONNECTION_LOST
                world.Barrier()
            await barrier("both saw the failure")
        finally:
            await bounded(transport.close(), "transport close()")

    run(scenario)


def test_stopped_rank_is_lost_by_heartbeats_which_mpi_never_reports() -> None:
    """Rank 1 stops itself (SIGSTOP: MPI notices nothing); rank 0's heartbeat (a
    small tick) reports ``CONNECTION_LOST`` within a generous bound, then resumes it."""
    import os
    import signal

    tick = 0.2
    saved = os.environ.get("HPCPROC_TICK")
    os.environ["HPCPROC_TICK"] = str(tick)

    async def scenario() -> None:
        try:
            transport = await new_transport()
        finally:
            if saved is None:
                del os.environ["HPCPROC_TICK"]
            else:
                os.environ["HPCPROC_TICK"] = saved
        try:
            endpoint = await transport.new_endpoint()
            pids = await exchange(os.getpid())
            await connected_both_ways(endpoint)
            await barrier("connected")
            if rank == 1:
                os.kill(os.getpid(), signal.SIGSTOP)  # resumed by rank 0
            try:
                lost = await asyncio.wait_for(endpoint.receive(), 30 * tick + WAIT)
            finally:
                if rank == 0:
                    os.kill(pids[1], signal.SIGCONT)
            assert isinstance(lost, ErrorEvent), f"rank {rank}: got {lost!r}"
            assert lost.error.code is EventErrorCode.CONNECTION_LOST
            if rank == 0:
                assert "silent" in lost.error.message, lost.error.message
            await barrier("after the loss")
        finally:
            await bounded(transport.close(), "transport close()")

    run(scenario)


def test_ranks_bound_to_one_cpu_of_one_host_poll_by_yielding_while_linked() -> None:
    """Each rank knows the other's pid where both run on one host (and pid namespace):
    bound to one CPU, both count it crowded while their link lives (their receives then
    poll by yielding: two ranks on one CPU, 8 B round trip 460-470 us spinning, 22-24
    yielding), and not once it is closed. Ranks on two hosts know no pid, and count
    nothing."""
    import os

    from hpcproc._host import pid_space
    from hpcproc.transports import _busy_poll

    async def scenario() -> None:
        whos = await exchange((pid_space(), os.getpid()))
        same_host = whos[0][0] == whos[1][0]
        mask = os.sched_getaffinity(0)
        one = min(mask)  # the same CPU on both ranks of one host (one launcher's mask)
        saved = _busy_poll._crowding
        crowding = _busy_poll._crowding = _busy_poll.Crowding(
            "auto", machine_cpus=os.cpu_count() or 1, runnable=lambda: 1, own_cpus=frozenset({one})
        )
        os.sched_setaffinity(0, {one})
        try:
            await barrier("both bound")
            transport = await new_transport()
            engine = transport._engine  # type: ignore[attr-defined]
            assert engine.local_pids[rank] == 0
            assert engine.local_pids[peer_rank] == (whos[peer_rank][1] if same_host else 0)
            endpoint = await transport.new_endpoint()
            try:
                await connected_both_ways(endpoint)
                assert crowding.confined is same_host, f"rank {rank}: {crowding.confined}"
                await barrier("looked")
            finally:
                await bounded(transport.close(), "transport close()")
            assert not crowding.confined and not crowding.crowded
        finally:
            os.sched_setaffinity(0, mask)
            _busy_poll._crowding = saved

    run(scenario)
