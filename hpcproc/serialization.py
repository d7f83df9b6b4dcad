"""Messages to frames and back, without copying large buffers.

A message becomes ``[header, buf1, buf2, ...]``: ``header`` is a protocol-5 pickle (or,
for messages of plain data and numpy arrays, a frame of the compact format; see
below), and every buffer at least :data:`OUT_OF_BAND_MIN` bytes long travels
out-of-band as its own frame: the serializer never copies it, and the transport sends
it from the original memory. That covers numpy arrays (and anything else exposing
:class:`~pickle.PickleBuffer`), ``bytes``, ``bytearray`` and contiguous
``memoryview`` objects, at any depth in the message. On receive, arrays and
memoryviews are rebuilt over the received frames without a copy (see
``tests/test_serialization.py``); ``bytes`` and ``bytearray`` cannot wrap foreign
memory, so they are copied out of their frame once. Non-contiguous arrays and
memoryviews are copied into the header (pickle has no other way to send them).

Where the optional compiled helpers were built, a message of plain data (None, bool,
64-bit int, float, str, small bytes, tuples, lists, dicts, pids, channel envelopes,
numpy arrays of numbers) is written in hpcproc's compact format instead
(:mod:`hpcproc._compact`; a header of that format, followed by the frames of its large
bytes and arrays, out-of-band as above). Anything else goes through the standard (C)
pickler (small messages through reusable "seeded" ones where the compiled helper was
built; see below); only objects it cannot handle (lambdas, closures, functions defined
in ``__main__``) fall back to cloudpickle. The receiver reads a compact header itself
and loads a pickle with the standard (C) unpickler; every node reads both, built with
the helpers or not.

Security: unpickling runs code. Only call :func:`deserialize` on frames from an
authenticated peer (the network transports authenticate with the cluster cookie).
"""

from __future__ import annotations

import io
import os
import pickle
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import cloudpickle

from . import _compact
from ._channels import ChanMessage
from ._ids import NodeId, Pid, _interned, _pid
from ._pickle_codes import CODES, compiled_helper
from ._pickle_codes import register as _register_codes
from .transports.base import Buffer

__all__ = [
    "ACCELERATED",
    "COMPACT",
    "COMPACT_ENV",
    "OUT_OF_BAND_MIN",
    "SerializationError",
    "deserialize",
    "dumps",
    "load_frames",
    "load_header",
    "serialize",
]

_register_codes()  # before any message is pickled or unpickled here

#: Buffers smaller than this are pickled in-band: a separate frame costs more than the
#: copies (into the header and out of it). Measured with the compact format (a process
#: round trip of ``(pid, uint8 array)``, in-band against a frame of its own): 8 KiB
#: 13 against 20 us over shm, 24 against 39 over tcp, 25 against 47 over mpi; 24 KiB
#: 18 / 21 (shm), 33 / 55 (mpi); 32000 bytes 21.5 / 20.8 (shm), 39 / 54 (mpi).
OUT_OF_BAND_MIN = 32 * 1024


class SerializationError(Exception):
    """An object could not be serialized, or frames could not be deserialized."""


_BYTES, _BYTEARRAY, _MEMORYVIEW = 0, 1, 2
_BY_REFERENCE = frozenset({types.FunctionType, type})


class _OutOfBand:
    """Pickler mixin: large ``bytes``/``bytearray``/``memoryview`` become frames.

    The C pickler serializes these types itself (``reducer_override`` never sees
    ``bytes`` or ``bytearray``), so they are caught by ``persistent_id``. Out-of-band
    buffers and persistent ids share one frame list in pickling order, which is the
    order in which the unpickler meets ``NEXT_BUFFER`` and ``PERSID`` opcodes.
    """

    frames: list[Buffer]

    def _keep_large(self, pb: pickle.PickleBuffer) -> bool:
        return _keep_large(self.frames, pb)

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is bytes or kind is bytearray:
            if len(obj) < OUT_OF_BAND_MIN:
                return None
            self.frames.append(obj)
            return _BYTES if kind is bytes else _BYTEARRAY
        if kind is memoryview:
            if obj.nbytes >= OUT_OF_BAND_MIN and obj.c_contiguous:
                self.frames.append(obj)
                return (_MEMORYVIEW, obj.format, obj.shape, None)
            # Small or strided: its bytes go in-band (a copy is the only option).
            return (_MEMORYVIEW, obj.format, obj.shape, obj.tobytes())
        return None


