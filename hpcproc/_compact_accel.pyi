# The compact message format in C (_compact_accel.c); see _compact.py and serialization.py.
from collections.abc import Callable
from typing import Any

def configure(
    pid: type,
    node_id: type,
    interned: dict[bytes, Any],
    chan_message: type,
    error: type[Exception],
    fallback: Callable[[Any], list[Any]],
    pickle_loads: Callable[[Any], Any],
    arrays_hook: Callable[[], tuple[type, tuple[Any, ...]]],
    max_bytes: int,
    max_frame: int,
    magic: int,
    max_depth: int,
    max_containers: int,
    max_ndim: int,
    max_large: int,
) -> None: ...
def serialize(obj: Any) -> list[Any]: ...
def loads(frame: Any) -> Any: ...
def loads_frames(frames: list[Any] | tuple[Any, ...]) -> Any: ...
def encode(obj: Any) -> bytes | None: ...
def decode(frame: Any) -> Any: ...
