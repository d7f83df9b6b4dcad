"""Shared-memory transport: what the conformance suite cannot see.

Zero-copy delivery and segment reuse, back-pressure, host-bound addresses, detection
of corrupted shared memory, reclaiming a SIGKILLed peer's memory, and no ``/dev/shm``
entry left behind by the whole shm suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import mmap
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hpcproc.transports import (
    ConnectError,
    ConnectErrorCode,
    ConnectionClosed,
    ConnectionOpened,
    EndPointAddress,
    EndPointClosed,
    ErrorEvent,
    EventErrorCode,
    Received,
    SendError,
    SendErrorCode,
    create,
)
from hpcproc.transports._shm_ring import DATA_OFF, REC
from hpcproc.transports.shm import (
    SEG_HEADER,
    ShmTransport,
    _host_identity,
    _new_memfd,
    _RxSegment,
    _TxSegment,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="shm needs Linux (memfd)")


async def _next(endpoint: Any, kind: type[Any] = object) -> Any:
    event = await asyncio.wait_for(endpoint.receive(), TIMEOUT)
    assert isinstance(event, kind), event
    return event


async def _linked(transport: ShmTransport) -> tuple[Any, Any, Any, Any]:
    """Two endpoints ``a`` and ``b``, a connection from ``a`` to ``b`` (opened on both
    sides) and ``a``'s link to ``b``."""
    a, b = await transport.new_endpoint(), await transport.new_endpoint()
    conn = await a.connect(b.address)
    await _next(b, ConnectionOpened)
    return a, b, conn, a._links[b.address]


def _run(fn: Callable[[ShmTransport], Awaitable[None]], **options: Any) -> None:
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        transport = create("shm", **options)
        assert isinstance(transport, ShmTransport)
        try:
            await fn(transport)
        finally:
            await transport.close()

    asyncio.run(main())
    gc.collect()
    assert not errors, f"errors reported to the event loop: {errors}"


def _mapping_lines() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "memfd:hpcproc-shm" in line]


def _base_object(frame: memoryview) -> object:
    """The object at the bottom of a received frame's buffer chain."""
    obj: object = frame
    while True:
        nxt = getattr(obj, "base", None) if isinstance(obj, np.ndarray) else None
        if isinstance(obj, memoryview):
            nxt = obj.obj
        if nxt is None:
            return obj
        obj = nxt


# --------------------------------------------------------------------------- addresses


def test_address_names_the_host_and_its_boot() -> None:
    async def scenario(transport: ShmTransport) -> None:
        endpoint = await transport.new_endpoint()
        host, boot = _host_identity()
        assert endpoint.address.startswith(b"shm:" + host + b":" + boot + b":")

    _run(scenario)


@pytest.mark.parametrize("which", ["host", "boot"])
def test_connect_to_another_host_raises_not_found_suggesting_tcp_or_ucx(which: str) -> None:
    async def scenario(transport: ShmTransport) -> None:
        endpoint = await transport.new_endpoint()
        _, host, boot, name = bytes(endpoint.address).split(b":")
        if which == "host":
            host = b"elsewhere"
        else:
            boot = b"00000000-0000-0000-0000-000000000000"
        other = EndPointAddress(b":".join([b"shm", host, boot, name]))
        with pytest.raises(ConnectError) as info:
            await endpoint.connect(other, timeout=TIMEOUT)
        assert info.value.code is ConnectErrorCode.NOT_FOUND
        assert "tcp" in str(info.value) and "ucx" in str(info.value)

    _run(scenario)


# --------------------------------------------------------------------------- zero copy


def test_large_frames_arrive_as_views_of_shared_memory() -> None:
    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, _ = await _linked(transport)
        array = np.arange(1 << 18, dtype=np.float64)
        await conn.send([b"small", array])
        event = await _next(b, Received)
        small, big = event.frames
        assert bytes(small) == b"small"
        assert isinstance(_base_object(big), mmap.mmap)
        assert not big.readonly
        np.testing.assert_array_equal(np.frombuffer(big, dtype=np.float64), array)

    _run(scenario)


def test_segment_is_reused_only_after_the_receiver_drops_its_views() -> None:
    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, link = await _linked(transport)
        await conn.send([np.full(1 << 20, 1, np.uint8)])
        first = await _next(b, Received)
        await conn.send([np.full(1 << 20, 2, np.uint8)])
        second = await _next(b, Received)
        assert len(link._pool) == 2  # the first segment was still held
        assert bytes(first.frames[0][:4]) == b"\x01" * 4
        del first
        gc.collect()
        await conn.send([np.full(1 << 20, 3, np.uint8)])
        third = await _next(b, Received)
        assert len(link._pool) == 2  # the first segment came back
        assert bytes(second.frames[0][:4]) == b"\x02" * 4
        assert bytes(third.frames[0][:4]) == b"\x03" * 4

    _run(scenario)