def _keep_large(frames: list[Buffer], pb: pickle.PickleBuffer) -> bool:
    """Append a large buffer to ``frames`` (out-of-band: False); small ones stay in-band."""
    view = pb.raw()
    if view.nbytes < OUT_OF_BAND_MIN:
        return True
    frames.append(view)
    return False


class _Pickler(_OutOfBand, pickle.Pickler):
    def __init__(self, file: io.BytesIO, frames: list[Buffer]) -> None:
        super().__init__(file, protocol=5, buffer_callback=self._keep_large)
        self.frames = frames
        self.file = file
        self.busy = False

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _BY_REFERENCE and getattr(obj, "__module__", None) == "__main__":
            # The standard pickler saves functions and classes by reference, which
            # for ``__main__`` names a module the receiving node does not have;
            # refusing here sends the whole message through cloudpickle, which ships
            # them by value. (Checked here rather than in ``reducer_override``: one
            # Python call per pickled object instead of two.)
            raise pickle.PicklingError(f"{obj!r} is defined in __main__")
        return _OutOfBand.persistent_id(self, obj)


class _CloudPickler(_OutOfBand, cloudpickle.Pickler):  # type: ignore[misc]
    def __init__(self, file: io.BytesIO, frames: list[Buffer]) -> None:
        super().__init__(file, protocol=5, buffer_callback=self._keep_large)
        self.frames = frames


#: One reusable pickler per thread: creating a pickler costs several times more than
#: pickling a small message with it.
_local = threading.local()


def _pickler() -> _Pickler:
    pickler: _Pickler | None = getattr(_local, "pickler", None)
    if pickler is None or pickler.busy:  # busy: serialize() re-entered from a reducer
        pickler = _Pickler(io.BytesIO(), [])
        if getattr(_local, "pickler", None) is None:
            _local.pickler = pickler
    return pickler


# ------------------------------------------------------------------ the seeded pickler
#
# Pickling a class or function reference (``save_global``) costs the C pickler an
# import of its module per reference, even with a short extension code: about 0.5 us,
# half the time to pickle a small message that carries a pid (a reply address). A
# reference already in the pickler's memo costs a two-byte ``BINGET`` instead. So where
# the compiled helper was built (``hpcproc/_pickle_accel.c``), small messages are
# pickled by reusable picklers whose memo starts out holding the envelopes most
# messages carry (:data:`_SEEDS`, at memo indices 0, 1, ...), and the helper puts in
# front of each pickle a preamble that loads the same objects into the same memo
# indices of the unpickler (``EXT4 code; MEMOIZE; POP`` each, a slot the message does
# not use filled by ``NONE; MEMOIZE; POP``; a pickle without any memo get needs none).
# The result is a standard pickle: any unpickler with hpcproc's extension codes
# registered (every node) loads it with plain ``pickle.loads``, and the objects
# memoized by the message itself keep the indices the pickler gave them. In pure
# Python the bookkeeping around a reusable pickler costs as much as the seeds save, so
# without the helper small messages go through ``pickle.dumps``; either side of a
# connection may use either way.

#: The memo's first entries, in index order: the pid's constructor and the channel
#: envelope (see ``Pid.__reduce_ex__`` and ``ChanMessage.__reduce_ex__``).
_SEEDS = (_pid, ChanMessage)

_MEMOIZE, _POP, _NONE, _EXT4 = b"\x94", b"0", b"N", b"\x84"


