"""A single-producer, single-consumer byte ring in a shared mapping.

The shared-memory transport gives each direction of a link one ring, living in a
``memfd`` that the producer created and passed to the consumer. The mapping starts
with a 4 KiB header, then ``capacity`` bytes of data (a power of two)::

    0    magic:u64  capacity:u64
    64   head:u64        written by the producer only (bytes ever published)
    128  tail:u64        written by the consumer only (bytes ever consumed)
    192  sleep_seq:u64   consumer: odd while it is (about to be) asleep
    256  wait_seq:u64    producer: odd while it waits for free space
    4096 data[capacity]

Each cache line has one writer; the four counters are native, aligned 64-bit words
(one machine store each, never seen torn). Records are 8-byte aligned and never wrap: when a
record does not fit before the end, the producer writes an 8-byte wrap marker and
starts again at offset 0. A record is::

    rec_len:u32  magic:u32  kind:u8 pad:3 nframes:u32 conn_id:u64   (24 bytes)
    len_0:u64 ... len_{n-1}:u64
    frame payloads in order

The 16 bytes after ``magic`` are :data:`hpcproc.transports._wire.PREFIX`. A length
with bit 63 set names a frame held in a shared segment; its payload in the record is
``seg_id:u64 offset:u64`` instead of the bytes.

Wake-ups: the consumer sets ``sleep_seq`` odd before it waits on its socket and
re-checks ``head`` afterwards; the producer publishes ``head`` and then reads
``sleep_seq``. A full memory barrier sits between the store and the load on both
sides (a lock round trip, which is a locked instruction on x86-64), so that one of
them always sees the other (Dekker's pattern). Space works the same way with
``wait_seq``.

Everything read from the mapping is checked before use: the peer may be buggy or its
memory corrupted, and this process must not read out of bounds. Violations raise
:class:`RingError`.

Two implementations: :class:`PyRingWriter` and :class:`PyRingReader` here (the
reference), and the same classes in C (``_ring_accel.c``), built at install where a
compiler exists. :data:`RingWriter` and :data:`RingReader` are the C ones when they were
built, unless ``HPCPROC_RING_ACCEL=0``; either side of a link may use either (same layout,
same checks, same errors). Measured here (one process writing and draining 8 B, CPU
per message): 1.47 us with the Python classes, 0.30 us with the C ones; a raw shm
round trip of 8 B between two processes, 7.5 -> 4.7 us.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
import threading
from collections.abc import Callable
from typing import Any, Final

from ._multiplex import Kind
from ._wire import DEFAULT_MAX_FRAMES, PREFIX

__all__ = [
    "ACCELERATED",
    "ACCEL_ENV",
    "DATA_OFF",
    "HEADER_SIZE",
    "HEAD_WORD",
    "OUT_OF_LINE",
    "REC",
    "SEGREF",
    "PyRingReader",
    "PyRingWriter",
    "RingError",
    "RingReader",
    "RingWriter",
    "check_ring",
    "init_ring",
    "record_size",
]

HEADER_SIZE: Final = 4096
DATA_OFF: Final = HEADER_SIZE
_MAGIC_OFF: Final = 0
# Indices of the shared counters in the header seen as 64-bit words.
_HEAD: Final = 64 // 8
_TAIL: Final = 128 // 8
_SLEEP: Final = 192 // 8
_WAIT: Final = 256 // 8
#: Index of ``head`` in :attr:`RingReader.words`, for callers polling it inline.
HEAD_WORD: Final = _HEAD

_RING_MAGIC: Final = 0x31524D4853505048  # "HPPSHMR1"
_REC_MAGIC: Final = 0x43455248  # "HREC"
_WRAP_MAGIC: Final = 0x50415257  # "WRAP"

# The shared counters are read and written as items of a native 64-bit memoryview:
# one aligned load or store each, so that the peer never sees a value half written.
# (struct.pack_into zero-fills its target before writing: a concurrent reader could
# see 0 there.)


def _words(mm: mmap.mmap) -> memoryview:
    return memoryview(mm)[:HEADER_SIZE].cast("Q")


_HDR2 = struct.Struct("<QQ")
_MARK = struct.Struct("<II")
#: Record header: rec_len, magic, then the shared link-message prefix.
REC = struct.Struct("<II" + PREFIX.format.lstrip("<"))
#: Payload of an out-of-line frame: segment id and offset in the segment's data area.
SEGREF = struct.Struct("<QQ")
#: Bit 63 of a frame length: the frame lives in a shared segment.
OUT_OF_LINE: Final = 1 << 63

_KINDS: Final = {int(k): k for k in Kind}
_DATA: Final = int(Kind.DATA)
_ONE = struct.Struct(REC.format + "Q")
_ONE_SIZE: Final = _ONE.size
#: A DATA record of one out-of-line frame: the header, one length, one segment reference.
_ONE_SEG_SIZE: Final = _ONE_SIZE + 16
#: The second length and the segment reference of a record of an inline frame then an
#: out-of-line one (the process layer's header and payload), read in one unpack.
_SECOND_LEN = struct.Struct("<Q")
_LENS: dict[int, struct.Struct] = {}

# A full memory barrier: acquiring and releasing an uncontended lock executes locked
# read-modify-write instructions.
_barrier_lock = threading.Lock()
_acquire = _barrier_lock.acquire
_release = _barrier_lock.release


def _barrier() -> None:
    _acquire()
    _release()


# x86-64 keeps stores in order with stores and loads with loads (TSO), so publishing
# (data, then head) and consuming (head, then data) need no fence there; only a store
# followed by a load of another word (the sleep and wait handshakes) does. Weaker
# machines (aarch64, ppc64le) fence both ways.
_WEAK_ORDER: Final = platform.machine().lower() not in {"x86_64", "amd64", "i686", "i386"}


def _lens(n: int) -> struct.Struct:
    s = _LENS.get(n)
    if s is None:
        s = _LENS[n] = struct.Struct(f"<{n}Q")
    return s


class RingError(Exception):
    """The ring's contents break the protocol (corrupted header or record)."""