@pytest.mark.parametrize("path", ["send_now", "send_data"])
def test_a_busy_word_cleared_by_something_else_drops_the_link_and_spares_the_held_message(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver holds a message in a pooled segment; something other than the
    receiver's release zeroes the segment's busy word (a foreign writer, or the
    sender's mapping replaced). The sender must not take the segment for free and
    write its next message over the held one: it drops the link, naming the segment.
    (With a 0/1 busy flag the sender reused it, overwrote the held message, and the
    receiver's own check dropped the link only after that.) ``send_now`` takes a free
    pooled segment in one call; a message of three frames takes ``send_data``'s way."""

    def message(fill: int) -> list[Any]:
        big = np.full(1 << 20, fill, np.uint8)
        return [big] if path == "send_now" else [b"head", big, b"tail"]

    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, link = await _linked(transport)
        await conn.send(message(1))
        held = (await _next(b, Received)).frames
        big = held[0] if path == "send_now" else held[1]
        (segment,) = link._pool
        struct.pack_into("@I", segment.mm, 0, 0)  # not the receiver's release
        with caplog.at_level(logging.WARNING, logger="hpcproc.transports"):
            with pytest.raises(SendError) as info:
                await conn.send(message(2))
            lost = await _next(b, ErrorEvent)
        assert info.value.code is SendErrorCode.FAILED
        assert lost.error.code is EventErrorCode.CONNECTION_LOST
        assert any(
            f"segment {segment.seg_id}'s busy word reads 0x0" in r.getMessage()
            for r in caplog.records
        )
        assert bytes(big[:4]) == b"\x01" * 4 and bytes(big[-4:]) == b"\x01" * 4

    _run(scenario)


def test_a_busy_word_changed_while_the_message_is_held_is_logged_at_release(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, link = await _linked(transport)
        await conn.send([np.full(1 << 20, 1, np.uint8)])
        held = await _next(b, Received)
        (segment,) = link._pool
        assert segment.is_free() is False
        struct.pack_into("@I", segment.mm, 0, 0)
        with caplog.at_level(logging.WARNING, logger="hpcproc.transports"):
            del held
            gc.collect()
        assert any(
            f"segment {segment.seg_id}'s busy word changed while its message was held: 0x0"
            in r.getMessage()
            for r in caplog.records
        )
        assert segment.is_free()  # handed back as the receiver saw it lent

    _run(scenario)


async def _exit_code(pid: int) -> int:
    """Wait (bounded) for the child ``pid`` to exit; its exit code."""
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    fd = os.pidfd_open(pid)
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, TIMEOUT)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        loop.remove_reader(fd)
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_dropping_its_copy_of_a_held_message_keeps_the_segment_busy() -> None:
    """A child made by ``fork`` (multiprocessing's default on Linux) inherits the
    segments' mappings and the receiver's objects, with the callbacks that hand a
    segment back. The child dropping its copy of a message that the parent still
    holds must not hand the segment back: the sender would write over the parent's."""

    async def scenario(transport: ShmTransport) -> None:
        a, b, conn, link = await _linked(transport)
        await conn.send([np.full(1 << 20, 1, np.uint8)])
        held = await _next(b, Received)
        (segment,) = link._pool
        lent = b._links[a.address]._rx_segments[segment.seg_id]  # type: ignore[attr-defined]
        pid = os.fork()
        if pid == 0:  # the child: drop the message, which runs the hand-back callback
            code = 1
            try:
                del held
                gc.collect()
                code = 0 if lent.watch is None else 3
            finally:
                os._exit(code)
        assert await _exit_code(pid) == 0  # 3: the child's drop did not run the callback
        assert segment.is_free() is False
        await conn.send([np.full(1 << 20, 2, np.uint8)])
        second = await _next(b, Received)
        assert bytes(held.frames[0][:4]) == b"\x01" * 4
        assert bytes(second.frames[0][:4]) == b"\x02" * 4
        assert len(link._pool) == 2

    _run(scenario)


def test_a_drain_inside_a_delivery_delivers_nothing_twice() -> None:
    async def scenario(transport: ShmTransport) -> None:
        a, b, conn, _ = await _linked(transport)
        link = b._links[a.address]  # type: ignore[attr-defined]
        deliver, deliver_inline, deliver_segment = link._drain_callbacks
        nested: list[int] = []

        def deliver_inline_and_drain(conn_id: int, frames: list[memoryview]) -> bool:
            nested.append(link._drain())
            return bool(deliver_inline(conn_id, frames))

        link._drain_callbacks = (deliver, deliver_inline_and_drain, deliver_segment)
        for i in range(3):
            await conn.send([b"message %d" % i])
        got = [bytes((await _next(b, Received)).frames[0]) for _ in range(3)]
        assert got == [b"message 0", b"message 1", b"message 2"]
        assert nested == [0, 0, 0]
        assert b.receive_nowait() is None  # nothing delivered twice

    _run(scenario)


def test_a_process_reading_the_busy_word_while_the_other_hands_it_over_sees_no_zero() -> None:
    """The sender reads the busy word while the receiver writes it, and the other way
    round: each write must be one store. (``struct.pack_into``, used before, zero-fills
    then writes: a reader saw 0, took it for "free", and the release's second store
    then wiped the sender's busy mark.) A child reads the word while this process hands
    the segment back and forth as the two sides do; once used, the word is never 0."""
    mm, fd = _new_memfd("hpcproc-shm-segment", SEG_HEADER + 4096, populate=True)
    os.close(fd)
    sender, receiver = _TxSegment(1, mm, 4096), _RxSegment(1, mm, 4096, False)
    sender.mark_busy()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read the word, count zeros
        code = 1
        try:
            word = memoryview(mm)[:4].cast("I")
            os.write(ready_w, b"r")
            zeros = sum(1 for _ in range(1_000_000) if word[0] == 0)
            code = 0 if zeros == 0 else 3
        finally:
            os._exit(code)
    os.close(ready_w)
    status: int | None = None
    try:
        assert os.read(ready_r, 1) == b"r"
        deadline = time.monotonic() + TIMEOUT
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
                break
            assert time.monotonic() < deadline, "the reading child did not finish"
            for _ in range(1000):
                receiver.lent = sender.word[0]
                receiver.release()
                assert sender.is_free()
                sender.mark_busy()
    finally:
        os.close(ready_r)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status == 0  # 3: the child read 0


def _fill_socket(link: Any) -> None:
    """Fill ``link``'s socket with wake-ups its peer has not read (a peer that reads
    nothing for a while; it ignores them when it does)."""
    sent = 0
    while True:
        try:
            link._sock.send(b"W")
        except BlockingIOError:
            break
        sent += 1
    assert sent > 0


def test_a_full_socket_delays_a_new_segment_and_what_follows_it_instead_of_failing() -> None:
    """A new segment's descriptor goes over the link's socket, which fills when the
    peer reads nothing for a while (it computes, or waits for a CPU, while messages
    keep coming: 278 unread 256 KiB messages did it). The send then waits for room,
    and a message sent after it does not overtake it. It used to fail the send and
    drop the bundle ("a send failed: BlockingIOError")."""

    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, link = await _linked(transport)
        _fill_socket(link)
        large = asyncio.create_task(conn.send([np.full(1 << 20, 7, np.uint8)]))
        small = asyncio.create_task(conn.send([b"sent after"]))
        await asyncio.sleep(0)  # one turn: both have tried; the large one needs a segment
        assert not large.done() and not small.done()
        first = await _next(b, Received)
        assert bytes(first.frames[0][:4]) == b"\x07" * 4 and len(first.frames[0]) == 1 << 20
        second = await _next(b, Received)
        assert bytes(second.frames[0]) == b"sent after"
        await asyncio.wait_for(asyncio.gather(large, small), TIMEOUT)
        assert link.alive

    _run(scenario)


def test_a_link_that_fails_while_a_notice_waits_fails_the_send_and_closes_its_descriptor() -> None:
    async def scenario(transport: ShmTransport) -> None:
        a, b, conn, link = await _linked(transport)

        def segment_fds() -> int:
            count = 0
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(FileNotFoundError):  # listdir's own descriptor
                    count += "hpcproc-shm-segment" in os.readlink(f"/proc/self/fd/{fd}")
            return count

        _fill_socket(link)
        large = asyncio.create_task(conn.send([np.full(1 << 20, 7, np.uint8)]))
        await asyncio.sleep(0)  # one turn: its notice waits for room
        assert len(link._notices) == 1
        await transport.break_connection(a.address, b.address)
        with pytest.raises(SendError) as info:
            await asyncio.wait_for(large, TIMEOUT)
        assert info.value.code is SendErrorCode.FAILED
        assert not link._notices and segment_fds() == 0

    _run(scenario)


def test_header_and_payload_messages_through_pooled_segments_arrive_intact() -> None:
    # The process layer's shape (a small header frame, a large payload frame) sent
    # again and again: through a new segment while earlier ones are held, through a
    # pooled one (send's fast path) once they are dropped; never overwritten early.
    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, link = await _linked(transport)
        held = []
        for i in range(3):
            await conn.send([b"head%d" % i, np.full(100_000, i, np.uint8)])
            held.append(await _next(b, Received))
        assert len(link._pool) == 3
        for i, event in enumerate(held):
            head, body = event.frames
            assert bytes(head) == b"head%d" % i
            assert isinstance(_base_object(body), mmap.mmap)
            assert np.all(np.frombuffer(body, np.uint8) == i)
        held.clear()
        gc.collect()
        for i in range(3, 9):
            assert conn.send_nowait([b"head%d" % i, np.full(100_000, i, np.uint8)])
            event = await _next(b, Received)
            head, body = event.frames
            assert bytes(head) == b"head%d" % i and np.all(np.frombuffer(body, np.uint8) == i)
            del event, head, body
            gc.collect()
        assert len(link._pool) == 3  # no new segment: the pooled ones came back

    _run(scenario)


def test_header_and_payload_below_the_threshold_go_through_the_ring_at_once() -> None:
    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, _ = await _linked(transport)
        payload = np.arange(4000, dtype=np.float64)  # 32000 bytes: inline
        assert conn.send_nowait([b"head", payload])
        head, body = (await _next(b, Received)).frames
        assert bytes(head) == b"head"
        assert not isinstance(_base_object(body), mmap.mmap)  # a copy out of the ring
        np.testing.assert_array_equal(np.frombuffer(body, np.float64), payload)

    _run(scenario, inline_threshold=65536)


def test_message_too_big_for_the_ring_goes_through_a_segment() -> None:
    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, _ = await _linked(transport)
        frames = [bytes([i % 251]) * 1000 for i in range(100)]  # 100 KB > ring / 4
        await conn.send(frames)
        event = await _next(b, Received)
        assert [bytes(f) for f in event.frames] == frames

    _run(scenario, ring_size=1 << 16, inline_threshold=4096)


def test_sender_waits_for_ring_space_and_keeps_order() -> None:
    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, _ = await _linked(transport)
        count = 1000  # about 1 MB through a 64 KiB ring

        async def sender() -> None:
            for i in range(count):
                await conn.send([struct.pack("<I", i) * 256])

        task = asyncio.create_task(sender())
        for i in range(count):
            event = await _next(b, Received)
            assert bytes(event.frames[0][:4]) == struct.pack("<I", i)
        await asyncio.wait_for(task, TIMEOUT)

    _run(scenario, ring_size=1 << 16)


# --------------------------------------------------------------------------- corruption


def _corrupt_record_length(link: Any, off: int) -> None:
    struct.pack_into("<I", link._writer.mm, off, 1 << 30)


def _corrupt_record_magic(link: Any, off: int) -> None:
    struct.pack_into("<I", link._writer.mm, off + 4, 0xDEADBEEF)


def _corrupt_frame_length(link: Any, off: int) -> None:
    struct.pack_into("<Q", link._writer.mm, off + REC.size, 1 << 40)


def _corrupt_frame_count(link: Any, off: int) -> None:
    struct.pack_into("<I", link._writer.mm, off + 12, 1 << 20)


def _corrupt_ring_head(link: Any, off: int) -> None:
    struct.pack_into("<Q", link._writer.mm, 64, link._writer.head + 3 * link._writer.capacity)


def _corrupt_segment_offset(link: Any, off: int) -> None:
    struct.pack_into("<Q", link._writer.mm, off + REC.size + 8 + 8, 1 << 50)


def _corrupt_segment_id(link: Any, off: int) -> None:
    struct.pack_into("<Q", link._writer.mm, off + REC.size + 8, 999_999)


def _corrupt_segment_busy_word(link: Any, off: int) -> None:
    (segment,) = link._pool
    struct.pack_into("@I", segment.mm, 0, 0)


def test_a_peer_that_closes_holding_unread_wake_ups_is_gone_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A socket closed while it holds unread bytes is reset: the peer reads
    ECONNRESET, not EOF. A link sees that when its peer closes just after we sent it
    a wake-up (every run of the process benchmark over shm ended so, and warned "its
    socket failed"). The peer is gone, as on EOF: the bundle is lost, with no
    warning."""

    async def scenario(transport: ShmTransport) -> None:
        a, b, _conn, link = await _linked(transport)
        theirs = b._links[a.address]
        link._signal(b"W")  # a wake-up that b's loop has no turn to read...
        theirs.abort()  # ... before b's end of the link closes
        with caplog.at_level(logging.DEBUG, logger="hpcproc.transports"):
            lost = await _next(a, ErrorEvent)
        assert lost.error.code is EventErrorCode.CONNECTION_LOST
        assert lost.error.remote_address == b.address
        # The reset was what a saw (not an EOF), and it warned about nothing.
        assert any("reset its socket" in r.getMessage() for r in caplog.records)
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    _run(scenario)


@pytest.mark.parametrize(
    ("corrupt", "large", "reason"),
    [
        (_corrupt_record_length, False, ""),
        (_corrupt_record_magic, False, ""),
        (_corrupt_frame_length, False, ""),
        (_corrupt_frame_count, False, ""),
        (_corrupt_ring_head, False, ""),
        (_corrupt_segment_offset, True, "beyond segment"),
        (_corrupt_segment_id, True, "unknown segment"),
        (_corrupt_segment_busy_word, True, "came without its busy mark"),
    ],
    ids=lambda p: getattr(p, "__name__", str(p)).removeprefix("_corrupt_"),
)
def test_corrupted_shared_memory_fails_the_bundle_with_a_logged_reason(
    corrupt: Callable[[Any, int], None],
    large: bool,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(transport: ShmTransport) -> None:
        a, b, conn, link = await _linked(transport)
        writer = link._writer
        off = DATA_OFF + (writer.head & (writer.capacity - 1))
        frame = np.ones(1 << 16, np.uint8) if large else b"x" * 16
        # send returns without yielding to the loop: the receiver has not read it yet.
        await conn.send([frame])
        if large:
            assert struct.unpack_from("<Q", writer.mm, off + REC.size)[0] >> 63
        corrupt(link, off)
        link._signal(b"W")  # in case the receiver sleeps
        with caplog.at_level(logging.WARNING, logger="hpcproc.transports"):
            lost = await _next(b, ErrorEvent)
        assert lost.error.code is EventErrorCode.CONNECTION_LOST
        assert lost.error.remote_address == a.address
        assert "corrupt shared memory" in lost.error.message and reason in lost.error.message
        assert any("corrupt shared memory" in r.getMessage() for r in caplog.records)
        theirs = await _next(a, ErrorEvent)
        assert theirs.error.code is EventErrorCode.CONNECTION_LOST
        # The process is fine and a new bundle works.
        again = await a.connect(b.address, timeout=TIMEOUT)
        await _next(b, ConnectionOpened)
        await again.send([b"after"])
        assert bytes((await _next(b, Received)).frames[0]) == b"after"

    _run(scenario)


# --------------------------------------------------------------------------- dead peers

_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from hpcproc.transports import create

    async def main():
        transport = create("shm")
        endpoint = await transport.new_endpoint()
        conn = await endpoint.connect(sys.argv[1].encode(), timeout=10)
        await conn.send([b"hello", np.ones(1 << 20, np.uint8)])
        await asyncio.Event().wait()  # until killed

    asyncio.run(main())
    """
)


def test_killed_peer_is_reported_lost_and_its_memory_unmapped() -> None:
    async def scenario(transport: ShmTransport) -> None:
        before = _mapping_lines()
        endpoint = await transport.new_endpoint()
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, endpoint.address.decode()],
            cwd=ROOT,
        )
        try:
            opened = await _next(endpoint, ConnectionOpened)
            back = await endpoint.connect(opened.remote_address, timeout=TIMEOUT)
            received = await _next(endpoint, Received)
            assert bytes(received.frames[0]) == b"hello"
            assert isinstance(_base_object(received.frames[1]), mmap.mmap)
            assert len(_mapping_lines()) > len(before)
            child.send_signal(signal.SIGKILL)
            lost = await _next(endpoint, ErrorEvent)
            assert lost.error.code is EventErrorCode.CONNECTION_LOST
            assert lost.error.remote_address == opened.remote_address
            await back.close()
        finally:
            child.kill()
            child.wait(TIMEOUT)
        # The ring is unmapped at once; the segment when the application drops it.
        del received
        gc.collect()
        assert _mapping_lines() == before

    _run(scenario)


_SUITE = [
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "-x",
    "tests/test_transport_conformance.py",
    "tests/test_shm.py",
    "-k",
    "shm and not dev_shm",
]
_PRIVATE_DEV_SHM = """
mount -t tmpfs hpcproc-shm-check /dev/shm || exit 97
"$@"
rc=$?
echo "@@DEVSHM@@"
ls -A /dev/shm
exit $rc
"""


def _private_dev_shm_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs probe /dev/shm"],
        capture_output=True,
        timeout=TIMEOUT,
    )
    return probe.returncode == 0


