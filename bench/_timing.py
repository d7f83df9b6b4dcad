"""Ping-pong plans and timing loops shared by the suites and their baselines.

A :class:`Step` is one message size with its iteration counts; :func:`plan` makes the
list for a run (both roles of a pair compute the same list from the same parameters,
so an echo side may follow it without headers). :func:`time_steps` and
:func:`atime_steps` time a round-trip function per step: ``warmup`` untimed
iterations, then ``runs`` timed runs of ``iters`` iterations each. The result maps
each size (as a string, for JSON) to the seconds per round trip of every run; the
suites report the median.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = [
    "SIZES",
    "SMOKE_SIZES",
    "Step",
    "Turn",
    "atime_steps",
    "echo_counts",
    "plan",
    "time_steps",
]

#: Message sizes of the transport suite: 8 B to 64 MiB.
SIZES = (8, 64, 512, 4096, 32768, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
#: Sizes of a smoke run (see :func:`plan`).
SMOKE_SIZES = (8, 32768, 1 << 20)


@dataclass(frozen=True, slots=True)
class Step:
    size: int
    iters: int
    runs: int
    warmup: int


def plan(quick: bool, sizes: tuple[int, ...] = SIZES, *, smoke: bool = False) -> list[Step]:
    """Iteration counts sized so that a run lasts about 30 ms (quick) or 150 ms.

    The estimate assumes ~150 us per round trip plus 1 GB/s each way, the slowest
    transport on the reference machine; faster transports just finish sooner. With
    ``smoke``: three sizes (a round-trip one, the first bandwidth one, 1 MiB), one
    run of a few iterations each.
    """
    if smoke:
        return [Step(size, 5, 1, 1) for size in SMOKE_SIZES]
    budget = 0.03 if quick else 0.15
    runs = 5 if quick else 11
    steps = []
    for size in sizes:
        estimate = 150e-6 + 2 * size / 1e9
        iters = max(2, min(2000, int(budget / estimate)))
        steps.append(Step(size, iters, runs, max(1, iters // 4)))
    return steps


Turn = Callable[[], contextlib.AbstractContextManager[None]]


def _no_turn() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def time_steps(
    steps: list[Step], prepare: Callable[[int], Callable[[], object]], turn: Turn = _no_turn
) -> dict[str, list[float]]:
    """Time ``prepare(size)()`` (one round trip) for every step; see the module doc.

    Each timed run (the first of a step with its warm-up) happens inside ``turn()``
    (pass ``peer.turn`` so that interleaved pairs take turns).
    """
    out: dict[str, list[float]] = {}
    for step in steps:
        one = prepare(step.size)
        per_run = []
        for run in range(step.runs):
            with turn():
                for _ in range(step.warmup if run == 0 else 0):
                    one()
                t0 = time.perf_counter()
                for _ in range(step.iters):
                    one()
                per_run.append((time.perf_counter() - t0) / step.iters)
        out[str(step.size)] = per_run
    return out


async def atime_steps(
    steps: list[Step],
    prepare: Callable[[int], Callable[[], Awaitable[object]]],
    turn: Turn = _no_turn,
) -> dict[str, list[float]]:
    """:func:`time_steps` for an ``async`` round trip.

    Waiting for a turn blocks the event loop, which has nothing to do meanwhile.
    """
    out: dict[str, list[float]] = {}
    for step in steps:
        one = prepare(step.size)
        per_run = []
        for run in range(step.runs):
            with turn():
                for _ in range(step.warmup if run == 0 else 0):
                    await one()
                t0 = time.perf_counter()
                for _ in range(step.iters):
                    await one()
                per_run.append((time.perf_counter() - t0) / step.iters)
        out[str(step.size)] = per_run
    return out


def echo_counts(steps: list[Step]) -> list[tuple[int, int]]:
    """``(size, round trips)`` per step, for an echo side that follows the plan."""
    return [(s.size, s.warmup + s.runs * s.iters) for s in steps]
