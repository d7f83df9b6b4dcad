"""The mpi transport in one process (a singleton MPI rank): what the conformance suite
does not cover. Cross-rank behaviour is in tests/test_mpi_two_ranks.py."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar, cast

import numpy as np
import pytest

from hpcproc.transports.base import (
    Buffer,
    Connection,
    ConnectionOpened,
    EndPoint,
    ErrorEvent,
    EventErrorCode,
    Received,
    SendError,
    SendErrorCode,
)

pytest.importorskip("mpi4py", reason="the mpi transport needs mpi4py (pip install hpcproc[mpi])")

from hpcproc.transports import mpi

T = TypeVar("T")
WAIT = 10.0
MiB = 1 << 20


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, WAIT)


async def expect(endpoint: EndPoint, kind: type[T]) -> T:
    event = await bounded(endpoint.receive())
    assert isinstance(event, kind), f"expected {kind.__name__}, got {event!r}"
    return event


def as_buffer(array: np.ndarray[Any, Any]) -> Buffer:
    """A numpy array as a frame (numpy's stubs lack the buffer protocol before 3.12)."""
    return cast(Buffer, array)


@contextlib.asynccontextmanager
async def connected(**options: Any) -> AsyncIterator[tuple[EndPoint, Connection]]:
    """A transport made with ``options``, two endpoints, and a connection from the
    first to the second (opened on both sides): ``(receiving endpoint, connection)``.
    The transport is closed on exit."""
    transport = mpi.create_transport(**options)
    try:
        a = await transport.new_endpoint()
        b = await transport.new_endpoint()
        conn = await bounded(a.connect(b.address))
        await expect(b, ConnectionOpened)
        yield b, conn
    finally:
        await bounded(transport.close())


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_importing_the_transport_module_does_not_import_mpi4py() -> None:
    result = run_python(
        """
        import sys
        import hpcproc.transports.mpi
        assert "mpi4py" not in sys.modules, "mpi4py imported too early"
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_missing_mpi4py_raises_import_error_naming_the_extra() -> None:
    result = run_python(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "mpi4py" or name.startswith("mpi4py."):
                    raise ImportError("No module named 'mpi4py'")
        sys.meta_path.insert(0, Block())
        from hpcproc import transports
        try:
            transports.create("mpi")
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install hpcproc[mpi]" in result.stdout


def test_thread_level_below_serialized_raises_a_clear_error() -> None:
    result = run_python(
        """
        import mpi4py
        mpi4py.rc.thread_level = "single"
        from hpcproc.transports import create
        from hpcproc.transports.mpi import MpiUnavailableError
        try:
            create("mpi")
        except MpiUnavailableError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "MPI_THREAD_SERIALIZED" in result.stdout
    assert "MPI_THREAD_SINGLE" in result.stdout


def test_ucx_transport_works_in_a_process_that_created_an_mpi_transport_first() -> None:
    """The mpich wheel's bundled UCX would shadow the ucxx wheel's (undefined symbol in
    libuct) if MPI were loaded first; the transport loads ucxx's UCX before MPI."""
    import importlib.util

    if importlib.util.find_spec("ucxx") is None:
        pytest.skip("ucxx is not installed (pip install hpcproc[ucx])")
    result = run_python(
        """
        import asyncio
        from hpcproc.transports import create

        async def main():
            mpi_transport = create("mpi")
            await mpi_transport.new_endpoint()
            ucx = create("ucx")
            a, b = await ucx.new_endpoint(), await ucx.new_endpoint()
            conn = await a.connect(b.address)
            await conn.send([b"over ucx"])
            events = [await b.receive(), await b.receive()]
            print("received", bytes(events[1].frames[0]).decode())
            await conn.close()
            await ucx.close()
            await mpi_transport.close()

        asyncio.run(main())
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "received over ucx" in result.stdout


def test_addresses_name_rank_and_endpoint_and_malformed_ones_are_rejected() -> None:
    address = mpi.format_address(3, 17)
    assert address == b"mpi:3:17"
    assert mpi.parse_address(address) == (3, 17)
    for bad in (b"tcp:1:2", b"mpi:1", b"mpi:1:2:3", b"mpi:-1:2", b"mpi:a:2", b"mpi::2"):
        with pytest.raises(ValueError):
            mpi.parse_address(bad)


def test_several_endpoints_in_one_rank_have_distinct_never_reused_addresses() -> None:
    async def scenario() -> None:
        transport = mpi.create_transport()
        try:
            first = await transport.new_endpoint()
            rank, first_id = mpi.parse_address(first.address)
            assert rank == transport.rank
            await first.close()
            second = await transport.new_endpoint()
            third = await transport.new_endpoint()
            ids = [mpi.parse_address(e.address)[1] for e in (second, third)]
            assert len({first_id, *ids}) == 3
        finally:
            await bounded(transport.close())

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("crowded", "budget"),
    [(True, 200.0), (False, 200.0), (True, 0.0)],
    ids=["crowded", "not crowded", "crowded, no polling budget"],
)
def test_a_hot_pump_yields_the_cpu_when_the_cpus_are_crowded_and_spins_otherwise(
    crowded: bool, budget: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MPI gives nothing to wait on, so while messages flow the pump polls on every pass
    round the loop. With more runnable tasks than CPUs, a rank that polls there keeps
    the CPU from the rank it waits for (4 ranks on 2 CPUs: an all-to-all round of 8 B
    took 4.1-4.9 ms over mpi instead of about 0.2 ms). Crowded, the pump polls once
    per pass and gives the CPU away (``sched_yield``), with or without a polling
    budget; otherwise it spins."""
    from hpcproc.transports import _busy_poll

    monkeypatch.setattr(_busy_poll, "_crowding", _busy_poll.Crowding("1" if crowded else "0"))
    calls = {"yield": 0, "spin": 0}

    async def scenario() -> None:
        seen = asyncio.Event()

        def count_yield() -> None:
            calls["yield"] += 1
            seen.set()

        def counted(step: Any) -> Any:
            def one_step() -> bool:
                calls["spin"] += 1
                seen.set()
                return True  # (ends the spin at once)

            return one_step

        monkeypatch.setattr(_busy_poll.os, "sched_yield", count_yield)
        real_spin = _busy_poll.IdlePoller.spin
        monkeypatch.setattr(
            _busy_poll.IdlePoller,
            "spin",
            lambda self, step, ours=None, **kw: real_spin(self, counted(step), ours, **kw),
        )
        transport = mpi.create_transport()
        try:
            # The engine is shared by the process: its options are set for this test.
            engine = cast(Any, transport)._engine
            monkeypatch.setattr(engine.options, "busy_poll_us", budget)
            monkeypatch.setattr(engine.options, "hot_window", 3600.0)  # hot throughout
            endpoint = cast(Any, await transport.new_endpoint())
            pump = engine.pump_for(endpoint.loop)
            assert pump is not None and pump.poller.enabled is (budget > 0)
            pump.poke()  # messages are expected: the pump is hot
            # Waiting (not runnable), as a rank waiting for a message does: the pump's
            # is then the only callback of the loop.
            await bounded(seen.wait())
        finally:
            await bounded(transport.close())

    asyncio.run(scenario())
    if crowded:
        assert calls["yield"] > 0 and calls["spin"] == 0, calls
    else:
        assert calls["spin"] > 0 and calls["yield"] == 0, calls


def test_endpoints_on_event_loops_of_two_threads_get_messages_in_order() -> None:
    """Both threads make MPI progress and may take each other's messages: what one
    takes for the other's endpoint must still arrive in order (small messages, and
    every 100th a multi-frame one, received in several MPI messages)."""
    import threading

    n = 5000
    transport = mpi.create_transport(inline_max=256)
    address: list[bytes] = []
    have_address = threading.Event()
    got: list[int] = []
    errors: list[BaseException] = []

    async def receiver() -> None:
        endpoint = await transport.new_endpoint()
        address.append(endpoint.address)
        have_address.set()
        while len(got) < n:
            event = await bounded(endpoint.receive())
            if isinstance(event, Received):
                got.append(int(bytes(event.frames[0])))
        await bounded(endpoint.close())

    def receive_in_thread() -> None:
        try:
            asyncio.run(receiver())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    async def sender() -> None:
        endpoint = await transport.new_endpoint()
        assert await asyncio.to_thread(have_address.wait, WAIT)
        conn = await bounded(endpoint.connect(address[0]))  # type: ignore[arg-type]
        for i in range(n):
            frames: list[Buffer] = [str(i).encode()]
            if i % 100 == 0:
                frames.append(bytes(1024))
            await bounded(conn.send(frames))
            if i % 64 == 0:
                await asyncio.sleep(0)  # let the pump run on this loop too
        await asyncio.to_thread(thread.join, 2 * WAIT)
        await bounded(conn.close())
        await bounded(transport.close())

    thread = threading.Thread(target=receive_in_thread)
    thread.start()
    try:
        asyncio.run(sender())
    finally:
        thread.join(2 * WAIT)
    assert not thread.is_alive() and not errors, errors
    assert got == list(range(n))


def test_large_frames_are_received_in_place_into_a_buffer_each() -> None:
    async def scenario() -> None:
        async with connected() as (b, conn):
            big = np.arange(3 * MiB, dtype=np.uint8)
            mid = np.arange(300 << 10, dtype=np.uint8)[::-1].copy()
            await bounded(conn.send([b"small", as_buffer(big), as_buffer(mid), b"tail"]))
            event = await expect(b, Received)
            assert [len(f) for f in event.frames] == [5, 3 * MiB, 300 << 10, 4]
            # One buffer per frame (pooled, of the frame's exact length): the data
            # landed where the receiver keeps it, no reassembly copy.
            owners = [f.obj for f in event.frames]
            assert len({id(o) for o in owners}) == 4
            assert isinstance(owners[1], np.ndarray) and owners[1].nbytes == 3 * MiB
            assert isinstance(owners[2], np.ndarray) and owners[2].nbytes == 300 << 10
            assert np.array_equal(np.frombuffer(event.frames[1], np.uint8), big)
            assert np.array_equal(np.frombuffer(event.frames[2], np.uint8), mid)
            assert bytes(event.frames[0]) == b"small" and bytes(event.frames[3]) == b"tail"

    asyncio.run(scenario())


def _spin_until(receiver: Any, events: int) -> None:
    """Turn the spinning receiver's step until ``receiver`` has ``events`` queued: its
    ``_take_one``, in C where built (the Python ``take_one`` under
    ``HPCPROC_MPI_ACCEL=0``, which ``make test`` runs too)."""
    for _ in range(10_000):
        if len(receiver._events._items) >= events:
            return
        receiver._take_one(receiver)
    raise AssertionError(f"{events} events expected, {len(receiver._events._items)} queued")


def _post_unawaited(conn: Connection, frames: list[Buffer]) -> tuple[Any, Any]:
    """Post a DATA message of ``frames`` on ``conn`` as ``send`` posts it, without
    waiting for it to complete (``send`` would progress until it did, receiving it
    meanwhile): the engine, and the pending send's op (None if it completed)."""
    link: Any = conn._link  # type: ignore[attr-defined]
    a: Any = link.endpoint
    op = a.engine.post_data(
        link.rank, a.endpoint_id, link.remote_ep, link.gen, conn._id,  # type: ignore[attr-defined]
        frames, a.loop, a.opts.inline_max,
    )  # fmt: skip
    return a.engine, op


@pytest.mark.parametrize("size", [300 << 10, 3 * MiB], ids=["300KiB", "3MiB"])
def test_a_small_message_never_overtakes_a_large_one_completed_by_the_same_poll(
    size: int,
) -> None:
    """A large message whose frame completes in the same progress call that takes the
    envelope of the next, small, message of its sender (here: both posted before the
    receiver looks, the frame sent to this rank itself, so it completes as soon as its
    receive is posted): the spinning receiver must still get them in order. It got the
    small one first when the small one's fast path handed it over while the large one
    still waited to be routed."""

    async def scenario() -> None:
        async with connected() as (b, conn):
            _, op = _post_unawaited(conn, [as_buffer(np.full(size, 7, np.uint8))])
            assert op is not None, "the frame's send completed before any receive was posted"
            assert conn.send_nowait([b"small"])
            # What a receiver spinning in receive() calls, turn by turn (receive() would
            # leave the work to the pump while the pump is due to run).
            _spin_until(b, 2)
            first = await expect(b, Received)
            second = await expect(b, Received)
            assert [len(f) for f in first.frames] == [size], "the small message overtook"
            assert bytes(second.frames[0]) == b"small"
            await bounded(op.future)

    asyncio.run(scenario())


def _envelope(conn: Connection, lengths: list[int]) -> tuple[Any, bytes]:
    """The engine and the envelope of a DATA message of separate frames of
    ``lengths`` bytes on ``conn``, as its link would send it."""
    link: Any = conn._link  # type: ignore[attr-defined]
    a: Any = link.endpoint
    envelope = a.engine._envelope(len(lengths)).pack(
        mpi._DATA, 0, 0, len(lengths), a.endpoint_id, link.remote_ep, link.gen, conn._id,  # type: ignore[attr-defined]
        *lengths,
    )  # fmt: skip
    return a.engine, envelope


@pytest.mark.parametrize("several", [True, False], ids=["several-frames", "one-frame"])
def test_a_spinning_receiver_takes_a_message_of_separate_frames_in_place(
    monkeypatch: pytest.MonkeyPatch, several: bool
) -> None:
    """A message of several separate frames, small ones among them, taken by the
    spinning receiver itself: one event, each frame in a buffer of its own. (One
    large frame alone takes the compiled path where built.)"""

    async def scenario() -> None:
        async with connected() as (b, conn):
            engine: Any = conn._link.endpoint.engine  # type: ignore[attr-defined]
            # Its spin budget (200 us) can run out on a loaded machine, which the
            # tests below cover; here the frames must be taken by the spin. (The
            # engine is the process's: the budget is restored after the test.)
            monkeypatch.setattr(engine, "_direct_wait", WAIT)
            big = np.arange(600 << 10, dtype=np.uint8)
            mid = np.arange(100 << 10, dtype=np.uint8)[::-1].copy()
            if not several:
                _, op = _post_unawaited(conn, [as_buffer(big)])
                _spin_until(b, 1)
                assert not engine._recv_reqs, "the frame went through the general bookkeeping"
                event = await expect(b, Received)
                assert np.array_equal(np.frombuffer(event.frames[0], np.uint8), big)
                if op is not None:
                    await bounded(op.future)
                return
            _, op = _post_unawaited(conn, [b"small", as_buffer(big), as_buffer(mid), b"tail"])
            _spin_until(b, 1)
            assert not engine._recv_reqs, "a frame went through the general bookkeeping"
            event = await expect(b, Received)
            assert [len(f) for f in event.frames] == [5, 600 << 10, 100 << 10, 4]
            assert len({id(f.obj) for f in event.frames}) == 4
            assert np.array_equal(np.frombuffer(event.frames[1], np.uint8), big)
            assert np.array_equal(np.frombuffer(event.frames[2], np.uint8), mid)
            assert bytes(event.frames[0]) == b"small" and bytes(event.frames[3]) == b"tail"
            if op is not None:
                await bounded(op.future)

    asyncio.run(scenario())


@pytest.mark.parametrize("lengths", [[200 << 10], [50 << 10, 200 << 10]], ids=["one", "second"])
def test_a_frame_late_for_the_spinning_receiver_is_delivered_in_order_when_it_comes(
    lengths: list[int],
) -> None:
    """The spinning receiver waits for a message's frames for its spin budget only;
    a frame not there by then is completed by the general bookkeeping later, before
    the messages that followed it."""
    from mpi4py import MPI

    async def scenario() -> None:
        async with connected() as (b, conn):
            engine, envelope = _envelope(conn, lengths)
            frames = [np.full(n, i + 5, np.uint8) for i, n in enumerate(lengths)]
            requests = [engine.comm.Isend([envelope, MPI.BYTE], engine.rank, mpi._TAG)]
            for frame in frames[:-1]:
                requests.append(engine.comm.Isend([frame, MPI.BYTE], engine.rank, mpi._TAG))
            b._take_one(b)  # takes the envelope; the last frame not sent: it waits
            assert len(engine._recv_reqs) == 1 and not b.receive_nowait()
            requests.append(engine.comm.Isend([frames[-1], MPI.BYTE], engine.rank, mpi._TAG))
            assert conn.send_nowait([b"after"])
            _spin_until(b, 2)
            first, second = await expect(b, Received), await expect(b, Received)
            for got, frame in zip(first.frames, frames, strict=True):
                assert np.array_equal(np.frombuffer(got, np.uint8), frame)
            assert bytes(second.frames[0]) == b"after"
            assert MPI.Request.Testall(requests) and not engine._recv_reqs

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("declared", "sent"),
    [
        ([100 << 10], [50 << 10]),
        ([100 << 10], [200 << 10]),
        ([100 << 10, 100 << 10, 100 << 10], [100 << 10, 50 << 10]),
        ([100 << 10, 100 << 10, 100 << 10], [100 << 10, 200 << 10]),
    ],
    ids=["shorter", "longer", "second-shorter", "second-longer"],
)
def test_a_spinning_receiver_drops_a_sender_whose_frame_has_another_length(
    declared: list[int], sent: list[int]
) -> None:
    """The spinning receiver's own wait for a message's frames checks each frame's
    length as the general bookkeeping does (test above): the sender is dropped,
    nothing is delivered, and the receive of a frame still awaited does not stay
    posted."""
    from mpi4py import MPI

    async def scenario() -> None:
        # A communicator of its own, so the poisoned peer rank is private to this test.
        async with connected(comm=MPI.COMM_SELF.Dup()) as (b, conn):
            engine, envelope = _envelope(conn, declared)
            requests = [engine.comm.Isend([envelope, MPI.BYTE], engine.rank, mpi._TAG)]
            for i, n in enumerate(sent):
                frame = np.full(n, i + 7, np.uint8)
                requests.append(engine.comm.Isend([frame, MPI.BYTE], engine.rank, mpi._TAG))
            _spin_until(b, 1)
            assert engine._poisoned == {engine.rank}
            lost = await expect(b, ErrorEvent)
            assert lost.error.code is EventErrorCode.CONNECTION_LOST
            assert "by its envelope" in lost.error.message
            await _nothing_delivered_nor_left_posted(engine, b, requests)
            # Nor did a receive stay posted outside the bookkeeping: it would take this.
            probe = engine.comm.Isend([b"?", MPI.BYTE], engine.rank, mpi._TAG)
            message = engine.comm.Improbe(engine.rank, mpi._TAG)
            assert message is not None, "a frame's receive stayed posted"
            message.Recv([bytearray(1), MPI.BYTE])
            probe.Wait()

    asyncio.run(scenario())


def _address(frame: memoryview) -> int:
    """Where a frame's bytes are (to tell a reused receive buffer from a fresh one)."""
    return int(np.frombuffer(frame, np.uint8).ctypes.data)


@pytest.mark.parametrize("size", [mpi._POOL_MIN, 100_000, 3 * MiB])
def test_a_held_frame_is_never_overwritten_and_a_dropped_ones_buffer_is_reused(size: int) -> None:
    async def scenario() -> None:
        async with connected() as (b, conn):

            async def hop(fill: int) -> memoryview:
                await bounded(conn.send([b"h", bytes([fill]) * size]))
                event = await expect(b, Received)
                return event.frames[1]

            held = await hop(1)
            second = await hop(2)
            # The first message is still held: its buffer was not given to the second.
            assert _address(second) != _address(held)
            assert bytes(held) == b"\x01" * size and bytes(second) == b"\x02" * size
            where = _address(second)
            del second  # dropped: its buffer goes back to the pool
            third = await hop(3)
            assert _address(third) == where
            assert bytes(held) == b"\x01" * size and bytes(third) == b"\x03" * size

    asyncio.run(scenario())


def _pool(limit: int = 1 << 30) -> Any:
    import threading

    return mpi._BufferPool(limit, threading.RLock())


def test_buffer_pool_hands_out_a_free_array_of_the_size_class_and_never_a_held_one() -> None:
    pool = _pool()
    first = pool.take(40_000)
    assert first.nbytes == 40_000 and first.base is not None and first.base.nbytes == 1 << 16
    second = pool.take(60_000)  # same class (64 KiB), but the first is held
    assert second.base is not first.base
    where = first.ctypes.data
    del first  # (a reference to its base would keep the array held)
    again = pool.take(50_000)
    assert again.ctypes.data == where and again.nbytes == 50_000
    exact = pool.take(1 << 16)  # a power of two is the array itself, not a view
    assert exact.nbytes == 1 << 16 and exact.base is None
    assert pool.total == 3 << 16


def test_buffer_pool_keeps_at_most_its_limit_and_evicts_free_arrays_of_other_classes() -> None:
    pool = _pool(limit=4 << 16)
    held = [pool.take(1 << 16) for _ in range(4)]
    assert pool.total == 4 << 16
    extra = pool.take(1 << 16)  # everything pooled is held: a fresh array, not kept
    assert pool.total == 4 << 16 and len(pool.classes[1 << 16]) == 4
    del extra, held[:2]
    bigger = pool.take(1 << 17)  # two free 64 KiB arrays make room for it
    assert pool.total == 4 << 16
    assert len(pool.classes[1 << 16]) == 2 and len(pool.classes[1 << 17]) == 1
    assert all(any(e.array is h for e in pool.classes[1 << 16]) for h in held)
    del bigger


def test_buffer_pool_take_looks_at_few_arrays_and_still_finds_a_free_one_behind_held_ones() -> None:
    pool = _pool()
    n = 3 * mpi._POOL_SCAN
    held = [pool.take(1 << 16) for _ in range(n)]
    # The array handed out first is now last in its class; free it.
    last = held.pop(0)
    del last
    takes = 0
    while True:
        takes += 1
        got = pool.take(1 << 16)
        if len(pool.classes[1 << 16]) == n and not any(got is h for h in held):
            break  # the freed array came back (the class did not grow)
        held.append(got)
        assert takes <= n // mpi._POOL_SCAN + 1, "the free array was never reached"


def test_buffer_pool_trim_frees_idle_arrays_but_not_held_or_recent_ones() -> None:
    import time

    pool = _pool()
    held = pool.take(1 << 16)
    idle = pool.take(1 << 17)
    del idle
    cutoff = time.monotonic()
    recent = pool.take(1 << 18)
    del recent
    assert pool._trim(cutoff)  # something is left: the timer stays armed
    assert set(pool.classes) == {1 << 16, 1 << 18}
    assert pool.total == (1 << 16) + (1 << 18)
    del held
    assert not pool._trim(time.monotonic() + 1)
    assert pool.classes == {} and pool.total == 0


def test_unpicklable_and_strided_buffers_travel_as_raw_bytes() -> None:
    async def scenario() -> None:
        async with connected(inline_max=0) as (b, conn):
            matrix = np.arange(64 * 64, dtype=np.float64).reshape(64, 64)
            view = memoryview(
                as_buffer(np.arange(4096, dtype=np.int32))
            )  # memoryviews cannot pickle
            strided = matrix[:, ::2]  # not contiguous
            await bounded(conn.send([view, as_buffer(strided), as_buffer(matrix)]))
            event = await expect(b, Received)
            assert bytes(event.frames[0]) == view.tobytes()
            assert bytes(event.frames[1]) == strided.tobytes()
            assert bytes(event.frames[2]) == matrix.tobytes()

    asyncio.run(scenario())


def test_malformed_envelope_drops_the_senders_links_and_delivers_nothing() -> None:
    from mpi4py import MPI

    async def scenario() -> None:
        # A communicator of its own, so the poisoned peer rank is private to this test.
        transport = mpi.create_transport(comm=MPI.COMM_SELF.Dup(), max_message=1 << 20)
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            conn = await bounded(a.connect(b.address))
            await expect(b, ConnectionOpened)
            engine: Any = transport._engine
            a_id, b_id = (mpi.parse_address(e.address)[1] for e in (a, b))
            link_gen = next(iter(b._links.values())).gen  # type: ignore[attr-defined]
            # A DATA envelope announcing a 1 TiB frame: refused before any allocation.
            envelope = mpi._ENVELOPE.pack(mpi._Msg.DATA, 0, 0, 1, a_id, b_id, link_gen, 1)
            forged = envelope + mpi._LEN.pack(1 << 40)
            # Non-blocking: a send to oneself completes only when the engine takes it.
            request = engine.comm.Isend([forged, MPI.BYTE], engine.rank, mpi._TAG)
            lost = await expect(b, ErrorEvent)
            assert lost.error.code is EventErrorCode.CONNECTION_LOST
            assert lost.error.remote_address == a.address
            assert "protocol violation" in lost.error.message
            lost_a = await expect(a, ErrorEvent)
            assert lost_a.error.remote_address == b.address
            assert not engine._recv_reqs, "a receive was posted for the forged frame"
            assert request.Test(), "the forged envelope was not taken"
            with pytest.raises(SendError) as info:
                await bounded(conn.send([b"after the violation"]))
            assert info.value.code is SendErrorCode.FAILED
        finally:
            await bounded(transport.close())

    asyncio.run(scenario())


async def _nothing_delivered_nor_left_posted(engine: Any, b: EndPoint, requests: list[Any]) -> None:
    """After a dropped sender: every forged send completes (its frames were received
    or their receives cancelled), no frame receive stays in the bookkeeping, and
    nothing of the message reached ``b``."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while engine._recv_reqs or not all(r.Test() for r in requests):
        assert asyncio.get_running_loop().time() < deadline, "a receive stayed posted"
        await asyncio.sleep(0)  # the pump progresses while requests are outstanding
    assert b.receive_nowait() is None, "something of the message was delivered"


@pytest.mark.parametrize(
    ("declared", "sent"),
    [
        ([100 << 10], [50 << 10]),
        ([100 << 10], [200 << 10]),
        ([100 << 10, 100 << 10], [50 << 10]),
    ],
    ids=["shorter", "longer", "shorter-with-a-frame-still-awaited"],
)
def test_a_frame_of_another_length_than_declared_drops_the_sender(
    declared: list[int], sent: list[int]
) -> None:
    """Shorter, the frame's buffer would hold bytes the sender never sent (it is not
    zero-filled); longer, MPI truncates it. Either breaks the protocol: the sender is
    dropped, nothing of the message is delivered, and no receive stays posted."""
    from mpi4py import MPI

    async def scenario() -> None:
        transport = mpi.create_transport(comm=MPI.COMM_SELF.Dup())
        try:
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            await bounded(a.connect(b.address))
            await expect(b, ConnectionOpened)
            engine: Any = transport._engine
            a_id, b_id = (mpi.parse_address(e.address)[1] for e in (a, b))
            link_gen = next(iter(b._links.values())).gen  # type: ignore[attr-defined]
            envelope = mpi._ENVELOPE.pack(
                mpi._Msg.DATA, 0, 0, len(declared), a_id, b_id, link_gen, 1
            )
            forged = envelope + b"".join(mpi._LEN.pack(n) for n in declared)
            requests = [engine.comm.Isend([forged, MPI.BYTE], engine.rank, mpi._TAG)]
            for n in sent:
                frame = np.full(n, 7, np.uint8)
                requests.append(engine.comm.Isend([frame, MPI.BYTE], engine.rank, mpi._TAG))
            lost = await expect(b, ErrorEvent)
            assert lost.error.code is EventErrorCode.CONNECTION_LOST
            assert lost.error.remote_address == a.address
            assert "protocol violation" in lost.error.message
            assert "by its envelope" in lost.error.message
            await _nothing_delivered_nor_left_posted(engine, b, requests)
        finally:
            await bounded(transport.close())

    asyncio.run(scenario())


class _FakeStatus:
    def __init__(self) -> None:
        self.count = -1
        self.error = 0

    def Get_count(self, datatype: object) -> int:
        return self.count

    def Get_error(self) -> int:
        return self.error


class _FakeMpiError(Exception):
    def __init__(self, error_class: int) -> None:
        self.error_class = error_class

    def Get_error_class(self) -> int:
        return self.error_class


class _FakeRequest:
    """A frame receive that has arrived (``count`` bytes) or failed (``error``)."""

    def __init__(self, count: int = 0, error: int = 0, done: bool = True) -> None:
        self.count, self.error, self.done = count, error, done
        self.null = self.freed = False

    def __eq__(self, other: object) -> bool:
        return other is _FakeMpi.REQUEST_NULL and self.null

    __hash__ = object.__hash__

    def Get_status(self, status: _FakeStatus) -> bool:
        status.error = self.error
        return self.done

    def Free(self) -> None:
        self.null = self.freed = True

    def Cancel(self) -> None:
        pass


class _FakeMpi:
    """What _Engine._test_recvs asks of mpi4py, with MPICH's or Open MPI's way of
    completing a failed request in Testsome (MPICH frees it, Open MPI leaves it)."""

    SUCCESS = 0
    ERR_IN_STATUS = 17
    REQUEST_NULL = object()
    Status = _FakeStatus
    Exception = _FakeMpiError
    frees_failed = True

    @staticmethod
    def Get_error_string(error: int) -> str:
        return "Message truncated "

    class Request:
        @staticmethod
        def Testsome(requests: list[_FakeRequest], statuses: list[_FakeStatus]) -> list[int]:
            indices = [i for i, r in enumerate(requests) if r.done and not r.null]
            failed = False
            for k, i in enumerate(indices):
                req = requests[i]
                statuses[k].count, statuses[k].error = req.count, req.error
                failed = failed or bool(req.error)
                if not req.error or _FakeMpi.frees_failed:
                    req.null = True
            if failed:
                raise _FakeMpiError(_FakeMpi.ERR_IN_STATUS)
            return indices


@pytest.mark.parametrize("frees_failed", [True, False], ids=["mpich", "openmpi"])
def test_a_failed_frame_among_good_ones_poisons_its_sender_only(
    frees_failed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Testsome raising MPI_ERR_IN_STATUS (a frame longer than declared) while other
    frames complete beside it: each status is matched with its request (the good
    frame after the failed one too), only the failed frame's sender is dropped, and
    the failed request does not stay to fail every later Testsome (Open MPI)."""
    monkeypatch.setattr(_FakeMpi, "frees_failed", frees_failed)
    engine: Any = object.__new__(mpi._Engine)
    good_a, failed, good_b = _FakeRequest(100), _FakeRequest(error=15), _FakeRequest(300)
    pending = _FakeRequest(done=False)
    messages = [mpi._Partial((src, mpi._DATA, 1, 2, 1, 1, []), 1) for src in (1, 2, 3, 3)]
    engine.MPI = _FakeMpi
    engine._byte = None
    engine._recv_reqs = [good_a, failed, good_b, pending]
    engine._recv_msgs = messages
    engine._recv_lens = [100, 200, 300, 400]
    engine._recv_statuses = []
    engine._poisoned = set()
    engine._inbound = {src: deque([messages[src - 1]]) for src in (1, 2)}
    engine._inbound[3] = deque(messages[2:])
    engine.endpoints = {}
    ready: list[Any] = []
    engine._test_recvs(ready)
    assert engine._poisoned == {2}
    assert [msg[0] for msg in ready] == [1, 3]  # source 3's second message still awaited
    assert engine._recv_reqs == [pending]
    assert engine._recv_lens == [400]
    assert failed.null and (failed.freed or frees_failed)
    ready.clear()
    engine._test_recvs(ready)  # nothing more completes, and nothing raises
    assert not ready and engine._recv_reqs == [pending]


@pytest.mark.parametrize("inline_max", [0, 1 << 20], ids=["separate", "inline"])
def test_fortran_ordered_frames_arrive_as_their_c_order_bytes(inline_max: int) -> None:
    async def scenario() -> None:
        async with connected(inline_max=inline_max) as (b, conn):
            fortran = np.asfortranarray(np.arange(32 * 8, dtype=np.int16).reshape(32, 8))
            await bounded(conn.send([as_buffer(fortran)]))
            event = await expect(b, Received)
            assert bytes(event.frames[0]) == fortran.tobytes()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("inline_max", -1),
        ("inline_max", 1024.0),
        ("max_message", 0),
        ("max_message", 1 << 64),
        ("max_message", float("inf")),
    ],
)
def test_bad_size_options_are_refused_naming_the_option(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{option} must be an int"):
        mpi.create_transport(**{option: value})


def test_send_nowait_sends_a_small_message_at_once_and_says_so_for_anything_else() -> None:
    """The process layer's send: True once a small one-frame message is posted; False,
    having sent nothing, where the caller must ``await send`` (a large frame, a closed
    connection); a shut-down engine fails the bundle. (The compiled sender where built,
    the Python path under ``HPCPROC_MPI_ACCEL=0``: ``make test`` runs both.)"""

    async def scenario() -> None:
        async with connected() as (b, conn):
            link: Any = conn._link  # type: ignore[attr-defined]
            engine = link.endpoint.engine
            assert conn.send_nowait([b"bytes"])
            assert conn.send_nowait([as_buffer(np.arange(4, dtype=np.int32))])
            big = as_buffer(np.zeros(link.endpoint.opts.inline_max + 1, np.uint8))
            assert not conn.send_nowait([big])
            _spin_until(b, 2)
            first, second = await expect(b, Received), await expect(b, Received)
            assert bytes(first.frames[0]) == b"bytes"
            assert bytes(second.frames[0]) == np.arange(4, dtype=np.int32).tobytes()
            assert not b.receive_nowait()  # (the large frame was not sent)
            engine.closed = True
            try:
                with pytest.raises(SendError) as info:
                    conn.send_nowait([b"after"])
                assert info.value.code is SendErrorCode.FAILED
            finally:
                engine.closed = False
            await conn.close()
            assert not conn.send_nowait([b"closed"])
            # A connection of an endpoint to itself (no MPI link) sends as well.
            to_self = await bounded(b.connect(b.address))
            await expect(b, ConnectionOpened)
            sent_now = to_self.send_nowait([b"self"])
            await bounded(to_self.send([b"self" * 10_000]))  # (larger than inline_max)
            if not sent_now:
                await bounded(to_self.send([b"self"]))
            events = [await expect(b, Received) for _ in range(2)]
            assert sorted(bytes(e.frames[0]) for e in events) == [b"self", b"self" * 10_000]

    asyncio.run(scenario())