def test_shm_suite_leaves_no_dev_shm_entry() -> None:
    """Runs every shm test (conformance, SIGKILL of a peer) and looks at /dev/shm.

    With root and ``unshare`` the suite gets a private, empty /dev/shm, so that other
    programs on the machine cannot disturb the check; otherwise the shared /dev/shm
    is compared before and after.
    """
    suite = [sys.executable, *_SUITE]
    private = _private_dev_shm_works()
    before = set() if private else set(os.listdir("/dev/shm"))
    command = ["unshare", "-m", "sh", "-c", _PRIVATE_DEV_SHM, "sh", *suite] if private else suite
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode != 97, "could not mount a private /dev/shm"
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    if private:
        assert "@@DEVSHM@@" in out
        after = set(out.split("@@DEVSHM@@", 1)[1].split())
    else:
        after = set(os.listdir("/dev/shm"))
    left = sorted(after - before)
    assert left == [], f"the shm suite left /dev/shm entries: {left}"


def test_data_on_an_unknown_connection_drops_the_link_mid_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(transport: ShmTransport) -> None:
        a, b, conn, link = await _linked(transport)
        writer = link._writer
        off = DATA_OFF + (writer.head & (writer.capacity - 1))
        await conn.send([b"first"])
        await conn.send([b"second"])
        struct.pack_into("<Q", writer.mm, off + 16, 12345)  # the first record's conn_id
        link._signal(b"W")
        with caplog.at_level(logging.WARNING, logger="hpcproc.transports"):
            lost = await _next(b, ErrorEvent)
        assert lost.error.code is EventErrorCode.CONNECTION_LOST
        assert "unknown connection" in lost.error.message
        theirs = await _next(a, ErrorEvent)
        assert theirs.error.code is EventErrorCode.CONNECTION_LOST
        # Nothing of the old bundle follows, not even the second record.
        await transport.close()
        assert isinstance(await _next(b), EndPointClosed)

    _run(scenario)