def _preamble_piece(seed: Any) -> bytes:
    code = CODES[seed.__module__, seed.__qualname__]
    return _EXT4 + code.to_bytes(4, "little") + _MEMOIZE + _POP


#: The preamble for the seeds a pickle uses: bit i of the index set when it uses seed i.
_PREAMBLES = tuple(
    b"".join(
        _preamble_piece(seed) if mask >> i & 1 else _NONE + _MEMOIZE + _POP
        for i, seed in enumerate(_SEEDS)
    )
    for mask in range(1 << len(_SEEDS))
)


class _Sink:
    """A pickler's file whose ``write`` is a list's ``append`` (a C call, nothing to reset)."""

    __slots__ = ("write",)

    def __init__(self, chunks: list[bytes]) -> None:
        self.write = chunks.append


def _seed_memo() -> Any:
    seeded = pickle.Pickler(io.BytesIO(), protocol=5)
    seeded.memo = {id(seed): (i, seed) for i, seed in enumerate(_SEEDS)}
    return seeded.memo  # a proxy: assigning it to a pickler's memo copies the table in C


_SEED_MEMO = _seed_memo()


def _new_seed_pickler() -> tuple[Any, list[bytes], list[Buffer], pickle.Pickler]:
    """A reusable seeded pickler for the compiled helper: (dump, chunks, frames, pickler).

    Each pickle is written to ``chunks`` (one ``list.append`` per pickle, no file to
    reset), and its large buffers to ``frames``.
    """
    chunks: list[bytes] = []
    frames: list[Buffer] = []
    keep = partial(_keep_large, frames)
    pickler = pickle.Pickler(_Sink(chunks), protocol=5, buffer_callback=keep)
    pickler.memo = _SEED_MEMO
    return pickler.dump, chunks, frames, pickler


class _Unpickler(pickle.Unpickler):
    def __init__(self, header: Buffer, frames: Iterator[Buffer]) -> None:
        super().__init__(io.BytesIO(header), buffers=frames)
        self._frames = frames

    def persistent_load(self, pid: Any) -> Any:
        if pid == _BYTES:
            return bytes(next(self._frames))
        if pid == _BYTEARRAY:
            return bytearray(next(self._frames))
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == _MEMORYVIEW:
            _, fmt, shape, inline = pid
            view = memoryview(next(self._frames) if inline is None else inline).cast("B")
            try:
                return view.cast(fmt, shape)
            except (TypeError, ValueError):
                return view  # a format ``cast`` cannot express: the raw bytes
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def _serialize_py(obj: Any) -> list[Buffer]:
    """:data:`serialize` in Python (where the compiled helper was not built)."""
    # Fast path, entirely in C but for out-of-band array buffers: a header this short
    # cannot hold a large bytes object in-band, and one without "__main__" names no
    # function or class of __main__, so it is exactly what the full pickler below
    # would produce. Anything else is pickled again by the full one.
    fast: list[Buffer] = []
    try:
        header = pickle.dumps(obj, protocol=5, buffer_callback=partial(_keep_large, fast))
    except Exception:
        pass  # the full path retries, falls back to cloudpickle, or reports the error
    else:
        if len(header) < OUT_OF_BAND_MIN and b"__main__" not in header:
            return [header, *fast]
    return _serialize_full(obj)


def _serialize_full(obj: Any) -> list[Buffer]:
    """The general path of :data:`serialize`: large bytes out-of-band, functions and
    classes of ``__main__`` by value (cloudpickle), and the error."""
    frames: list[Buffer] = []
    pickler = _pickler()
    out = pickler.file
    pickler.busy = True
    pickler.frames = frames
    try:
        pickler.dump(obj)
        header = out.getvalue()
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        frames.clear()
        out = io.BytesIO()
        try:
            _CloudPickler(out, frames).dump(obj)
        except Exception as exc2:
            raise SerializationError(f"cannot serialize {type(obj).__name__}: {exc2}") from exc
        header = out.getvalue()
    finally:
        # Forget the message: the pickler must not keep it (or its buffers) alive.
        pickler.clear_memo()
        pickler.frames = []
        pickler.file.seek(0)
        pickler.file.truncate()
        pickler.busy = False
    return [header, *frames]


