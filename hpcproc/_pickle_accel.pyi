# The compiled small-message path of serialize (_pickle_accel.c); see serialization.py.
from collections.abc import Callable
from typing import Any

def configure(
    factory: Callable[[], tuple[Any, list[bytes], list[Any], Any]],
    seed_memo: Any,
    preambles: tuple[bytes, ...],
    limit: int,
    general: Callable[[Any], list[Any]],
) -> None: ...
def serialize(obj: Any) -> list[Any]: ...
def pid_functions(pid: type, interned: dict[bytes, Any], node_id: type) -> tuple[Any, Any]: ...
def pid_reduce(pid: Any) -> tuple[Any, ...]: ...