def test_segments_beyond_the_pool_are_one_shot_and_freed_with_their_views() -> None:
    async def scenario(transport: ShmTransport) -> None:
        _a, b, conn, link = await _linked(transport)
        before = len(_mapping_lines())
        await conn.send([np.full(1 << 20, 1, np.uint8)])
        pooled = await _next(b, Received)
        await conn.send([np.full(1 << 20, 2, np.uint8)])  # pool full and busy
        oneshot = await _next(b, Received)
        assert len(link._pool) == 1
        assert bytes(pooled.frames[0][:2]) == b"\x01\x01"
        assert bytes(oneshot.frames[0][:2]) == b"\x02\x02"
        with_oneshot = len(_mapping_lines())
        del oneshot
        gc.collect()
        assert len(_mapping_lines()) < with_oneshot  # only the receiver mapped it
        assert len(_mapping_lines()) > before  # the pooled one stays on both sides
        del pooled
        gc.collect()
        await conn.send([np.full(1 << 20, 3, np.uint8)])  # reuses the pooled segment
        third = await _next(b, Received)
        assert bytes(third.frames[0][:2]) == b"\x03\x03"
        assert len(link._pool) == 1

    _run(scenario, max_pool_segments=1)


_RAW_PEER = textwrap.dedent(
    """
    import os, socket, sys
    if sys.argv[2] == "other-user":
        os.setgid(65534)
        os.setuid(65534)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(b"\\0" + sys.argv[1].encode())
    if sys.argv[2] == "garbage":
        sock.send(b"H\\0\\0\\0garbage without a descriptor")
    print("closed" if sock.recv(64) == b"" else "answered", flush=True)
    """
)


