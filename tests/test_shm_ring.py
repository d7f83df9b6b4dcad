"""The shm transport's ring (hpcproc.transports._shm_ring): the Python classes and the
compiled ones (_ring_accel.c) against the same tests, and against each other (either
side of a link may use either)."""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from hpcproc.transports import _shm_ring
from hpcproc.transports._multiplex import Kind
from hpcproc.transports._shm_ring import (
    DATA_OFF,
    HEADER_SIZE,
    OUT_OF_LINE,
    REC,
    PyRingReader,
    PyRingWriter,
    RingError,
    init_ring,
    record_size,
)

from ._compiled import REQUIRE_ENV, compiled_required

try:
    from hpcproc.transports import _ring_accel
except ImportError:  # built without a compiler
    _ring_accel = None  # type: ignore[assignment]

CAPACITY = 1 << 16

IMPLS: dict[str, tuple[Any, Any]] = {"py": (PyRingWriter, PyRingReader)}
if _ring_accel is not None:
    IMPLS["c"] = (_ring_accel.RingWriter, _ring_accel.RingReader)
PAIRS = [(w, r) for w in IMPLS for r in IMPLS]


def test_the_compiled_ring_is_built_and_used_unless_turned_off() -> None:
    if _ring_accel is None:
        if compiled_required():
            pytest.fail(f"{REQUIRE_ENV}=1 but hpcproc.transports._ring_accel was not built")
        pytest.skip("the compiled ring was not built (no C compiler at install)")
    turned_off = os.environ.get(_shm_ring.ACCEL_ENV, "1").strip() == "0"
    assert _shm_ring.ACCELERATED is not turned_off
    expected = IMPLS["py"] if turned_off else IMPLS["c"]
    assert (_shm_ring.RingWriter, _shm_ring.RingReader) == expected


class Ring:
    """A ring in anonymous shared memory with a writer and a reader of given kinds."""

    def __init__(self, writer: str, reader: str, capacity: int = CAPACITY) -> None:
        self.mm = mmap.mmap(-1, HEADER_SIZE + capacity)
        init_ring(self.mm, capacity)
        self.writer = IMPLS[writer][0](self.mm, capacity)
        self.reader = IMPLS[reader][1](self.mm, capacity)
        self.got: list[tuple[Any, ...]] = []

    def deliver(self, kind: Kind, conn_id: int, frames: list[Any]) -> bool:
        self.got.append(("any", kind, conn_id, [_plain(f) for f in frames]))
        return True

    def inline(self, conn_id: int, frames: list[memoryview]) -> bool:
        self.got.append(("inline", conn_id, [bytes(f) for f in frames]))
        return True

    def segment(self, conn_id: int, head: memoryview | None, seg: int, off: int, n: int) -> bool:
        self.got.append(("segment", conn_id, None if head is None else bytes(head), seg, off, n))
        return True

    def drain(self, fast: bool = True) -> int:
        if fast:
            n: int = self.reader.drain(self.deliver, self.inline, self.segment)
        else:
            n = self.reader.drain(self.deliver)
        return n

    def write(self, kind: Kind, conn_id: int, parts: list[Any]) -> bool:
        lengths = tuple(
            OUT_OF_LINE | p[2] if isinstance(p, tuple) else len(p) for p in parts
        )
        payload = sum(16 if isinstance(p, tuple) else len(p) for p in parts)
        rec_len = REC.size + 8 * len(parts) + payload
        off = self.writer.reserve(record_size(len(parts), payload))
        if off < 0:
            return False
        refs = [p[:2] if isinstance(p, tuple) else memoryview(p) for p in parts]
        self.writer.write(off, rec_len, kind, conn_id, lengths, refs)
        self.writer.publish()
        return True

    def close(self) -> None:
        self.writer.release()
        self.reader.release()
        self.mm.close()  # nothing exported any more: no BufferError


def _plain(frame: Any) -> Any:
    return frame if isinstance(frame, tuple) else bytes(frame)


@pytest.fixture(params=PAIRS, ids=[f"{w}-to-{r}" for w, r in PAIRS])
def ring(request: pytest.FixtureRequest) -> Iterator[Ring]:
    r = Ring(*request.param)
    yield r
    r.close()


def test_one_frame_records_come_out_in_order_as_writable_copies(ring: Ring) -> None:
    for i in range(5):
        assert ring.writer.send_one(i, memoryview(b"m%d" % i), 2) in (1, 2)
    frames: list[memoryview] = []

    def keep(conn_id: int, got: list[memoryview]) -> bool:
        frames.extend(got)
        return True

    assert ring.reader.drain(ring.deliver, keep) == 5
    assert [bytes(f) for f in frames] == [b"m%d" % i for i in range(5)]
    frames[0][0] = ord("X")  # a copy out of the ring, the receiver's to keep
    assert ring.reader.tail == ring.writer.head == 5 * record_size(1, 2)


