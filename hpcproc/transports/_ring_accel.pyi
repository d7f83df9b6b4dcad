# The compiled ring (_ring_accel.c): the interface of _shm_ring.PyRingWriter and
# PyRingReader, which the module assigns these classes in place of.
from typing import Any

def init(error: type[Exception], kinds: dict[int, Any], data: Any) -> None: ...

RingWriter: Any
RingReader: Any