@pytest.mark.parametrize(
    "peer",
    [
        "garbage",
        pytest.param(
            "other-user",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch user"),
        ),
    ],
)
def test_bad_handshakes_are_refused_and_logged(peer: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(transport: ShmTransport) -> None:
        endpoint = await transport.new_endpoint()
        name = bytes(endpoint.address).rsplit(b":", 1)[1].decode()
        with caplog.at_level(logging.WARNING, logger="hpcproc.transports.shm"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RAW_PEER, name, peer, stdout=subprocess.PIPE
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert out.decode().strip() == "closed"
        assert any("refused" in r.getMessage() for r in caplog.records)
        # Nothing reached the endpoint, and it still accepts good peers.
        other = await transport.new_endpoint()
        conn = await other.connect(endpoint.address, timeout=TIMEOUT)
        opened = await _next(endpoint, ConnectionOpened)
        assert opened.remote_address == other.address
        await conn.send([b"ok"])
        assert bytes((await _next(endpoint, Received)).frames[0]) == b"ok"

    _run(scenario)


_OTHER_USER_LISTENER = textwrap.dedent(
    """
    import os, socket, sys
    os.setgid(65534)
    os.setuid(65534)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(b"\\0" + sys.argv[1].encode())
    sock.listen(1)
    print("listening", flush=True)
    sock.settimeout(30)
    conn, _ = sock.accept()
    conn.settimeout(30)
    print("got " + repr(conn.recv(64)), flush=True)
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another user")
def test_endpoint_of_another_user_is_refused_by_the_dialer_naming_both_uids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """shm trusts the Unix user, not a cookie: a dialer refuses an acceptor of another
    uid (read with SO_PEERCRED) before sending it anything, and the error says so."""

    async def scenario(transport: ShmTransport) -> None:
        endpoint = await transport.new_endpoint()
        prefix = bytes(endpoint.address).rsplit(b":", 1)[0]
        name = f"hpcproc-test-other-user-{os.getpid()}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _OTHER_USER_LISTENER, name, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
            assert line == b"listening\n", line
            target = EndPointAddress(prefix + b":" + name.encode())
            with pytest.raises(ConnectError) as info:
                await endpoint.connect(target, timeout=TIMEOUT)
            assert info.value.code is ConnectErrorCode.FAILED
            text = str(info.value)
            assert "another user" in text and "uid 65534" in text, text
            assert f"uid {os.getuid()}" in text and "SO_PEERCRED" in text, text
            # The refused dialer sent nothing (no ring, no hello) before closing.
            out = await asyncio.wait_for(proc.stdout.read(), TIMEOUT)
            assert out == b"got b''\n", out
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    _run(scenario)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another user")
def test_dialer_of_another_user_is_refused_and_logged_naming_its_uid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(transport: ShmTransport) -> None:
        endpoint = await transport.new_endpoint()
        name = bytes(endpoint.address).rsplit(b":", 1)[1].decode()
        with caplog.at_level(logging.WARNING, logger="hpcproc.transports.shm"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RAW_PEER, name, "other-user", stdout=subprocess.PIPE
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert out.decode().strip() == "closed"
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert any("another user" in m and "uid 65534" in m for m in refusals), refusals

    _run(scenario)


def test_corrupted_consumer_tail_fails_the_bundle_on_the_sending_side(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(transport: ShmTransport) -> None:
        a, _b, conn, link = await _linked(transport)
        tail_offset = 128
        with caplog.at_level(logging.WARNING, logger="hpcproc.transports"):
            with pytest.raises(SendError) as info:
                for _ in range(200):  # 200 KB through a 64 KiB ring: the tail is read
                    struct.pack_into("<Q", link._writer.mm, tail_offset, 1 << 60)
                    await conn.send([b"x" * 1024])
            assert info.value.code is SendErrorCode.FAILED
            lost = await _next(a, ErrorEvent)
        assert lost.error.code is EventErrorCode.CONNECTION_LOST
        assert "corrupt shared memory" in lost.error.message
        assert any("corrupt shared memory" in r.getMessage() for r in caplog.records)

    _run(scenario, ring_size=1 << 16)


_STREAM_CHILD = textwrap.dedent(
    """
    import asyncio, struct, sys
    from hpcproc.transports import create

    async def main():
        transport = create("shm", ring_size=1 << 16)
        endpoint = await transport.new_endpoint()
        conn = await endpoint.connect(sys.argv[1].encode(), timeout=10)
        for i in range(int(sys.argv[2])):
            await conn.send([struct.pack("<Q", i) * (1 + i % 97)])
        await conn.close()
        await transport.close()  # flushes what the ring still holds

    asyncio.run(main())
    """
)


def test_stream_between_processes_through_a_small_ring_arrives_intact_in_order() -> None:
    """The producer publishes while the consumer reads, in another process, for real."""
    count = 20_000

    async def scenario(transport: ShmTransport) -> None:
        endpoint = await transport.new_endpoint()
        child = subprocess.Popen(
            [sys.executable, "-c", _STREAM_CHILD, endpoint.address.decode(), str(count)],
            cwd=ROOT,
        )
        try:
            await _next(endpoint, ConnectionOpened)
            for i in range(count):
                event = await _next(endpoint, Received)
                assert bytes(event.frames[0]) == struct.pack("<Q", i) * (1 + i % 97), i
            await _next(endpoint, ConnectionClosed)
            await endpoint.close()
            assert child.wait(TIMEOUT) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(TIMEOUT)

    _run(scenario)


_ECHO_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from hpcproc.transports import ConnectionOpened, Received, create

    async def main():
        transport = create("shm")
        endpoint = await transport.new_endpoint()
        back = await endpoint.connect(sys.argv[1].encode(), timeout=10)
        while True:
            event = await endpoint.receive()
            if isinstance(event, Received):
                await back.send(event.frames)
            elif not isinstance(event, ConnectionOpened):
                break  # the parent closed its connection or went away
        await transport.close()

    asyncio.run(main())
    """
)


def test_ping_pong_with_another_process_never_sees_a_half_written_counter() -> None:
    """Thousands of round trips: each side polls the counters the other is writing."""
    rounds = 5000

    async def scenario(transport: ShmTransport) -> None:
        endpoint = await transport.new_endpoint()
        child = subprocess.Popen(
            [sys.executable, "-c", _ECHO_CHILD, endpoint.address.decode()], cwd=ROOT
        )
        try:
            opened = await _next(endpoint, ConnectionOpened)
            conn = await endpoint.connect(opened.remote_address, timeout=TIMEOUT)
            for i in range(rounds):
                payload = struct.pack("<Q", i)
                await conn.send([payload])
                event = await _next(endpoint, Received)
                assert bytes(event.frames[0]) == payload
            await conn.close()
            assert child.wait(TIMEOUT) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(TIMEOUT)

    _run(scenario)


def test_dial_crossing_a_completed_link_reuses_it_and_keeps_its_connections() -> None:
    """The race behind crossed connects: A's dial completed (and carries a
    connection) while B's dial to A is still in flight. A must not replace the live
    bundle, and B must end up on it, so neither side sees CONNECTION_LOST."""

    async def body(transport: ShmTransport) -> None:
        a = await transport.new_endpoint()
        b = await transport.new_endpoint()
        conn = await a.connect(b.address)
        await _next(b, ConnectionOpened)
        # B dials A itself, as its in-flight connect would.
        link = await b._open_link(a.address, TIMEOUT)  # type: ignore[attr-defined]
        assert link is b._links[a.address]  # type: ignore[attr-defined]
        await conn.send([b"still here"])
        got = await _next(b, Received)
        assert bytes(got.frames[0]) == b"still here"
        back = await b.connect(a.address)
        await back.send([b"and back"])
        await _next(a, ConnectionOpened)
        assert bytes((await _next(a, Received)).frames[0]) == b"and back"

    _run(body)


def test_crossed_connects_share_one_link_and_lose_nothing() -> None:
    """A and B dial each other at once, 25 times with fresh endpoints: each time one
    dial wins (the link dialed from the smaller address), both sides end up on that
    one link (one socket pair), and connections over it lose nothing."""

    async def body(transport: ShmTransport) -> None:
        for round_ in range(25):
            a = await transport.new_endpoint()
            b = await transport.new_endpoint()
            # Both establish their link at once, as two connects do when neither has
            # seen the other's link yet (connect checks for a link first).
            pair = [a._establish(b.address, TIMEOUT), b._establish(a.address, TIMEOUT)]  # type: ignore[attr-defined]
            link_a, link_b = await asyncio.wait_for(asyncio.gather(*pair), TIMEOUT)
            assert link_a is a._links[b.address] and link_b is b._links[a.address]  # type: ignore[attr-defined]
            ab = await a.connect(b.address, timeout=TIMEOUT)
            ba = await b.connect(a.address, timeout=TIMEOUT)
            assert link_a._sock.getsockname() == link_b._sock.getpeername()
            assert link_a._sock.getpeername() == link_b._sock.getsockname()
            await ab.send([b"a->b %d" % round_])
            await ba.send([b"b->a %d" % round_])
            for endpoint, text in ((b, b"a->b %d" % round_), (a, b"b->a %d" % round_)):
                await _next(endpoint, ConnectionOpened)
                got = await _next(endpoint, Received)
                assert bytes(got.frames[0]) == text
            await ab.close()
            await ba.close()
            await _next(b, ConnectionClosed)
            await _next(a, ConnectionClosed)
            await a.close()
            await b.close()

    _run(body)
