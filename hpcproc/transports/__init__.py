"""Transports by name: ``create("tcp", **options)``.

Built-in transports are imported on first use only, so that ``mpi4py`` and ``ucxx``
are needed only by those who pick ``mpi`` or ``ucx``. Third-party transports register
through the ``hpcproc.transports`` entry-point group (the entry point names a factory
callable taking the options as keyword arguments) or at run time with
:func:`register`. ``python -m hpcproc.run --transport NAME`` accepts every name of
:func:`available`.

The contract is :mod:`hpcproc.transports.base`; fault injection for tests is the
separate, optional :mod:`hpcproc.transports.faults`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .base import (
    ConnectError,
    ConnectErrorCode,
    Connection,
    ConnectionClosed,
    ConnectionOpened,
    EndPoint,
    EndPointAddress,
    EndPointClosed,
    EndPointClosedError,
    ErrorEvent,
    Event,
    EventError,
    EventErrorCode,
    NewEndPointError,
    NewEndPointErrorCode,
    Received,
    Reliability,
    SendError,
    SendErrorCode,
    Transport,
    TransportError,
)

__all__ = [
    "ConnectError",
    "ConnectErrorCode",
    "Connection",
    "ConnectionClosed",
    "ConnectionOpened",
    "EndPoint",
    "EndPointAddress",
    "EndPointClosed",
    "EndPointClosedError",
    "ErrorEvent",
    "Event",
    "EventError",
    "EventErrorCode",
    "NewEndPointError",
    "NewEndPointErrorCode",
    "Received",
    "Reliability",
    "SendError",
    "SendErrorCode",
    "Transport",
    "TransportError",
    "UnknownTransportError",
    "available",
    "create",
    "register",
]

TransportFactory = Callable[..., Transport]

#: name -> "module:factory", imported lazily.
_BUILTIN: dict[str, str] = {
    "inmemory": "hpcproc.transports.inmemory:create_transport",
    "tcp": "hpcproc.transports.tcp:create_transport",
    "shm": "hpcproc.transports.shm:create_transport",
    "mpi": "hpcproc.transports.mpi:create_transport",
    "ucx": "hpcproc.transports.ucx:create_transport",
    "shm+tcp": "hpcproc.transports.routing:create_shm_tcp",
    "shm+ucx": "hpcproc.transports.routing:create_shm_ucx",
    "shm+mpi": "hpcproc.transports.routing:create_shm_mpi",
}

_registered: dict[str, TransportFactory] = {}

ENTRY_POINT_GROUP = "hpcproc.transports"


class UnknownTransportError(TransportError, LookupError):
    """No transport is registered under the requested name."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


def register(name: str, factory: TransportFactory) -> None:
    """Register ``factory`` under ``name`` (replacing any earlier registration)."""
    _registered[name] = factory


def available() -> list[str]:
    """Names that :func:`create` accepts (built-in, registered, and entry points)."""
    names = set(_BUILTIN) | set(_registered)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _resolve(name: str) -> TransportFactory:
    if name in _registered:
        return _registered[name]
    if name in _BUILTIN:
        module_name, _, attr = _BUILTIN[name].partition(":")
        factory: TransportFactory = getattr(importlib.import_module(module_name), attr)
        return factory
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            loaded: TransportFactory = ep.load()
            return loaded
    raise UnknownTransportError(f"unknown transport {name!r}; available: {', '.join(available())}")


def create(name: str, **options: Any) -> Transport:
    """Create a transport by name, passing ``options`` to its factory.

    Raises:
        UnknownTransportError: no transport has that name.
        ImportError: the transport's optional dependency is missing (the message names
            the extra to install, e.g. ``pip install hpcproc[mpi]``).
    """
    return _resolve(name)(**options)