def _compiled_serialize() -> Callable[[Any], list[Buffer]] | None:
    """The compiled serialize (seeded picklers for small messages, then
    :func:`_serialize_full`), ready for use; None where it was not built or is turned
    off."""
    helper = compiled_helper()
    if helper is None:  # not built, or turned off: pickle.dumps does the work
        return None
    helper.configure(_new_seed_pickler, _SEED_MEMO, _PREAMBLES, OUT_OF_BAND_MIN, _serialize_full)
    serialize: Callable[[Any], list[Buffer]] = helper.serialize
    return serialize


_compiled = _compiled_serialize()
#: Whether small messages that are pickled go through the seeded picklers (see "the
#: seeded pickler" above). Small messages of plain data may not be pickled at all
#: (:data:`COMPACT`).
ACCELERATED = _compiled is not None


# ------------------------------------------------------------------ the compact format
#
# Messages of plain data (None, bool, 64-bit int, float, str, small bytes, tuple, list,
# dict, pids, channel envelopes, numpy arrays of numbers) need no pickle at all: where
# the compiled helper was built (``hpcproc/_compact_accel.c``) they are written in
# hpcproc's compact format (:mod:`hpcproc._compact`), at a fifth of pickle's cost (a
# tenth and less with an array), and everything else is pickled as above. Every node
# of this version reads both formats, compiled or not (:data:`load_header`,
# :data:`load_frames`). Nodes of earlier versions read only pickles, or compact frames
# without arrays and large bytes: in a cluster that mixes them, :data:`COMPACT_ENV`
# ``=0`` on the newer nodes keeps them writing pickles (a corrupt or unreadable message
# is dropped and logged by its receiver).

#: Environment variable: ``0`` keeps :data:`serialize` writing pickles where the
#: compact format would be used (reading it stays on).
COMPACT_ENV = "HPCPROC_COMPACT"

_COMPACT_START = bytes([_compact.MAGIC])


def _is_compact(frame: Buffer) -> bool:
    """Whether ``frame`` holds a message in the compact format (its first byte)."""
    try:
        return memoryview(frame).cast("B")[:1] == _COMPACT_START
    except (TypeError, ValueError):  # not a flat buffer: not a frame of ours
        return False


def _load_header_py(frame: Buffer) -> Any:
    """:data:`load_header` in Python (where the compiled helper was not built)."""
    if _is_compact(frame):
        try:
            return _compact.decode(frame)
        except _compact.CompactError as exc:
            raise SerializationError(f"cannot deserialize message: {exc}") from None
    return pickle.loads(frame)


def _load_frames_py(frames: Sequence[Buffer]) -> Any:
    """:data:`load_frames` in Python (where the compiled helper was not built)."""
    try:
        return _compact.decode(frames[0], frames[1:])
    except _compact.CompactError as exc:
        raise SerializationError(f"cannot deserialize message: {exc}") from None


def _compact_helper() -> Any:
    """The compiled compact format, configured (its ``serialize`` falls back to the
    pickling one above); None where it was not built or is turned off."""
    helper = compiled_helper("_compact_accel")
    if helper is None:
        return None
    helper.configure(
        Pid,
        NodeId,
        _interned,
        ChanMessage,
        SerializationError,
        _compiled or _serialize_py,
        pickle.loads,
        _compact.array_types,
        OUT_OF_BAND_MIN,
        _compact.MAX_FRAME,
        _compact.MAGIC,
        _compact.MAX_DEPTH,
        _compact.MAX_CONTAINERS,
        _compact.MAX_NDIM,
        _compact.MAX_LARGE,
    )
    return helper


