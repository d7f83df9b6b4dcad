"""The compact format: small messages of plain data and numpy arrays, without pickle.

Most messages between processes are small and made of a few plain values: a reply
address (a pid), a tag, a number, a short bytes payload, a numpy array. Pickling one
costs the C pickler about 0.45-0.7 us and unpickling it 0.2-0.45 us, mostly fixed work
per message (a pickler, its memo, framing, a class reference for the pid); a direct
encoding costs a fifth of that. An array costs pickle far more: a tuple of a str and
an array took 4.6 us to pickle and 2.8-3.3 us to unpickle (numpy's reduce, its dtype's
reduce and state, a Python function to rebuild it), against 0.09 and 0.13 us for the
same tuple with an int in this format. So where the optional compiled helper was built
(``hpcproc/_compact_accel.c``), :func:`hpcproc.serialization.serialize` writes messages
made only of the types below in this format, and everything else as before (pickle).

Every node reads both, whether it was built with the helper or not (:func:`decode`
here is the pure-Python reader); the first byte tells them apart (:data:`MAGIC` is
not a pickle opcode, and no pickle hpcproc writes starts with it).

Format (little-endian throughout): :data:`MAGIC`, then one value. A value is a tag
byte and what the tag says:

=====  ==========================================  ===========================
tag    value                                       followed by
=====  ==========================================  ===========================
``N``  ``None``
``T``  ``True``
``F``  ``False``
``b``  an ``int`` in 0..255                        1 byte
``i``  any other ``int`` that fits 64 bits         8 bytes, signed
``f``  a ``float``                                 8 bytes, IEEE 754 double
``s``  a ``str``                                   u32 length, UTF-8 bytes
``y``  a ``bytes``                                 u32 length, the bytes
``Y``  a ``bytes``, its bytes in a frame of their
       own
``t``  a ``tuple``                                 u32 count, the items
``l``  a ``list``                                  u32 count, the items
``d``  a ``dict``                                  u32 count, key and value pairs
``p``  a :class:`~hpcproc._ids.Pid`                u32 length, node address, 8 bytes lid
``c``  a ``ChanMessage`` (typed channels)          8 bytes port id, the payload
``a``  a ``numpy.ndarray``, its bytes here         u8 dtype code, u8 ndim, ndim u64
                                                   dimensions, the bytes
``A``  a ``numpy.ndarray``, its bytes in a frame   u8 dtype code, u8 ndim, ndim u64
       of their own                                dimensions
=====  ==========================================  ===========================

Frames of their own: a ``bytes`` or an array of ``max_bytes`` bytes or more
(:data:`~hpcproc.serialization.OUT_OF_BAND_MIN`), or one that would make this frame
longer than :data:`MAX_FRAME`, is not written in this frame but is the message's next
frame (``Y``, ``A``), sent from the object's own memory as pickle's
out-of-band buffers are, the frames in the order their values are written, at most
:data:`MAX_LARGE` of them. The reader copies a ``Y`` frame into a new ``bytes`` (as
pickle does) and rebuilds an ``A`` array over its frame (no copy; as writable as the
frame). Arrays: the dtype code indexes :data:`ARRAY_DTYPES`; the bytes are the array's
in C order, the dtype's item size times the product of the dimensions; an ``a`` array
is rebuilt as a new one. A rebuilt array's dtype is the table's, equal (``==``) to
the sender's.

What is written in it, and what is not (pickle then, the message as a whole):

* Only those exact types: a subclass (``bool`` aside), a named tuple, an enum, a set
  is not. Of arrays, only a ``numpy.ndarray`` itself (not a subclass), C-contiguous,
  of at most :data:`MAX_NDIM` dimensions, whose dtype is one of :data:`ARRAY_DTYPES`
  and carries no metadata (not big-endian, not structured, not objects, strings or
  dates). Where the writer makes one frame (:func:`encode` without ``frames``, and a
  local send's copy), such a ``bytes`` or array is refused.
* ``int`` beyond 64 bits, more than :data:`MAX_LARGE` values of frames of their own,
  ``str`` that cannot be encoded in UTF-8 (lone surrogates), nesting deeper than
  :data:`MAX_DEPTH`, more than :data:`MAX_CONTAINERS` mutable values (lists, dicts,
  channel envelopes, arrays), a mutable value that appears twice in the message
  (pickle keeps such sharing; this format would not), and a message whose frame would
  be longer than :data:`MAX_FRAME`. An immutable value that appears twice is written
  twice and arrives as two equal objects, which no program can tell apart but by
  ``is`` (and by the memory they take, which :data:`MAX_FRAME` and :data:`MAX_LARGE`
  bound).
* Decoding checks every length and tag against the frame (an array's bytes, or its
  frame's length, against its dimensions and dtype; and that the message came with
  exactly the frames its values refer to), limits nesting to :data:`MAX_DEPTH`, and
  refuses anything malformed (:func:`decode` here raises :class:`CompactError`; the
  serializer's readers raise :class:`~hpcproc.serialization.SerializationError`); it
  runs no code of the message (pickle does: a reason it is only read from
  authenticated peers, as pickles are).
* Nodes of versions before arrays and large bytes were written in this format refuse
  a message with one (an unknown tag: dropped and logged by its receiver). In a cluster that mixes
  versions, ``HPCPROC_COMPACT=0`` (:data:`~hpcproc.serialization.COMPACT_ENV`) keeps the
  newer nodes writing pickles.
"""

