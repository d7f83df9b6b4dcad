"""Suites by name: ``bench.<name>`` modules with a ``run(options)`` function."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._records import Record

__all__ = ["DEFAULT_TRANSPORT", "SUITES", "SuiteOptions", "load_suite"]

#: Registered suites: name -> module. A suite module defines ``run(options) -> list[Record]``.
SUITES: dict[str, str] = {
    "transport": "bench.transport",
    "process": "bench.process",
    "peers": "bench.peers",
    "cluster": "bench.cluster",
    "otp": "bench.otp",
}

#: Transport of a suite when ``--transport`` is not given (else ``tcp``).
DEFAULT_TRANSPORT: dict[str, str] = {"cluster": "auto"}


@dataclass(frozen=True, slots=True)
class SuiteOptions:
    """What ``python -m bench`` passes to a suite."""

    #: Transport name for :func:`hpcproc.transports.create`.
    transport: str = "tcp"
    #: Finish in under a minute: fewer iterations and runs.
    quick: bool = False
    #: Run every row with a few iterations, to check that the suite works (the test
    #: suite does); the figures mean nothing.
    smoke: bool = False
    #: ``cluster`` suite: run this many ranks locally instead of under ``srun``.
    np: int | None = None
    #: Also measure the transport over TLS, beside it in the same run (tcp only).
    tls: bool = False
    #: Options of the measured transport (``create(transport, **options)``); the
    #: transport suite takes them, the others refuse them.
    transport_options: tuple[tuple[str, Any], ...] = ()


def load_suite(name: str) -> Callable[[SuiteOptions], list[Record]]:
    """The ``run`` function of suite ``name``.

    Raises:
        KeyError: no such suite (registered, or importable as ``bench.<name>``).
    """
    module_name = SUITES.get(name, f"bench.{name}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise KeyError(f"no benchmark suite {name!r}; known: {', '.join(SUITES)}") from None
    run: Callable[[SuiteOptions], list[Record]] = module.run
    return run
