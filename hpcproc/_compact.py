"""The compact format: small messages of plain data, without pickle.

Most messages between processes are small and made of a few plain values: a reply
address (a pid), a tag, a number, a short bytes payload. Pickling one costs the C
pickler about 0.45-0.7 us and unpickling it 0.2-0.45 us, mostly fixed work per
message (a pickler, its memo, framing, a class reference for the pid); a direct
encoding costs a fifth of that. So where the optional compiled helper was built
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
``t``  a ``tuple``                                 u32 count, the items
``l``  a ``list``                                  u32 count, the items
``d``  a ``dict``                                  u32 count, key and value pairs
``p``  a :class:`~hpcproc._ids.Pid`                u32 length, node address, 8 bytes lid
``c``  a ``ChanMessage`` (typed channels)          8 bytes port id, the payload
=====  ==========================================  ===========================

What is written in it, and what is not (pickle then, the message as a whole):

* Only those exact types: a subclass (``bool`` aside), a named tuple, an enum, a set,
  an array is not.
* ``int`` beyond 64 bits, ``bytes`` of :data:`~hpcproc.serialization.OUT_OF_BAND_MIN`
  or more (pickle sends those out-of-band, without a copy), ``str`` that cannot be
  encoded in UTF-8 (lone surrogates), nesting deeper than :data:`MAX_DEPTH`, more than
  :data:`MAX_CONTAINERS` mutable containers (lists, dicts, channel envelopes), a mutable
  container that appears twice in the message (pickle keeps such sharing; this format
  would not), and a message whose
  frame would be longer than :data:`MAX_FRAME`. An immutable value that appears twice
  is written twice and arrives as two equal objects, which no program can tell apart
  but by ``is`` (and by the memory they take, which :data:`MAX_FRAME` bounds).
* Decoding checks every length and tag against the frame, limits nesting to
  :data:`MAX_DEPTH`, and refuses anything malformed (:func:`decode` here raises
  :class:`CompactError`; the serializer's readers raise
  :class:`~hpcproc.serialization.SerializationError`); it runs no code of the message
  (pickle does: a reason it is only read from authenticated peers, as pickles are).
"""

from __future__ import annotations

import struct
from typing import Any

from ._channels import ChanMessage
from ._ids import NodeId, Pid, _interned

__all__ = [
    "MAGIC",
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "MAX_FRAME",
    "CompactError",
    "decode",
    "encode",
]

#: First byte of a message in this format (not a pickle opcode).
MAGIC = 0xC5
#: Deepest nesting written or read (the top-level value is depth 1).
MAX_DEPTH = 32
#: Most mutable containers (lists, dicts, channel envelopes) in one message written in
#: this format (each is checked for appearing twice).
MAX_CONTAINERS = 64
#: Longest frame written in this format, in bytes. A value that appears several times
#: is written every time (pickle writes it once): this bounds what a small object
#: shared many times can cost (``[big_str] * 1000``, or ``a = (a, a)`` repeated).
MAX_FRAME = 1 << 16

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class CompactError(ValueError):
    """A frame in the compact format is malformed (the serializer reports it as a
    ``SerializationError``)."""


class _NotCompact(Exception):
    """The object has a part the format does not take (the message goes by pickle)."""


def encode(obj: Any, max_bytes: int, max_frame: int = MAX_FRAME) -> bytes | None:
    """``obj`` in the compact format, or None where the format does not take it (see
    the module; ``bytes`` of ``max_bytes`` or more, and frames longer than
    ``max_frame``, included).

    The reference for the compiled encoder, which must write the same bytes (the
    tests compare them); not used to send, since pickle is faster than this in Python.
    """
    out = bytearray([MAGIC])
    seen: list[Any] = []
    try:
        _encode(obj, out, 1, seen, max_bytes, max_frame)
    except _NotCompact:
        return None
    # (The compiled writer gives up as soon as the frame grows past max_frame: the
    # same decision, since a frame only grows.)
    return bytes(out) if len(out) <= max_frame else None


def _encode(
    obj: Any, out: bytearray, depth: int, seen: list[Any], max_bytes: int, max_frame: int
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
        if len(obj) >= max_bytes:
            raise _NotCompact
        out += b"y" + _U32.pack(len(obj)) + obj
    elif kind is tuple:
        out += b"t" + _U32.pack(len(obj))
        for item in obj:
            _encode(item, out, depth + 1, seen, max_bytes, max_frame)
    elif kind is list or kind is dict:
        _first_time(obj, seen)
        if kind is list:
            out += b"l" + _U32.pack(len(obj))
            for item in obj:
                _encode(item, out, depth + 1, seen, max_bytes, max_frame)
        else:
            out += b"d" + _U32.pack(len(obj))
            for key, value in obj.items():
                _encode(key, out, depth + 1, seen, max_bytes, max_frame)
                _encode(value, out, depth + 1, seen, max_bytes, max_frame)
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
        _encode(payload, out, depth + 1, seen, max_bytes, max_frame)
    else:
        raise _NotCompact


def _first_time(container: Any, seen: list[Any]) -> None:
    """Record a mutable container; refuse one seen before in the message (pickle keeps
    the sharing), or one too many."""
    if len(seen) >= MAX_CONTAINERS or any(s is container for s in seen):
        raise _NotCompact
    seen.append(container)


def decode(frame: Any) -> Any:
    """The value of a frame in the compact format (bytes-like, starting with
    :data:`MAGIC`).

    Raises:
        CompactError: the frame is malformed: truncated, trailing bytes, an unknown
            tag, invalid UTF-8, nesting deeper than :data:`MAX_DEPTH`, an unhashable
            dict key.
    """
    data = memoryview(frame).cast("B")
    if not len(data) or data[0] != MAGIC:
        raise CompactError("not a compact message (no magic byte)")
    try:
        obj, pos = _decode(data, 1, 1)
    except (struct.error, IndexError):
        raise CompactError("compact message is truncated") from None
    if pos != len(data):
        raise CompactError(f"compact message has {len(data) - pos} bytes after its value")
    return obj


def _take(data: memoryview, pos: int, n: int) -> tuple[memoryview, int]:
    end = pos + n
    if end > len(data):
        raise CompactError("compact message is truncated")
    return data[pos:end], end


def _decode(data: memoryview, pos: int, depth: int) -> tuple[Any, int]:
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
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return (tuple(items) if tag == 0x74 else items), pos
    if tag == 0x64:  # d
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise CompactError("compact message is truncated")
        out: dict[Any, Any] = {}
        for _ in range(n):
            key, pos = _decode(data, pos, depth + 1)
            value, pos = _decode(data, pos, depth + 1)
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
        payload, pos = _decode(data, pos + 8, depth + 1)
        return ChanMessage(port, payload), pos
    raise CompactError(f"compact message has an unknown tag {tag:#04x} at byte {pos - 1}")
