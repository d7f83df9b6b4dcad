# The compiled small-message path of serialize (_pickle_accel.c); see serialization.py.
from collections.abc import Callable
from typing import Any

def configure(
    factory: Callable[[], tuple[Any, list[bytes], list[Any], Any]],
    seed_memo: Any,
    preambles: tuple[bytes, ...],
    limit: int,
) -> None: ...
def dumps(obj: Any) -> list[Any] | None: ...