from __future__ import annotations

import pickle
import struct
import sys
from collections.abc import Sequence
from typing import Any

from ._channels import ChanMessage
from ._ids import NodeId, Pid, _interned

__all__ = [
    "ARRAY_DTYPES",
    "MAGIC",
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "MAX_FRAME",
    "MAX_LARGE",
    "MAX_NDIM",
    "CompactError",
    "array_types",
    "decode",
    "encode",
]

#: First byte of a message in this format (not a pickle opcode).
MAGIC = 0xC5
#: Deepest nesting written or read (the top-level value is depth 1).
MAX_DEPTH = 32
#: Most mutable values (lists, dicts, channel envelopes, arrays) in one message written
#: in this format (each is checked for appearing twice).
MAX_CONTAINERS = 64
#: The dtypes of arrays written in this format, by code (the index): bools, and
#: integers, floats and complex numbers of a fixed size, little-endian. Not
#: ``longdouble``, whose layout differs between platforms.
ARRAY_DTYPES = (
    "|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8",
    "<f2", "<f4", "<f8", "<c8", "<c16",
)  # fmt: skip
#: Most dimensions of an array written in this format (numpy 1's limit).
MAX_NDIM = 32
#: Most values (large bytes and arrays) sent as frames of their own in one message
#: written in this format.
MAX_LARGE = 64
#: Longest frame written in this format, in bytes. A value that appears several times
#: is written every time (pickle writes it once): this bounds what a small object
#: shared many times can cost (``[big_str] * 1000``, or ``a = (a, a)`` repeated).
MAX_FRAME = 1 << 16

_U8 = struct.Struct("<B")
_U64 = struct.Struct("<Q")
_ARRAY_HEAD = struct.Struct("<BB")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class CompactError(ValueError):
    """A frame in the compact format is malformed (the serializer reports it as a
    ``SerializationError``)."""


class _NotCompact(Exception):
    """The object has a part the format does not take (the message goes by pickle)."""


def array_types() -> tuple[type, tuple[Any, ...]]:
    """``(numpy.ndarray, the dtypes of ARRAY_DTYPES in code order)``; imports numpy.

    For the compiled writer and reader, which call it the first time they meet an
    array (hpcproc does not import numpy before a message needs it)."""
    import numpy as np

    return np.ndarray, tuple(np.dtype(name) for name in ARRAY_DTYPES)


_dtype_codes: dict[Any, int] = {}
_dtype_list: list[Any] = []