def test_every_record_kind_reaches_the_callback_it_belongs_to(ring: Ring) -> None:
    seg = (7, 4096, 100_000)
    assert ring.write(Kind.OPEN, 1, [])
    assert ring.write(Kind.DATA, 1, [b"header", seg])
    assert ring.write(Kind.DATA, 1, [seg])
    assert ring.write(Kind.DATA, 1, [b"a", b"bc", seg, b""])
    assert ring.write(Kind.DATA, 2, [b"just one"])
    assert ring.write(Kind.CLOSE, 1, [])
    assert ring.drain() == 6
    assert ring.got == [
        ("any", Kind.OPEN, 1, []),
        ("segment", 1, b"header", 7, 4096, 100_000),
        ("segment", 1, None, 7, 4096, 100_000),
        ("any", Kind.DATA, 1, [b"a", b"bc", seg, b""]),
        ("inline", 2, [b"just one"]),
        ("any", Kind.CLOSE, 1, []),
    ]


def test_without_fast_callbacks_everything_goes_to_deliver(ring: Ring) -> None:
    seg = (3, 0, 10)
    ring.write(Kind.DATA, 4, [b"x"])
    ring.write(Kind.DATA, 4, [b"h", seg])
    assert ring.drain(fast=False) == 2
    assert ring.got == [("any", Kind.DATA, 4, [b"x"]), ("any", Kind.DATA, 4, [b"h", seg])]


def test_records_wrap_round_the_end_and_a_full_ring_refuses_until_drained(ring: Ring) -> None:
    rnd = random.Random(5)
    sent: list[tuple[int, bytes]] = []
    received: list[tuple[int, bytes]] = []

    def inline(conn_id: int, frames: list[memoryview]) -> bool:
        received.append((conn_id, bytes(frames[0])))
        return True

    full = 0
    for i in range(3000):  # several times round the ring
        data = bytes([i % 251]) * rnd.randrange(0, 3000)
        while True:
            status = ring.writer.send_one(i, memoryview(data), len(data))
            if status:
                break
            full += 1
            assert ring.reader.drain(ring.deliver, inline) > 0
        sent.append((i, data))
        if rnd.random() < 0.05:
            ring.reader.drain(ring.deliver, inline)
    ring.reader.drain(ring.deliver, inline)
    assert received == sent
    assert full > 0 and ring.got == []  # full at times; wrap markers are not records


def test_a_callback_returning_false_stops_and_the_rest_waits(ring: Ring) -> None:
    for i in range(3):
        ring.writer.send_one(i, memoryview(b"x"), 1)
    seen: list[int] = []

    def first_only(conn_id: int, frames: list[memoryview]) -> bool:
        seen.append(conn_id)
        return False

    assert ring.reader.drain(ring.deliver, first_only) == 1
    assert ring.reader.pending()
    assert ring.reader.drain(ring.deliver, ring.inline) == 2
    assert seen == [0] and [g[1] for g in ring.got] == [1, 2]


def test_a_callback_that_raises_consumes_its_record_and_the_error_propagates(
    ring: Ring,
) -> None:
    ring.writer.send_one(1, memoryview(b"a"), 1)
    ring.writer.send_one(2, memoryview(b"b"), 1)

    def boom(conn_id: int, frames: list[memoryview]) -> bool:
        raise KeyError(conn_id)

    with pytest.raises(KeyError):
        ring.reader.drain(ring.deliver, boom)
    assert ring.reader.drain(ring.deliver, ring.inline) == 1
    assert ring.got == [("inline", 2, [b"b"])]


def test_a_callback_that_releases_the_reader_ends_the_drain_safely(ring: Ring) -> None:
    # The shm link defers its teardown while it drains; should a callback release the
    # reader anyway, the drain stops (C) or fails on the released view (Python): it
    # never reads through a released buffer.
    for i in range(3):
        ring.writer.send_one(i, memoryview(b"x"), 1)

    def release(conn_id: int, frames: list[memoryview]) -> bool:
        ring.reader.release()
        return True

    with contextlib.suppress(ValueError):
        assert ring.reader.drain(ring.deliver, release) == 1


