"""Fault injection: the optional testing interface beside the transport contract.

The public :class:`~hpcproc.transports.base.Transport` has no "break this connection"
call: an application has no business breaking its own links. Tests do, to check that
the layers above treat a network fault as failure (links and monitors fire, messages
are dropped until ``reconnect``). A transport that can simulate such a fault also
implements :class:`FaultInjection`; every built-in transport does. Callers check with
``isinstance(transport, FaultInjection)``; the conformance suite
(:mod:`hpcproc.testing.conformance`) and the process-layer tests skip, with the
reason, the scenarios that need it when the transport under test does not implement
it (network-transport-tcp keeps its fault hooks apart in the same way, in
``TransportInternals``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .base import EndPointAddress, Transport

__all__ = ["FaultInjection", "NoFaultInjectionError", "require_fault_injection"]


class FaultInjection(ABC):
    """Implemented by a transport that can make a bundle fail on purpose (tests only)."""

    @abstractmethod
    async def break_connection(self, local: EndPointAddress, remote: EndPointAddress) -> None:
        """Make the bundle ``local``<->``remote`` fail, as a real network fault would.

        ``local`` must be an endpoint of this transport. Both sides see
        ``CONNECTION_LOST`` (the remote side eventually), no old connection between
        them carries anything afterwards (sends raise ``SendError(FAILED)``), and a
        new ``connect`` starts a new bundle. Breaking a bundle that does not exist
        does nothing.

        Raises:
            ValueError: ``local`` is not an endpoint of this transport.
        """


class NoFaultInjectionError(TypeError):
    """The transport does not implement :class:`FaultInjection`."""


def require_fault_injection(transport: Transport) -> FaultInjection:
    """``transport`` as a :class:`FaultInjection`.

    Raises:
        NoFaultInjectionError: it does not implement the interface (the message says
            so and names the transport's class).
    """
    if not isinstance(transport, FaultInjection):
        raise NoFaultInjectionError(
            f"{type(transport).__module__}.{type(transport).__qualname__} does not implement"
            " the fault-injection interface hpcproc.transports.faults.FaultInjection"
            " (break_connection)"
        )
    return transport