def _dtypes() -> list[Any]:
    """The dtypes of :data:`ARRAY_DTYPES` by code, made once (and ``_dtype_codes``)."""
    if not _dtype_list:
        _dtype_list.extend(array_types()[1])
        _dtype_codes.update((dtype, code) for code, dtype in enumerate(_dtype_list))
    return _dtype_list


def _array_code(array: Any) -> int | None:
    """The dtype code of an ``ndarray``, or None where the format does not take it."""
    _dtypes()
    dtype = array.dtype
    code = _dtype_codes.get(dtype)  # (equality: "=i8", "<i8" and "q" alike)
    if code is None or dtype.metadata is not None:
        return None
    return code


def encode(
    obj: Any, max_bytes: int, max_frame: int = MAX_FRAME, frames: list[Any] | None = None
) -> bytes | None:
    """``obj`` in the compact format, or None where the format does not take it (see
    the module; frames longer than ``max_frame`` included). With ``frames``, ``bytes``
    and arrays of ``max_bytes`` or more are taken, and appended to it (the ``bytes``
    themselves, a flat byte view of each array, in order) as the frames that follow
    this one; without, they are refused. ``frames`` is left as it was when the result
    is None.

    The reference for the compiled encoder, which must write the same bytes (the
    tests compare them); not used to send, since pickle is faster than this in Python.
    """
    out = bytearray([MAGIC])
    seen: list[Any] = []
    added: list[Any] | None = [] if frames is not None else None
    try:
        _encode(obj, out, 1, seen, max_bytes, max_frame, added)
    except _NotCompact:
        return None
    # (The compiled writer gives up as soon as the frame grows past max_frame: the
    # same decision, since a frame only grows.)
    if len(out) > max_frame:
        return None
    if frames is not None and added:
        frames.extend(added)
    return bytes(out)


def _encode_array(
    obj: Any,
    out: bytearray,
    seen: list[Any],
    max_bytes: int,
    max_frame: int,
    frames: list[Any] | None,
) -> None:
    _first_time(obj, seen)
    code = _array_code(obj)
    if code is None or obj.ndim > MAX_NDIM or not obj.flags.c_contiguous:
        raise _NotCompact
    # In this frame if small and it fits (the same test as the C writer's).
    size = obj.nbytes
    inline = size < max_bytes and len(out) + 3 + 8 * obj.ndim + size <= max_frame
    out += b"a" if inline else b"A"
    out += _ARRAY_HEAD.pack(code, obj.ndim)
    for n in obj.shape:
        out += _U64.pack(n)
    if not inline:
        _add_large(memoryview(obj).cast("B"), frames)
    elif size:  # (a view of nothing cannot be cast)
        out += memoryview(obj).cast("B")


def _add_large(frame: Any, frames: list[Any] | None) -> None:
    """``frame`` (of a large bytes or array, its tag written) as the message's next
    frame; refused where the writer makes one frame only, or past :data:`MAX_LARGE`."""
    if frames is None or len(frames) >= MAX_LARGE:
        raise _NotCompact
    frames.append(frame)