def test_sleep_and_wake_handshake(ring: Ring) -> None:
    reader, writer = ring.reader, ring.writer
    assert not reader.asleep
    assert reader.sleep()  # nothing pending: asleep
    assert reader.asleep
    assert writer.send_one(1, memoryview(b"x"), 1) == 2  # published; wake it
    assert writer.send_one(1, memoryview(b"y"), 1) == 1  # woken already for this sleep
    assert not reader.sleep()  # data pending: stays awake
    assert not reader.asleep
    assert ring.drain() == 2
    assert reader.sleep() and reader.asleep
    reader.wake()
    assert not reader.asleep
    assert writer.send_one(1, memoryview(b"z"), 1) == 1  # awake: no wake-up


def test_a_producer_waiting_for_space_is_signalled_once(ring: Ring) -> None:
    assert not ring.reader.producer_waiting()
    ring.writer.start_waiting()
    assert ring.reader.producer_waiting()
    assert not ring.reader.producer_waiting()  # once per wait
    ring.writer.stop_waiting()
    assert not ring.reader.producer_waiting()


# ---------------------------------------------------------------- corrupted rings


def _corrupt(impl: str, poke: Any) -> str:
    """Write one record with the Python writer, apply ``poke(mm, off)`` and return
    the RingError that reader ``impl`` raises."""
    ring = Ring("py", impl)
    try:
        off = DATA_OFF + (ring.writer.head & (CAPACITY - 1))
        ring.write(Kind.DATA, 9, [b"abc", b"defg"])
        poke(ring.mm, off)
        with pytest.raises(RingError) as info:
            ring.drain()
        return str(info.value)
    finally:
        ring.close()


def _head(value: int) -> Any:
    def poke(mm: mmap.mmap, off: int) -> None:
        struct.pack_into("<Q", mm, 64, value)

    return poke


def _u32(at: int, value: int) -> Any:
    def poke(mm: mmap.mmap, off: int) -> None:
        struct.pack_into("<I", mm, off + at, value)

    return poke


def _u8(at: int, value: int) -> Any:
    def poke(mm: mmap.mmap, off: int) -> None:
        mm[off + at] = value

    return poke


def _u64(at: int, value: int) -> Any:
    def poke(mm: mmap.mmap, off: int) -> None:
        struct.pack_into("<Q", mm, off + at, value)

    return poke


CORRUPTIONS = {
    "head beyond the ring": (_head(CAPACITY + 8), "producer head is"),
    "head not aligned": (_head(12), "producer head is"),
    "bad magic": (_u32(4, 0xDEADBEEF), "bad record magic 0xdeadbeef at 0"),
    "length beyond head": (_u32(0, 4000), "record length 4000 at 0 out of bounds"),
    "length below a header": (_u32(0, 8), "record length 8 at 0 out of bounds"),
    "unknown kind": (_u8(8, 77), "unknown message kind 77"),
    "control with frames": (_u8(8, int(Kind.OPEN)), "control message OPEN carries frames"),
    "too many frames": (_u32(12, 9000), "record claims 9000 frames"),
    "frame beyond the record": (_u64(24, 1000), "frame of 1000 bytes beyond the record"),
    "stray bytes": (_u64(24, 1), "record of 47 bytes has 2 stray bytes"),
    "segment reference cut": (_u64(32, OUT_OF_LINE | 5), "segment reference beyond the record"),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupted_ring_raises_the_same_ring_error_in_either_reader(impl: str, case: str) -> None:
    poke, message = CORRUPTIONS[case]
    assert message in _corrupt(impl, poke)


def test_a_length_that_wraps_round_64_bits_is_refused_by_either_reader() -> None:
    # A record length of 24 and a first frame length of 2**64 - 8: their sum with the
    # header (32) wraps round 2**64 to 24 in C, not in Python; neither takes it.
    def poke(mm: mmap.mmap, off: int) -> None:
        _u32(0, 24)(mm, off)
        _u64(24, (1 << 64) - 8)(mm, off)

    assert {_corrupt(impl, poke) for impl in IMPLS} == {"record claims 2 frames"}


def test_a_consumer_tail_beyond_head_is_refused_by_either_writer() -> None:
    for impl in IMPLS:
        ring = Ring(impl, "py", capacity=4096)
        try:
            struct.pack_into("<Q", ring.mm, 128, 1 << 20)  # tail far beyond head
            with pytest.raises(RingError, match="consumer tail is"):
                for _ in range(200):
                    ring.writer.send_one(1, memoryview(b"x" * 64), 64)
        finally:
            ring.close()


def test_released_rings_refuse_work_and_leave_the_mapping_closable() -> None:
    for w, r in PAIRS:
        ring = Ring(w, r)
        ring.writer.release()
        ring.reader.release()
        with pytest.raises(ValueError):
            ring.writer.send_one(1, memoryview(b"x"), 1)
        with pytest.raises(ValueError):
            ring.reader.drain(ring.deliver)
        ring.mm.close()