_compact_compiled = _compact_helper()
#: Whether :data:`serialize` writes small messages of plain data in the compact format
#: (the compiled helper was built, and neither :data:`COMPACT_ENV` nor
#: ``HPCPROC_PICKLE_ACCEL`` turns it off).
COMPACT = _compact_compiled is not None and os.environ.get(COMPACT_ENV, "1").strip() != "0"

#: ``serialize(obj)``: ``[header, *buffers]`` for ``obj``; the buffers are views of
#: ``obj``'s large buffers, not copies. Raises :class:`SerializationError` when neither
#: pickle nor cloudpickle can serialize ``obj``. (The compiled function where it was
#: built, so that sending a small message costs no Python frame here; else Python's.)
serialize: Callable[[Any], list[Buffer]] = (
    _compact_compiled.serialize if COMPACT else _compiled or _serialize_py
)

#: ``load_header(frame)``: the message of a one-frame ``[header]`` (a compact frame or
#: a pickle). Raises what ``pickle.loads`` raises for a corrupt pickle, and
#: :class:`SerializationError` for a corrupt compact frame: :func:`deserialize`'s fast
#: path, for receivers that handle those errors themselves.
load_header: Callable[[Buffer], Any] = (
    _compact_compiled.loads if _compact_compiled is not None else _load_header_py
)

#: ``load_frames(frames)``: the message of a compact header followed by the frames of
#: its large bytes and arrays (a list or tuple). Raises :class:`SerializationError`
#: where malformed, or where the frames are not exactly those its values refer to.
load_frames: Callable[[Sequence[Buffer]], Any] = (
    _compact_compiled.loads_frames if _compact_compiled is not None else _load_frames_py
)


def dumps(obj: Any) -> bytes:
    """``obj`` as one pickle (no out-of-band frames), for small values such as a function
    to spawn and its arguments: the standard (C) pickler where it can, cloudpickle for
    what it cannot (lambdas, closures, anything of ``__main__``), so functions
    importable by module and name travel by reference and the others by value.

    Raises:
        Exception: whatever cloudpickle raises for an object it cannot pickle either.
    """
    # Modules registered with cloudpickle.register_pickle_by_value must go by value,
    # which only cloudpickle does (its registry has no public reader).
    if not getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None):
        try:
            data = pickle.dumps(obj, protocol=5)
        except Exception:
            pass  # cloudpickle below pickles it by value, or raises
        else:
            if b"__main__" not in data:
                return data
    by_value: bytes = cloudpickle.dumps(obj, protocol=5)
    return by_value


def deserialize(frames: Sequence[Buffer]) -> Any:
    """Rebuild the object from ``frames``; arrays share memory with the frames.

    Raises:
        SerializationError: the frames are not a valid message (empty, corrupt, missing
            or extra frames, or referring to code that is not importable here).
    """
    if len(frames) == 1:
        # Fast path: one frame (most small messages) needs no buffer bookkeeping.
        try:
            return load_header(frames[0])
        except pickle.UnpicklingError:
            pass  # persistent ids (small memoryviews), or corrupt: the full path
        except SerializationError:
            raise  # a corrupt compact frame
        except Exception as exc:
            raise SerializationError(f"cannot deserialize message: {exc!r}") from exc
    elif not frames:
        raise SerializationError("empty message: expected a header frame")
    elif _is_compact(frames[0]):
        try:
            return load_frames(frames if type(frames) in (list, tuple) else list(frames))
        except SerializationError:
            raise
        except Exception as exc:  # (a frame that is not a buffer, say)
            raise SerializationError(f"cannot deserialize message: {exc!r}") from exc
    rest = iter(frames[1:])
    try:
        try:
            # Fast path: messages without out-of-band bytes or memoryviews.
            obj = pickle.loads(frames[0], buffers=rest)
        except pickle.UnpicklingError:
            rest = iter(frames[1:])
            obj = _Unpickler(frames[0], rest).load()
    except Exception as exc:
        raise SerializationError(f"cannot deserialize message: {exc!r}") from exc
    if next(rest, None) is not None:
        raise SerializationError("message has more frames than its header refers to")
    return obj