def record_size(nframes: int, payload: int) -> int:
    """Bytes a record with ``nframes`` frames and ``payload`` payload bytes occupies."""
    return (REC.size + 8 * nframes + payload + 7) & ~7


def init_ring(mm: mmap.mmap, capacity: int) -> None:
    """Write the header of a fresh ring of ``capacity`` data bytes into ``mm``."""
    _HDR2.pack_into(mm, _MAGIC_OFF, _RING_MAGIC, capacity)


def check_ring(mm: mmap.mmap) -> int:
    """Validate a peer's ring header against the mapping; return its capacity.

    Raises:
        RingError: wrong magic, or a capacity that is not a power of two filling the
            mapping exactly.
    """
    if len(mm) <= HEADER_SIZE:
        raise RingError(f"ring mapping of {len(mm)} bytes is too small")
    magic, capacity = _HDR2.unpack_from(mm, _MAGIC_OFF)
    if magic != _RING_MAGIC:
        raise RingError("bad ring magic")
    if capacity & (capacity - 1) or capacity < 4096 or capacity != len(mm) - HEADER_SIZE:
        raise RingError(f"bad ring capacity {capacity} for a mapping of {len(mm)} bytes")
    return int(capacity)


class PyRingWriter:
    """The producer side of a ring; one per link direction, on one thread."""

    __slots__ = (
        "_free_to",
        "_mask",
        "_waiting",
        "_woken",
        "capacity",
        "head",
        "mm",
        "view",
        "words",
    )

    def __init__(self, mm: mmap.mmap, capacity: int) -> None:
        self.mm = mm
        self.view = memoryview(mm)
        self.words = _words(mm)
        self.capacity = capacity
        self._mask = capacity - 1
        #: Bytes published so far (the producer's private copy of ``head``).
        self.head = 0
        #: ``head`` may grow up to here without looking at the consumer's ``tail``.
        self._free_to = capacity
        self._woken = 0
        self._waiting = 0

    def reserve(self, size: int) -> int:
        """Offset in the mapping for a ``size``-byte record, or -1 when the ring is full.

        ``size`` must be a multiple of 8 and at most a quarter of the capacity. The
        record becomes visible only at the next :meth:`publish`.

        Raises:
            RingError: the consumer's ``tail`` is impossible.
        """
        head = self.head
        pos = head & self._mask
        room = self.capacity - pos
        need = size if size <= room else room + size
        if head + need > self._free_to:
            tail = self.words[_TAIL]
            if tail > head or head - tail > self.capacity:
                raise RingError(f"consumer tail is {head - tail} bytes from head")
            self._free_to = tail + self.capacity
            if head + need > self._free_to:
                return -1
        if size > room:
            _MARK.pack_into(self.mm, DATA_OFF + pos, room, _WRAP_MAGIC)
            head += room
            pos = 0
        self.head = head + size
        return DATA_OFF + pos

    def publish(self) -> bool:
        """Make reserved records visible; True when the consumer must be woken."""
        words = self.words
        if _WEAK_ORDER:
            _barrier()
        words[_HEAD] = self.head
        _acquire()
        _release()
        seq: int = words[_SLEEP]
        if seq & 1 and seq != self._woken:
            self._woken = seq
            return True
        return False

    def send_one(self, conn_id: int, frame: bytes | memoryview, n: int) -> int:
        """Reserve, write and publish a DATA record of one inline ``n``-byte frame.

        The fast path of :meth:`reserve`, :meth:`write` and :meth:`publish`. Returns 0
        when the ring is full (nothing written), 1 when published, 2 when published
        and the consumer must be woken.

        Raises:
            RingError: the consumer's ``tail`` is impossible.
        """
        rec_len = _ONE_SIZE + n
        size = (rec_len + 7) & ~7
        head = self.head
        pos = head & self._mask
        if size <= self.capacity - pos and head + size <= self._free_to:
            # reserve's common case inline: fits before the end, known free.
            self.head = head + size
            off = DATA_OFF + pos
        else:
            off = self.reserve(size)
            if off < 0:
                return 0
        _ONE.pack_into(self.mm, off, rec_len, _REC_MAGIC, _DATA, 1, conn_id, n)
        off += _ONE_SIZE
        self.view[off : off + n] = frame
        words = self.words
        if _WEAK_ORDER:
            _barrier()
        words[_HEAD] = self.head
        _acquire()
        _release()
        seq: int = words[_SLEEP]
        if seq & 1 and seq != self._woken:
            self._woken = seq
            return 2
        return 1

    def write(
        self,
        off: int,
        rec_len: int,
        kind: int,
        conn_id: int,
        lengths: tuple[int, ...],
        parts: list[memoryview | tuple[int, int]],
    ) -> None:
        """Write one record at ``off`` (from :meth:`reserve`).

        ``parts`` are the frames in order: a byte memoryview written inline, or a
        ``(seg_id, offset)`` reference whose length in ``lengths`` has
        :data:`OUT_OF_LINE` set.
        """
        mm = self.mm
        n = len(lengths)
        REC.pack_into(mm, off, rec_len, _REC_MAGIC, kind, n, conn_id)
        if n:
            p = off + REC.size
            _lens(n).pack_into(mm, p, *lengths)
            p += 8 * n
            view = self.view
            for part in parts:
                if type(part) is tuple:
                    SEGREF.pack_into(mm, p, *part)
                    p += SEGREF.size
                else:
                    q = p + part.nbytes  # type: ignore[union-attr]
                    view[p:q] = part  # type: ignore[assignment]
                    p = q

    def start_waiting(self) -> None:
        """Announce that the producer will sleep until the consumer frees space."""
        self._waiting += 2
        self.words[_WAIT] = self._waiting - 1
        _barrier()

    def stop_waiting(self) -> None:
        self.words[_WAIT] = self._waiting

    def release(self) -> None:
        """Drop the exported views so that the mapping can be closed."""
        self.words.release()
        self.view.release()


