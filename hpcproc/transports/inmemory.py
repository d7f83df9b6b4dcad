"""In-memory transport: endpoints inside one process, linked by direct calls.

It is the fake that the process layer's unit tests run on, and it passes the same
conformance suite as the network transports. Frames are copied on send (the caller may
reuse its buffers when ``send`` returns), so receivers never share memory with senders.

All in-memory transports of a process share one address space, as network transports
share a network: an endpoint of one transport can connect to an endpoint of another
(two nodes in one test each own a transport), and closing one transport looks to the
other like a peer going away. Endpoints must live on the same event loop to talk.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

from ._multiplex import Kind, Link, MultiplexedEndPoint, MultiplexedTransport
from .base import (
    Buffer,
    ConnectError,
    ConnectErrorCode,
    EndPoint,
    EndPointAddress,
    NewEndPointError,
    NewEndPointErrorCode,
)

__all__ = ["InMemoryTransport"]

_PREFIX = b"inmemory:"

#: Every open in-memory endpoint of this process, by address. Weak, so that an endpoint
#: its owner dropped without closing cannot be reached (nor kept alive) through it.
_ENDPOINTS: weakref.WeakValueDictionary[EndPointAddress, _InMemoryEndPoint] = (
    weakref.WeakValueDictionary()
)


class _InMemoryLink(Link):
    def __init__(self, owner: _InMemoryEndPoint, remote: EndPointAddress) -> None:
        super().__init__(remote, owner)
        self.owner: _InMemoryEndPoint = owner
        self.peer: _InMemoryLink | None = None

    def _peer_endpoint(self) -> tuple[_InMemoryLink, _InMemoryEndPoint] | None:
        peer = self.peer
        if peer is None or not self.alive:
            return None
        return peer, peer.owner

    def send_control(self, kind: Kind, conn_id: int) -> None:
        target = self._peer_endpoint()
        if target is None:
            return
        peer, endpoint = target
        if kind is Kind.OPEN:
            endpoint._on_open(peer, conn_id)
        else:
            endpoint._on_close(peer, conn_id)

    async def send_data(self, conn_id: int, frames: Sequence[Buffer]) -> None:
        target = self._peer_endpoint()
        if target is None:
            raise ConnectionError("in-memory link is down")
        peer, endpoint = target
        endpoint._on_data(peer, conn_id, [memoryview(bytearray(f)) for f in frames])

    async def close(self) -> None:
        self._down("peer endpoint closed")

    def abort(self) -> None:
        self._down("connection broken")

    def _down(self, reason: str) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.owner._on_link_down(peer, reason)


class _InMemoryEndPoint(MultiplexedEndPoint):
    def __init__(self, transport: InMemoryTransport, address: EndPointAddress) -> None:
        super().__init__(address)
        self._transport = transport

    async def _open_link(self, remote: EndPointAddress, timeout: float | None) -> Link:
        if not remote.startswith(_PREFIX):
            raise ConnectError(ConnectErrorCode.FAILED, f"not an in-memory address: {remote!r}")
        peer_ep = _ENDPOINTS.get(remote)
        if peer_ep is None or peer_ep._closed:
            raise ConnectError(ConnectErrorCode.NOT_FOUND, f"no endpoint at {remote!r}")
        mine = _InMemoryLink(self, remote)
        theirs = _InMemoryLink(peer_ep, self.address)
        mine.peer, theirs.peer = theirs, mine
        peer_ep._register_link(theirs)
        return mine

    async def _release(self) -> None:
        if _ENDPOINTS.get(self.address) is self:
            del _ENDPOINTS[self.address]


class InMemoryTransport(MultiplexedTransport):
    """Endpoints in this process; addresses are ``b"inmemory:<name>:<n>"``."""

    _instances = itertools.count(1)

    def __init__(self) -> None:
        super().__init__()
        self._name = next(self._instances)
        self._next_endpoint = itertools.count(1)

    async def new_endpoint(self) -> EndPoint:
        if self._closed:
            raise NewEndPointError(NewEndPointErrorCode.FAILED, "transport is closed")
        address = EndPointAddress(b"%s%d:%d" % (_PREFIX, self._name, next(self._next_endpoint)))
        endpoint = _InMemoryEndPoint(self, address)
        self._add_endpoint(endpoint)
        _ENDPOINTS[address] = endpoint
        return endpoint


def create_transport() -> InMemoryTransport:
    """Registry factory for ``inmemory`` (takes no options)."""
    return InMemoryTransport()