def _encode(
    obj: Any,
    out: bytearray,
    depth: int,
    seen: list[Any],
    max_bytes: int,
    max_frame: int,
    frames: list[Any] | None,
) -> None:
    if depth > MAX_DEPTH or len(out) > max_frame:  # (the length: to give up early)
        raise _NotCompact
    kind = type(obj)
    if obj is None:
        out += b"N"
    elif obj is True:
        out += b"T"
    elif obj is False:
        out += b"F"
    elif kind is int:
        if 0 <= obj <= 255:
            out += b"b" + _U8.pack(obj)
        elif _INT64_MIN <= obj <= _INT64_MAX:
            out += b"i" + _I64.pack(obj)
        else:
            raise _NotCompact
    elif kind is float:
        out += b"f" + _F64.pack(obj)
    elif kind is str:
        try:
            data = obj.encode("utf-8")
        except UnicodeEncodeError:
            raise _NotCompact from None
        if len(data) > max_frame:
            raise _NotCompact
        out += b"s" + _U32.pack(len(data)) + data
    elif kind is bytes:
        if len(obj) < max_bytes and len(out) + 5 + len(obj) <= max_frame:
            out += b"y" + _U32.pack(len(obj)) + obj
        else:
            out += b"Y"
            _add_large(obj, frames)
    elif kind is tuple:
        out += b"t" + _U32.pack(len(obj))
        for item in obj:
            _encode(item, out, depth + 1, seen, max_bytes, max_frame, frames)
    elif kind is list or kind is dict:
        _first_time(obj, seen)
        if kind is list:
            out += b"l" + _U32.pack(len(obj))
            for item in obj:
                _encode(item, out, depth + 1, seen, max_bytes, max_frame, frames)
        else:
            out += b"d" + _U32.pack(len(obj))
            for key, value in obj.items():
                _encode(key, out, depth + 1, seen, max_bytes, max_frame, frames)
                _encode(value, out, depth + 1, seen, max_bytes, max_frame, frames)
    elif kind is Pid:
        if len(obj) != 2:
            raise _NotCompact
        node, lid = obj
        if type(node) is not NodeId or type(lid) is not int or not _INT64_MIN <= lid <= _INT64_MAX:
            raise _NotCompact
        key = node._key
        out += b"p" + _U32.pack(len(key)) + key + _I64.pack(lid)
    elif kind is ChanMessage:
        _first_time(obj, seen)  # an envelope is mutable too
        try:
            port, payload = obj.port_id, obj.payload
        except AttributeError:  # an envelope without its fields: pickle reports it
            raise _NotCompact from None
        if type(port) is not int or not _INT64_MIN <= port <= _INT64_MAX:
            raise _NotCompact
        out += b"c" + _I64.pack(port)
        _encode(payload, out, depth + 1, seen, max_bytes, max_frame, frames)
    elif kind.__name__ == "ndarray" and kind is getattr(sys.modules.get("numpy"), "ndarray", 0):
        _encode_array(obj, out, seen, max_bytes, max_frame, frames)
    else:
        raise _NotCompact


def _first_time(container: Any, seen: list[Any]) -> None:
    """Record a mutable container; refuse one seen before in the message (pickle keeps
    the sharing), or one too many."""
    if len(seen) >= MAX_CONTAINERS or any(s is container for s in seen):
        raise _NotCompact
    seen.append(container)


def decode(frame: Any, buffers: Sequence[Any] = ()) -> Any:
    """The value of a frame in the compact format (bytes-like, starting with
    :data:`MAGIC`), ``buffers`` being the frames that came after it (those of its
    large bytes, copied, and arrays, rebuilt without a copy).

    Raises:
        CompactError: the frame is malformed: truncated, trailing bytes, an unknown
            tag, invalid UTF-8, nesting deeper than :data:`MAX_DEPTH`, an unhashable
            dict key, an array whose bytes or frame do not match its dtype and
            dimensions, more or fewer ``buffers`` than its values refer to.
    """
    data = memoryview(frame).cast("B")
    if not len(data) or data[0] != MAGIC:
        raise CompactError("not a compact message (no magic byte)")
    rest = list(buffers)
    rest.reverse()  # taken from the end: pop() is the next frame
    try:
        obj, pos = _decode(data, 1, 1, rest)
    except (struct.error, IndexError):
        raise CompactError("compact message is truncated") from None
    if pos != len(data):
        raise CompactError(f"compact message has {len(data) - pos} bytes after its value")
    if rest:
        raise CompactError(
            f"compact message came with {len(rest)} more frames than its values refer to"
        )
    return obj


def _take(data: memoryview, pos: int, n: int) -> tuple[memoryview, int]:
    end = pos + n
    if end > len(data):
        raise CompactError("compact message is truncated")
    return data[pos:end], end


def _next_frame(rest: list[Any]) -> Any:
    if not rest:
        raise CompactError("compact message refers to a frame it did not come with")
    return rest.pop()


