"""The byte layout of link messages, for transports that carry them as bytes.

A link message is a fixed 16-byte prefix, then one 8-byte length per frame, then the
frame bytes in order::

    kind:u8  pad:3  nframes:u32  conn_id:u64  |  len_0:u64 ... len_{n-1}:u64  |  frames

(little endian). Every field read from the wire is checked before it is used:
unknown kinds, more than ``max_frames`` frames, and totals over ``max_message``
raise :class:`WireError`, so that no buffer is ever allocated from an unchecked
length. TCP, UCX and shared memory use this layout; MPI uses its own envelope since
MPI already preserves message boundaries.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache

from ._multiplex import Kind
from .base import Buffer

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_MESSAGE",
    "PREFIX",
    "WireError",
    "as_bytes_view",
    "encode_header",
    "parse_lengths",
    "parse_prefix",
]

PREFIX = struct.Struct("<B3xIQ")
_LEN = struct.Struct("<Q")
DEFAULT_MAX_FRAMES = 1 << 16
DEFAULT_MAX_MESSAGE = 1 << 32  # 4 GiB
_KINDS = {int(k): k for k in Kind}


@lru_cache(maxsize=256)
def _header_struct(nframes: int) -> struct.Struct:
    return struct.Struct(f"<B3xIQ{nframes}Q")


@lru_cache(maxsize=256)
def _lengths_struct(nframes: int) -> struct.Struct:
    return struct.Struct(f"<{nframes}Q")


class WireError(Exception):
    """Bytes from a peer that break the protocol; the link must be dropped."""


def as_bytes_view(frame: Buffer) -> memoryview:
    """``frame`` as a flat view of bytes, without a copy unless it is not contiguous."""
    view = memoryview(frame)  # type: ignore[arg-type]
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    if view.c_contiguous:
        return view.cast("B")
    return memoryview(view.tobytes())


def encode_header(kind: Kind, conn_id: int, lengths: Sequence[int]) -> bytes:
    """The prefix and length table of a message whose frames have ``lengths``."""
    # One cached Struct per frame count: this runs once per message sent.
    return _header_struct(len(lengths)).pack(kind, len(lengths), conn_id, *lengths)


def parse_prefix(
    data: bytes | bytearray | memoryview,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    offset: int = 0,
) -> tuple[Kind, int, int]:
    """``(kind, nframes, conn_id)`` from the 16-byte prefix at ``offset``, checked.

    Raises:
        WireError: unknown kind, too many frames, or a control message with frames.
    """
    raw, nframes, conn_id = PREFIX.unpack_from(data, offset)
    kind = _KINDS.get(raw)
    if kind is None:
        raise WireError(f"unknown message kind {raw}")
    if nframes > max_frames:
        raise WireError(f"message has {nframes} frames, more than the limit {max_frames}")
    if nframes and kind is not Kind.DATA:
        raise WireError(f"control message {kind.name} carries {nframes} frames")
    return kind, nframes, conn_id


def parse_lengths(
    data: bytes | bytearray | memoryview,
    nframes: int,
    *,
    max_message: int = DEFAULT_MAX_MESSAGE,
    offset: int = 0,
) -> list[int]:
    """The ``nframes`` frame lengths of the table at ``offset``, checked against ``max_message``.

    Raises:
        WireError: the total exceeds ``max_message``.
    """
    lengths = list(_lengths_struct(nframes).unpack_from(data, offset))
    total = sum(lengths)
    if total > max_message:
        raise WireError(f"message of {total} bytes exceeds the limit of {max_message} bytes")
    return lengths
