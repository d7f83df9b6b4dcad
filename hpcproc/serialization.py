"""Messages to frames and back, without copying large buffers.

A message becomes ``[header, buf1, buf2, ...]``: ``header`` is a protocol-5 pickle
and every buffer at least :data:`OUT_OF_BAND_MIN` bytes long that the object exposes
through ``PickleBuffer`` (numpy arrays, ``bytearray``, ``memoryview``, ``bytes`` via
:class:`~pickle.PickleBuffer` reducers) travels out-of-band as its own frame: the
serializer never copies it, and the transport sends it from the original memory. On
receive, ``pickle.loads(header, buffers=frames[1:])`` rebuilds arrays over the
received frames, again without a copy (see ``tests/test_serialization.py``).

Plain data goes through the standard (C) pickler; only objects it cannot handle
(lambdas, closures, functions defined in ``__main__``) fall back to cloudpickle,
whose output the receiver loads with plain ``pickle`` as well.

Security: unpickling runs code. Only call :func:`deserialize` on frames from an
authenticated peer (the network transports authenticate with the cluster cookie).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import cloudpickle

from .transports.base import Buffer

__all__ = ["OUT_OF_BAND_MIN", "SerializationError", "deserialize", "serialize"]

#: Buffers smaller than this are pickled in-band: a separate frame costs more than the copy.
OUT_OF_BAND_MIN = 1024


class SerializationError(Exception):
    """An object could not be serialized, or frames could not be deserialized."""


def serialize(obj: Any) -> list[Buffer]:
    """Return ``[header, *buffers]`` for ``obj``; buffers are views, not copies.

    Raises:
        SerializationError: neither pickle nor cloudpickle can serialize ``obj``.
    """
    buffers: list[Buffer] = []

    def keep_large(pb: pickle.PickleBuffer) -> bool:
        view = pb.raw()
        if view.nbytes < OUT_OF_BAND_MIN:
            return True  # in-band
        buffers.append(view)
        return False

    try:
        header = pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        buffers.clear()
        try:
            header = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large)
        except Exception as exc2:
            raise SerializationError(f"cannot serialize {type(obj).__name__}: {exc2}") from exc
    return [header, *buffers]


def deserialize(frames: Sequence[Buffer]) -> Any:
    """Rebuild the object from ``frames``; arrays share memory with the frames.

    Raises:
        SerializationError: the frames are not a valid message (empty, corrupt, or
            referring to code that is not importable here).
    """
    if not frames:
        raise SerializationError("empty message: expected a header frame")
    try:
        return pickle.loads(frames[0], buffers=frames[1:])
    except Exception as exc:
        raise SerializationError(f"cannot deserialize message: {exc!r}") from exc