def _decode_array(data: memoryview, pos: int, inline: bool, rest: list[Any]) -> tuple[Any, int]:
    """An array (tag ``a`` if ``inline``, else ``A``) whose dtype code is at ``pos``."""
    import numpy as np

    code, ndim = _ARRAY_HEAD.unpack_from(data, pos)
    pos += _ARRAY_HEAD.size
    if code >= len(ARRAY_DTYPES):
        raise CompactError(f"compact message has an unknown array dtype code {code}")
    if ndim > MAX_NDIM:
        raise CompactError(f"compact message has an array of {ndim} dimensions")
    dtype = _dtypes()[code]
    shape = []
    nbytes = dtype.itemsize
    for _ in range(ndim):
        (n,) = _U64.unpack_from(data, pos)
        pos += 8
        nbytes *= n
        # (The C reader refuses a product past 63 bits on the way: the same frames.)
        if n >= 1 << 63 or nbytes >= 1 << 63:
            raise CompactError("compact message has an array too large to address")
        shape.append(n)
    if inline:
        raw, pos = _take(data, pos, nbytes)
        out: Any = np.empty(shape, dtype)
        if nbytes:
            memoryview(out).cast("B")[:] = raw
        return out, pos
    buf = memoryview(_next_frame(rest)).cast("B")
    if buf.nbytes != nbytes:
        raise CompactError(
            f"compact message has an array frame of {buf.nbytes} bytes where its dtype "
            f"and dimensions make {nbytes}"
        )
    # Over a PickleBuffer, which the array keeps as its base (see the C reader's r_array:
    # given the memoryview, numpy would keep the base array of its exporter instead).
    holder: Any = pickle.PickleBuffer(buf)  # (numpy's stubs do not list it as a buffer)
    return np.ndarray(shape, dtype, holder), pos


def _decode(data: memoryview, pos: int, depth: int, rest: list[Any]) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise CompactError(f"compact message nests deeper than {MAX_DEPTH}")
    tag = data[pos]
    pos += 1
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x62:  # b
        return data[pos], pos + 1
    if tag == 0x69:  # i
        return _I64.unpack_from(data, pos)[0], pos + 8
    if tag == 0x66:  # f
        return _F64.unpack_from(data, pos)[0], pos + 8
    if tag == 0x73 or tag == 0x79:  # s, y
        (n,) = _U32.unpack_from(data, pos)
        raw, pos = _take(data, pos + 4, n)
        if tag == 0x79:
            return bytes(raw), pos
        try:
            return str(raw, "utf-8"), pos
        except UnicodeDecodeError as exc:
            raise CompactError(f"compact message has a str that is not UTF-8: {exc}") from None
    if tag == 0x74 or tag == 0x6C:  # t, l
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:  # every item takes a byte at least
            raise CompactError("compact message is truncated")
        items = []
        for _ in range(n):
            item, pos = _decode(data, pos, depth + 1, rest)
            items.append(item)
        return (tuple(items) if tag == 0x74 else items), pos
    if tag == 0x64:  # d
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise CompactError("compact message is truncated")
        out: dict[Any, Any] = {}
        for _ in range(n):
            key, pos = _decode(data, pos, depth + 1, rest)
            value, pos = _decode(data, pos, depth + 1, rest)
            try:
                out[key] = value
            except TypeError as exc:
                raise CompactError(f"compact message has an unhashable dict key: {exc}") from None
        return out, pos
    if tag == 0x70:  # p
        (n,) = _U32.unpack_from(data, pos)
        raw, pos = _take(data, pos + 4, n)
        (lid,) = _I64.unpack_from(data, pos)
        address = bytes(raw)
        node = _interned.get(address)
        if node is None:
            node = NodeId(address)
        return Pid(node, lid), pos + 8
    if tag == 0x63:  # c
        (port,) = _I64.unpack_from(data, pos)
        payload, pos = _decode(data, pos + 8, depth + 1, rest)
        return ChanMessage(port, payload), pos
    if tag == 0x61 or tag == 0x41:  # a, A
        return _decode_array(data, pos, tag == 0x61, rest)
    if tag == 0x59:  # Y
        return bytes(_next_frame(rest)), pos
    raise CompactError(f"compact message has an unknown tag {tag:#04x} at byte {pos - 1}")
