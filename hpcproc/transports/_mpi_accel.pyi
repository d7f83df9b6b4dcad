# The compiled small-message paths of the mpi transport (_mpi_accel.c), used by mpi.py.
from collections.abc import Callable, Sequence
from typing import Any

from .base import Buffer

def init(
    link_type: type,
    received_type: type,
    tag: int,
    max_untracked: int,
    fair_streak: int,
    probe_min: float,
    direct_max: int,
    pool_min: int,
    set_result: Callable[[Any, Any], None],
) -> None: ...
def check_layout(one_size: int, data_kind: int, inline_flag: int, zero_fill_max: int) -> None: ...
def deliver_inline(
    endpoint: Any, buf: Any, src: int, max_message: int, inbound: dict[int, Any]
) -> bool: ...

class Sender:
    def __init__(self, link: Any) -> None: ...
    def __call__(self, conn_id: int, frames: Sequence[Buffer]) -> bool: ...

class Spinner:
    def __init__(self, engine: Any, endpoint: Any) -> None: ...
    def __call__(self, endpoint: Any) -> bool: ...
    def poll(self, poller: Any, items: Any, endpoint: Any, ours: object) -> float: ...
    def spin(self, poller: Any, future: Any, endpoint: Any, ours: object) -> bool: ...