class PyRingReader:
    """The consumer side of a ring; validates everything it reads."""

    __slots__ = ("_mask", "_signalled", "_sleep", "capacity", "mm", "tail", "view", "words")

    def __init__(self, mm: mmap.mmap, capacity: int) -> None:
        self.mm = mm
        self.view = memoryview(mm)
        self.words = _words(mm)
        self.capacity = capacity
        self._mask = capacity - 1
        self.tail = 0
        self._sleep = 0
        self._signalled = 0

    def pending(self) -> bool:
        """Whether the producer published records not consumed yet (no barrier)."""
        return bool(self.words[_HEAD] != self.tail)

    def drain(
        self,
        deliver: Callable[[Kind, int, list[object]], bool],
        deliver_inline: Callable[[int, list[memoryview]], bool] | None = None,
        deliver_segment: Callable[[int, memoryview | None, int, int, int], bool] | None = None,
        *,
        max_frames: int = DEFAULT_MAX_FRAMES,
    ) -> int:
        """Parse every published record and pass it to ``deliver``.

        ``deliver(kind, conn_id, frames)`` gets inline frames as writable memoryviews
        (copies out of the ring) and out-of-line frames as ``(seg_id, offset,
        length)`` tuples for the caller to check and resolve; it returns False to stop
        (the link went down). ``deliver_inline(conn_id, frames)``, if given, gets
        instead the DATA records of one inline frame (most small messages), and
        ``deliver_segment(conn_id, head, seg_id, offset, length)``, if given, those of
        one out-of-line frame, alone (``head`` None) or after one inline frame
        (``head``, copied out). The consumed space is handed back to the producer.
        Returns the number of records delivered.

        Raises:
            RingError: a corrupted header or record; nothing after it is delivered.
        """
        mm = self.mm
        view = self.view
        cap = self.capacity
        tail = self.tail
        head = self.words[_HEAD]
        if head == tail:
            return 0
        if _WEAK_ORDER:
            _barrier()
        avail = head - tail
        if avail < 0 or avail > cap or avail & 7:
            raise RingError(f"producer head is {avail} bytes from tail")
        count = 0
        mask = self._mask
        if deliver_inline is None:
            deliver_inline = lambda conn_id, frames: deliver(Kind.DATA, conn_id, list(frames))  # noqa: E731
        try:
            while tail != head:
                pos = tail & mask
                off = DATA_OFF + pos
                if cap - pos >= _ONE_SIZE and head - tail >= _ONE_SIZE:
                    # Fast path: a DATA record of one inline frame, one unpack for all.
                    rec_len, magic, kind_no, nframes, conn_id, length = _ONE.unpack_from(mm, off)
                    if (
                        magic == _REC_MAGIC
                        and kind_no == _DATA
                        and nframes == 1
                        and rec_len == _ONE_SIZE + length
                    ):
                        size = (rec_len + 7) & ~7
                        if size > cap - pos or size > head - tail:
                            raise RingError(f"record length {rec_len} at {pos} out of bounds")
                        p = off + _ONE_SIZE
                        tail += size
                        count += 1
                        if not deliver_inline(
                            conn_id, [memoryview(bytearray(view[p : p + length]))]
                        ):
                            break
                        continue
                    if deliver_segment is not None and magic == _REC_MAGIC and kind_no == _DATA:
                        if (
                            nframes == 1
                            and length & OUT_OF_LINE
                            and rec_len == _ONE_SEG_SIZE
                            and rec_len <= cap - pos
                            and rec_len <= head - tail
                        ):
                            # Fast path: a DATA record of one frame held in a segment.
                            seg_id, seg_off = SEGREF.unpack_from(mm, off + _ONE_SIZE)
                            tail += _ONE_SEG_SIZE  # a multiple of 8
                            count += 1
                            if not deliver_segment(
                                conn_id, None, seg_id, seg_off, length & ~OUT_OF_LINE
                            ):
                                break
                            continue
                        if (
                            nframes == 2
                            and not length & OUT_OF_LINE
                            and rec_len == _ONE_SIZE + 8 + length + SEGREF.size
                        ):
                            # Fast path: an inline frame, then one held in a segment.
                            size = (rec_len + 7) & ~7
                            if size > cap - pos or size > head - tail:
                                raise RingError(f"record length {rec_len} at {pos} out of bounds")
                            p = off + _ONE_SIZE
                            second = _SECOND_LEN.unpack_from(mm, p)[0]
                            if second & OUT_OF_LINE:
                                p += 8
                                seg_id, seg_off = SEGREF.unpack_from(mm, p + length)
                                tail += size
                                count += 1
                                if not deliver_segment(
                                    conn_id,
                                    memoryview(bytearray(view[p : p + length])),
                                    seg_id,
                                    seg_off,
                                    second & ~OUT_OF_LINE,
                                ):
                                    break
                                continue
                rec_len, magic = _MARK.unpack_from(mm, off)
                if magic == _WRAP_MAGIC:
                    if rec_len != cap - pos or rec_len > head - tail:
                        raise RingError(f"wrap marker of {rec_len} bytes at {pos}")
                    tail += rec_len
                    continue
                if magic != _REC_MAGIC:
                    raise RingError(f"bad record magic {magic:#x} at {pos}")
                size = (rec_len + 7) & ~7
                if rec_len < REC.size or size > cap - pos or size > head - tail:
                    raise RingError(f"record length {rec_len} at {pos} out of bounds")
                _, _, kind_no, nframes, conn_id = REC.unpack_from(mm, off)
                kind = _KINDS.get(kind_no)
                if kind is None:
                    raise RingError(f"unknown message kind {kind_no}")
                end = off + rec_len
                p = off + REC.size
                frames: list[object] = []
                if nframes:
                    if kind is not Kind.DATA:
                        raise RingError(f"control message {kind.name} carries frames")
                    if nframes > max_frames or p + 8 * nframes > end:
                        raise RingError(f"record claims {nframes} frames")
                    lengths = _lens(nframes).unpack_from(mm, p)
                    p += 8 * nframes
                    for length in lengths:
                        if length & OUT_OF_LINE:
                            if p + SEGREF.size > end:
                                raise RingError("segment reference beyond the record")
                            seg_id, seg_off = SEGREF.unpack_from(mm, p)
                            frames.append((seg_id, seg_off, length & ~OUT_OF_LINE))
                            p += SEGREF.size
                        else:
                            if length > end - p:
                                raise RingError(f"frame of {length} bytes beyond the record")
                            frames.append(memoryview(bytearray(view[p : p + length])))
                            p += length
                if p != end:
                    raise RingError(f"record of {rec_len} bytes has {end - p} stray bytes")
                tail += size
                count += 1
                if not deliver(kind, conn_id, frames):
                    break
        finally:
            self.tail = tail
            self.words[_TAIL] = tail
        return count

    def producer_waiting(self) -> bool:
        """True (once per wait) when the producer sleeps until space is freed."""
        _acquire()
        _release()
        seq: int = self.words[_WAIT]
        if seq & 1 and seq != self._signalled:
            self._signalled = seq
            return True
        return False

    def sleep(self) -> bool:
        """Announce that the consumer goes to sleep; False if data arrived meanwhile.

        After False the consumer is awake again and must drain.
        """
        self._sleep += 2
        self.words[_SLEEP] = self._sleep - 1
        _barrier()
        if self.pending():
            self.wake()
            return False
        return True

    def wake(self) -> None:
        """Announce that the consumer is awake (producers stop sending wake-ups)."""
        if self.words[_SLEEP] != self._sleep:
            self.words[_SLEEP] = self._sleep

    @property
    def asleep(self) -> bool:
        return bool(self.words[_SLEEP] != self._sleep)

    def release(self) -> None:
        """Drop the exported views so that the mapping can be closed."""
        self.words.release()
        self.view.release()


#: Environment variable: ``0`` uses the Python ring even where the C one was built.
ACCEL_ENV: Final = "HPCPROC_RING_ACCEL"


def _compiled() -> Any:
    """The compiled ring module, ready for use, or None where it was not built."""
    try:
        from . import _ring_accel
    except ImportError:  # built without a compiler: the Python ring does the work
        return None
    _ring_accel.init(RingError, _KINDS, Kind.DATA)
    return _ring_accel


_accel = _compiled()
#: Whether :data:`RingWriter` and :data:`RingReader` are the compiled classes.
ACCELERATED: Final = _accel is not None and os.environ.get(ACCEL_ENV, "1").strip() != "0"
#: The producer side in use: the C class where built (see the module), else Python's.
RingWriter: type[PyRingWriter] = _accel.RingWriter if ACCELERATED else PyRingWriter
#: The consumer side in use, chosen as :data:`RingWriter`.
RingReader: type[PyRingReader] = _accel.RingReader if ACCELERATED else PyRingReader
