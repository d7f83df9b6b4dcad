"""``multiprocessing.Pipe`` ping-pong: ``send_bytes`` / ``recv_bytes_into``.

Runs in ``solo`` mode: role 0 forks its echo partner itself, since a pipe cannot be
shared by two independently started processes. The echo side follows the plan.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection

from .._pair import Peer
from .._timing import Step, echo_counts, time_steps


def _echo(conn: Connection, counts: list[tuple[int, int]]) -> None:
    biggest = max(size for size, _ in counts)
    buf = bytearray(biggest)
    for _, rounds in counts:
        for _ in range(rounds):
            n = conn.recv_bytes_into(buf)
            conn.send_bytes(buf, 0, n)
    conn.close()


def role(peer: Peer) -> dict[str, list[float]]:
    """Time the plan in ``peer.params`` against a forked echo process."""
    steps = [Step(**s) for s in peer.params["steps"]]
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_echo, args=(theirs, echo_counts(steps)), daemon=True)
    child.start()
    try:

        def prepare(size: int) -> Callable[[], None]:
            payload = bytearray(size)
            rbuf = bytearray(size)

            def one() -> None:
                mine.send_bytes(payload)
                mine.recv_bytes_into(rbuf)

            return one

        return time_steps(steps, prepare, peer.turn)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
