"""UDP multicast discovery (Cloud Haskell's SimpleLocalnet), authenticated by the cookie.

Every node sends a small announcement to a multicast group (default
:data:`DEFAULT_GROUP`, Cloud Haskell's 224.0.0.99:9999) a few times a second and
listens for the others'. An announcement is JSON naming the node's endpoint address,
its host, its role (``"node"``, or ``"master"`` once it leads a cluster), a timestamp
and a random nonce, followed by ``HMAC-SHA256(cookie, label || json)``. A receiver
drops (and logs once per sender) any datagram that is too long, malformed, signed
with another cookie, older than :data:`MAX_AGE` seconds or from the future by as
much, or whose nonce it has already seen: a stranger's node, or a replay of an old
announcement, is never counted.

Multicast datagrams go out with TTL 1 (the local network only); ``interface`` names
the local address whose interface sends and receives them (default: the kernel's
route for the group).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = [
    "DEFAULT_GROUP",
    "MAX_AGE",
    "Announcement",
    "Announcer",
    "parse_group",
    "sign",
    "verify",
]

log = logging.getLogger("hpcproc.discover")

DEFAULT_GROUP = ("224.0.0.99", 9999)
#: Oldest (and most future) timestamp accepted, seconds.
MAX_AGE = 30.0
#: Longest datagram read or accepted.
MAX_DATAGRAM = 2048
_LABEL = b"hpcproc-discover-v1\0"
_MAC_LEN = 32
#: Nonces remembered against replays (more than MAX_AGE's worth at the send rate).
_NONCES_KEPT = 4096


@dataclass(frozen=True)
class Announcement:
    """One verified announcement: ``address`` (endpoint address) on ``host``."""

    address: bytes
    host: str
    role: str
    timestamp: float
    nonce: str


def parse_group(text: str) -> tuple[str, int]:
    """``"224.0.0.99:9999"`` -> ``("224.0.0.99", 9999)``.

    Raises:
        ValueError: not ``ADDR:PORT`` with an IPv4 multicast address (224.0.0.0/4).
    """
    host, sep, port = text.rpartition(":")
    try:
        packed = socket.inet_aton(host)
        number = int(port)
    except (OSError, ValueError):
        packed, number = b"", -1
    if not sep or len(packed) != 4 or not 0 < number < 65536:
        raise ValueError(f"--group {text!r} is not ADDR:PORT (e.g. 224.0.0.99:9999)")
    if not 224 <= packed[0] <= 239:
        raise ValueError(
            f"--group {text!r}: {host} is not an IPv4 multicast address (224-239.x.x.x)"
        )
    return host, number


def sign(cookie: bytes, ann: Announcement) -> bytes:
    """The datagram for ``ann``: its JSON followed by the HMAC over label and JSON."""
    body = json.dumps(
        {
            "address": ann.address.decode("utf-8", "surrogateescape"),
            "host": ann.host,
            "role": ann.role,
            "ts": ann.timestamp,
            "nonce": ann.nonce,
        },
        separators=(",", ":"),
    ).encode("utf-8", "surrogateescape")
    return body + hmac.new(cookie, _LABEL + body, hashlib.sha256).digest()


def verify(cookie: bytes, datagram: bytes, now: float) -> Announcement:
    """The announcement in ``datagram`` if signed with ``cookie`` and fresh.

    Raises:
        ValueError: too long, malformed, wrong signature, or timestamp too far from
            ``now``; the message says which.
    """
    if len(datagram) > MAX_DATAGRAM or len(datagram) <= _MAC_LEN:
        raise ValueError(f"datagram of {len(datagram)} bytes")
    body, mac = datagram[:-_MAC_LEN], datagram[-_MAC_LEN:]
    if not hmac.compare_digest(mac, hmac.new(cookie, _LABEL + body, hashlib.sha256).digest()):
        raise ValueError("not signed with this cluster's cookie")
    try:
        obj = json.loads(body)
        ann = Announcement(
            str(obj["address"]).encode("utf-8", "surrogateescape"),
            str(obj["host"]),
            str(obj["role"]),
            float(obj["ts"]),
            str(obj["nonce"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed announcement: {exc}") from None
    if abs(now - ann.timestamp) > MAX_AGE:
        raise ValueError(f"stale announcement ({now - ann.timestamp:+.0f} s old)")
    return ann


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Announcer) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self._owner.received(data, str(addr[0]))


class Announcer:
    """Sends this node's announcements and collects the verified ones of others.

    :attr:`seen` maps each other node's address to its latest announcement;
    :attr:`changed` is set whenever one is added or changes role.
    """

    def __init__(
        self,
        cookie: bytes,
        address: bytes,
        host: str,
        *,
        group: tuple[str, int] = DEFAULT_GROUP,
        interface: str | None = None,
    ) -> None:
        self._cookie = cookie
        self._address = address
        self._host = host
        self._group = group
        self._interface = interface
        self.role = "node"
        self.seen: dict[bytes, Announcement] = {}
        self.changed = asyncio.Event()
        self._nonces: OrderedDict[str, None] = OrderedDict()
        self._refused: set[str] = set()
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        """Join the group and start listening.

        Raises:
            OSError: the group's port cannot be bound or the group joined (the
                message names both).
        """
        group, port = self._group
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(AttributeError, OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((group, port))
            iface = socket.inet_aton(self._interface or "0.0.0.0")
            sock.setsockopt(
                socket.IPPROTO_IP,
                socket.IP_ADD_MEMBERSHIP,
                struct.pack("4s4s", socket.inet_aton(group), iface),
            )
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            if self._interface:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            where = f" on interface {self._interface}" if self._interface else ""
            raise OSError(f"cannot listen to multicast group {group}:{port}{where}: {exc}") from exc
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        self._transport = transport

    def announce(self) -> None:
        """Send one announcement (fire and forget: UDP may lose it; it is repeated)."""
        if self._transport is None:
            return
        ann = Announcement(self._address, self._host, self.role, time.time(), secrets.token_hex(12))
        try:
            self._transport.sendto(sign(self._cookie, ann), self._group)
        except OSError as exc:
            log.warning("cannot send a discovery announcement to %s:%d: %s", *self._group, exc)

    def received(self, data: bytes, source: str) -> None:
        """Handle one datagram (the protocol's callback)."""
        try:
            ann = verify(self._cookie, data, time.time())
        except ValueError as exc:
            if source not in self._refused:
                self._refused.add(source)
                log.warning("ignoring discovery datagrams from %s: %s", source, exc)
            return
        if ann.nonce in self._nonces:
            return
        self._nonces[ann.nonce] = None
        if len(self._nonces) > _NONCES_KEPT:
            self._nonces.popitem(last=False)
        if ann.address == self._address:
            return
        old = self.seen.get(ann.address)
        self.seen[ann.address] = ann
        if old is None or old.role != ann.role:
            self.changed.set()

    def close(self) -> None:
        """Stop listening; idempotent."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
