"""Link dialing shared by the network transports (TCP, UCX).

A network transport owns one listener; its endpoints are told apart by an id in the
address, ``b"SCHEME://HOST:PORT/INSTANCE/ID"`` (``INSTANCE`` is random per transport
object, so an address never routes to an endpoint of a later transport that reuses
the port). A new link starts as a raw byte pipe, a :class:`SetupChannel` (a TCP
socket, a UCX endpoint's stream API), over which both sides run this handshake
before any link message (all fixed-size or length-checked fields; ``I`` =
initiator, ``A`` = acceptor)::

    I -> A  HELLO: magic, nonce_I, flags, len(src), len(dst), src, dst
    A -> I  nonce_A
    I -> A  proof_I = HMAC(cookie, ..., nonce_A, nonce_I, context), extra_I
    A       verifies proof_I (else: log, reply AUTH_FAILED and drop), decides,
            registers the link
    A -> I  proof_A, status (ACCEPT | NOT_FOUND | CROSSED_PENDING | CROSSED_LIVE), extra_A
    I       verifies proof_A (else: ConnectError(FAILED)); link messages follow

A cookie mismatch fails fast and by name on both sides: the acceptor answers a wrong
proof_I with a zero proof and ``AUTH_FAILED`` (which tells the initiator only that the
cookies differ) and logs the initiator's address; the initiator raises
``ConnectError(FAILED)`` saying that authentication failed, with the acceptor's
address and the fix (:data:`hpcproc.auth.COOKIE_FIX`), instead of seeing a closed pipe.

The proofs are :class:`~hpcproc.auth.Handshake`'s, bound to both
addresses. ``extra_X`` are :attr:`HandshakeFormat.extra_len` bytes of link
parameters (none for TCP; for UCX the tag on which X receives); a refusal carries
zeroes there. The acceptor proves nothing to, and reveals nothing (not even whether
an endpoint exists) to, a peer that has not proved the cookie first; nothing is read
past the handshake before both proofs are checked, so nothing an unauthenticated
peer sends reaches the endpoint.

Crossed connects (A and B dial each other at once) are resolved where they meet, in
the acceptor's decision (:meth:`DialingEndPoint._accept`), by one rule both sides
evaluate on the same two addresses: while an endpoint is itself dialing the
initiator, it accepts the initiator's link only if the initiator's address is the
smaller one and answers ``CROSSED_PENDING`` otherwise; the loser then waits for the
winner's link, which its own endpoint accepts. ``CROSSED_LIVE`` answers a dial that
arrives after the winner's link was already registered; if the dialer holds no link
from that peer, the peer's link is stale (the dialer had dropped it) and the dialer
retries with ``REPLACE``, which replaces it. A losing pipe is closed before any link
message is read from it. The bookkeeping and the rule (:class:`CrossedConnects`) serve
the shm transport too, whose handshake is its own.

Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import secrets
import socket
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

from ..auth import COOKIE_FIX, NONCE_LEN, PROOF_LEN, Handshake, cookie_mismatch, load_cookie
from ._multiplex import Link, MultiplexedEndPoint, MultiplexedTransport
from .base import ConnectError, ConnectErrorCode, EndPointAddress

__all__ = [
    "CROSS_WAIT",
    "FLAG_REPLACE",
    "HELLO",
    "MAX_ADDRESS",
    "MAX_HANDSHAKES",
    "CrossedConnects",
    "DialingEndPoint",
    "DialingTransport",
    "HandshakeError",
    "HandshakeFormat",
    "Hello",
    "HostAddress",
    "SetupChannel",
    "Status",
    "accept_handshake",
    "dial_handshake",
    "format_host_address",
    "handshake_context",
    "parse_host_address",
    "resolve",
]

#: Most unauthenticated handshakes in progress per transport; more are refused.
MAX_HANDSHAKES = 256
#: Longest endpoint address accepted in a handshake.
MAX_ADDRESS = 1024
#: How long a dialer told ``CROSSED_PENDING`` waits for the peer's link before
#: dialing again (the overall connect timeout still applies).
CROSS_WAIT = 1.0
#: HELLO flag: replace the link the acceptor holds from this dialer (it is stale).
FLAG_REPLACE = 1
#: magic, nonce, flags, len(src), len(dst); the two addresses follow.
HELLO = struct.Struct(f"<8s{NONCE_LEN}sBHH")


class Status(enum.IntEnum):
    """The acceptor's decision, sent in its reply."""

    ACCEPT = 0
    NOT_FOUND = 1
    CROSSED_PENDING = 2
    CROSSED_LIVE = 3
    #: The initiator's proof was wrong: the two cookies differ.
    AUTH_FAILED = 4


class HandshakeError(Exception):
    """The peer broke the handshake; the message is the logged reason."""


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True, slots=True)
class HostAddress:
    """A parsed endpoint address ``SCHEME://HOST:PORT/INSTANCE/ID``."""

    host: str
    port: int
    instance: bytes
    endpoint_id: int


def parse_host_address(address: bytes, scheme: bytes) -> HostAddress:
    """Parse ``SCHEME://HOST:PORT/INSTANCE/ID`` (``HOST`` may be ``[v6-address]``).

    ``scheme`` includes ``://``, e.g. ``b"tcp://"``.

    Raises:
        ValueError: the address is malformed or has another scheme.
    """
    name = scheme[:-3].decode()
    if not address.startswith(scheme):
        raise ValueError(f"not a {name} address")
    hostport, _, tail = bytes(address[len(scheme) :]).partition(b"/")
    instance, _, ident = tail.partition(b"/")
    host, sep, port_text = hostport.rpartition(b":")
    if not sep or not host or not instance or not ident.isdigit() or not port_text.isdigit():
        raise ValueError(f"expected {name}://HOST:PORT/INSTANCE/ID")
    if host.startswith(b"[") and host.endswith(b"]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return HostAddress(host.decode("ascii"), port, instance, int(ident))


def format_host_address(
    scheme: bytes, host: str, port: int, instance: bytes, endpoint_id: int
) -> EndPointAddress:
    """The address :func:`parse_host_address` reads back (IPv6 hosts in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return EndPointAddress(b"%s%s:%d/%s/%d" % (scheme, shown.encode(), port, instance, endpoint_id))


def handshake_context(src: bytes, dst: bytes) -> bytes:
    """Binds both proofs to this pair of endpoints."""
    return struct.pack("<HH", len(src), len(dst)) + src + dst


async def resolve(target: HostAddress) -> tuple[int, int, Any]:
    """``(family, proto, sockaddr)`` of the first address ``target.host`` resolves to.

    Raises:
        ConnectError: ``NOT_FOUND`` when the host name does not resolve.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectError(
            ConnectErrorCode.NOT_FOUND, f"cannot resolve {target.host!r}: {exc}"
        ) from exc
    family, _, proto, _, sockaddr = infos[0]
    return family, proto, sockaddr


# --------------------------------------------------------------------------- handshake


@dataclass(frozen=True)
class HandshakeFormat:
    """What tells one transport's handshake apart from another's.

    Attributes:
        name: the transport's registry name, used in messages (``"tcp"``).
        scheme: address prefix, ``name`` followed by ``://``.
        magic: 8 bytes opening every HELLO.
        extra_len: bytes of link parameters each side appends to its proof or reply.
        log: where refused peers are reported.
    """

    name: str
    magic: bytes
    extra_len: int
    log: logging.Logger

    @property
    def scheme(self) -> bytes:
        return self.name.encode() + b"://"


E = TypeVar("E", bound="DialingEndPoint[Any]")
T = TypeVar("T", bound="DialingTransport[Any]")


class SetupChannel(ABC, Generic[E]):
    """A new link's raw byte pipe while the handshake runs, and what becomes of it.

    One object per attempt, on either side. It owns the pipe until
    :meth:`start` hands it to a link, and :meth:`drop` closes it at once (idempotent,
    and a no-op once a link owns the pipe).
    """

    #: How the peer is named in log messages (``"peer 10.0.0.2:4100"``, ``"a peer"``).
    peer: str = "a peer"
    #: Link parameters this side appends to its proof or reply (``extra_len`` bytes).
    extra: bytes = b""
    #: Errors of :meth:`send` / :meth:`recv` that mean the pipe failed (logged on the
    #: accepting side); anything else propagates.
    io_errors: ClassVar[tuple[type[Exception], ...]] = (OSError,)

    @abstractmethod
    async def send(self, data: bytes) -> None:
        """Send all of ``data``; may block. Raises one of :attr:`io_errors`."""

    @abstractmethod
    async def recv(self, n: int) -> bytes:
        """Receive exactly ``n`` bytes, never more (what follows belongs to the link).

        Raises:
            HandshakeError: the peer closed the pipe first.
        """

    @abstractmethod
    def drop(self) -> None:
        """Close the pipe at once, unless a link owns it."""

    @abstractmethod
    def link(self, endpoint: E, remote: EndPointAddress, peer_extra: bytes) -> Link:
        """The link this pipe becomes, to ``remote``; not started yet."""

    @abstractmethod
    async def start(self, link: Link, first: bytes = b"") -> None:
        """Hand the pipe to ``link`` and start it; ``first`` goes out ahead of it."""

    @abstractmethod
    async def refuse(self, reply: bytes) -> None:
        """Acceptor: send the refusing ``reply``, then close the pipe."""

    def dial_error(self, exc: Exception, *, answered: bool) -> ConnectError | None:
        """Dialer: the ``ConnectError`` for ``exc`` from :meth:`send` or :meth:`recv`.

        ``answered`` tells whether the peer had sent its nonce (so an hpcproc endpoint
        listens there). ``None`` lets ``exc`` propagate.
        """
        return None


@dataclass(frozen=True)
class Hello:
    """An authenticated initiator, as the acceptor saw it."""

    src: EndPointAddress
    dst: bytes
    flags: int
    #: The peer's link parameters (``extra_len`` bytes).
    extra: bytes
    #: The acceptor's proof, the first part of its reply.
    proof: bytes

    def reply(self, status: Status, extra: bytes) -> bytes:
        return self.proof + bytes([status]) + extra


async def dial_handshake(
    channel: SetupChannel[Any],
    form: HandshakeFormat,
    cookie: bytes,
    src: bytes,
    dst: bytes,
    flags: int,
) -> tuple[Status, bytes]:
    """Run the initiator's side; return the acceptor's status and link parameters.

    Raises:
        ConnectError: from :meth:`SetupChannel.dial_error`; ``FAILED`` when the
            acceptor's proof is wrong (also logged) or its status unknown.
    """
    shake = Handshake(cookie, initiator=True, context=handshake_context(src, dst))
    try:
        await channel.send(
            HELLO.pack(form.magic, shake.nonce, flags, len(src), len(dst)) + src + dst
        )
        their_nonce = await channel.recv(NONCE_LEN)
    except Exception as exc:
        _raise_dial_error(channel, exc, answered=False)
    try:
        await channel.send(shake.proof(their_nonce) + channel.extra)
        reply = await channel.recv(PROOF_LEN + 1 + form.extra_len)
    except Exception as exc:
        _raise_dial_error(channel, exc, answered=True)
    remote = EndPointAddress(dst)
    who = f"{form.name} endpoint {remote!r} ({channel.peer})"
    if reply[PROOF_LEN] == Status.AUTH_FAILED:
        message = cookie_mismatch(who)
        form.log.warning("%s: %s", form.name, message)
        raise ConnectError(ConnectErrorCode.FAILED, message)
    if not shake.verify(their_nonce, reply[:PROOF_LEN]):
        message = (
            f"authentication failed: {who} failed authentication (its proof does not"
            f" match our cookie); {COOKIE_FIX}"
        )
        form.log.warning("%s: %s", form.name, message)
        raise ConnectError(ConnectErrorCode.FAILED, message)
    try:
        status = Status(reply[PROOF_LEN])
    except ValueError:
        raise ConnectError(
            ConnectErrorCode.FAILED, f"{remote!r} sent unknown status {reply[PROOF_LEN]}"
        ) from None
    return status, reply[PROOF_LEN + 1 :]


def _raise_dial_error(channel: SetupChannel[Any], exc: Exception, *, answered: bool) -> NoReturn:
    error = channel.dial_error(exc, answered=answered)
    if error is None:
        raise exc
    # Timeouts and our own handshake errors carry nothing worth chaining.
    quiet = isinstance(exc, (HandshakeError, asyncio.TimeoutError))
    raise error from (None if quiet else exc)


async def accept_handshake(
    channel: SetupChannel[Any], form: HandshakeFormat, cookie: bytes
) -> Hello:
    """Run the acceptor's side up to its decision: authenticate the initiator.

    Raises:
        HandshakeError: bad magic, address lengths out of range, wrong proof, or the
            peer closed the pipe.
    """
    magic, their_nonce, flags, src_len, dst_len = HELLO.unpack(await channel.recv(HELLO.size))
    if magic[:2] == b"\x16\x03":  # a TLS record: a ClientHello
        raise HandshakeError(
            "the peer speaks TLS and this endpoint does not (start every rank with --tls,"
            " or none)"
        )
    if magic != form.magic:
        if magic[:-1] == form.magic[:-1]:  # the last byte is the handshake's version
            raise HandshakeError(
                f"the peer speaks version {magic[-1]} of the hpcproc {form.name} handshake and"
                f" this endpoint version {form.magic[-1]}: run one hpcproc version on every rank"
            )
        raise HandshakeError(f"bad handshake magic {magic!r} (not an hpcproc {form.name} peer)")
    if not 0 < src_len <= MAX_ADDRESS or not 0 < dst_len <= MAX_ADDRESS:
        raise HandshakeError(f"address lengths {src_len}/{dst_len} out of range")
    addresses = await channel.recv(src_len + dst_len)
    src, dst = addresses[:src_len], addresses[src_len:]
    shake = Handshake(cookie, initiator=False, context=handshake_context(src, dst))
    await channel.send(shake.nonce)
    answer = await channel.recv(PROOF_LEN + form.extra_len)
    if not shake.verify(their_nonce, answer[:PROOF_LEN]):
        # Say so (nothing else) before dropping the pipe, so that the initiator fails
        # at once and by name rather than with a lost connection.
        with contextlib.suppress(*channel.io_errors):
            await channel.refuse(
                bytes(PROOF_LEN) + bytes([Status.AUTH_FAILED]) + bytes(form.extra_len)
            )
        raise HandshakeError(cookie_mismatch(f"endpoint {EndPointAddress(src)!r} ({channel.peer})"))
    return Hello(EndPointAddress(src), dst, flags, answer[PROOF_LEN:], shake.proof(their_nonce))


# --------------------------------------------------------------------------- crossing


class CrossedConnects:
    """One endpoint's record of crossed connects, and the rule that resolves them.

    ``dialing`` counts this endpoint's dials in progress per peer; ``arrivals`` holds
    the dials that lost a crossing and wait for the winner's link. The rule: an
    endpoint that is itself dialing the initiator answers ``CROSSED_PENDING`` (keeps
    its own dial) when its address is the smaller one (:meth:`keeps_own_dial`).
    """

    __slots__ = ("arrivals", "dialing")

    def __init__(self) -> None:
        self.dialing: dict[EndPointAddress, int] = {}
        self.arrivals: dict[EndPointAddress, list[asyncio.Future[None]]] = {}

    @contextlib.contextmanager
    def dialing_to(self, remote: EndPointAddress) -> Iterator[None]:
        """Count a dial to ``remote`` while the ``with`` block runs."""
        self.dialing[remote] = self.dialing.get(remote, 0) + 1
        try:
            yield
        finally:
            left = self.dialing[remote] - 1
            if left:
                self.dialing[remote] = left
            else:
                del self.dialing[remote]

    def keeps_own_dial(self, initiator: EndPointAddress, acceptor: EndPointAddress) -> bool:
        """Whether ``acceptor``, dialing ``initiator`` too, refuses the initiator's
        link: the link dialed from the smaller address wins."""
        return bool(self.dialing.get(initiator)) and initiator >= acceptor

    async def wait_for_arrival(self, remote: EndPointAddress, timeout: float) -> None:
        """Wait until :meth:`arrived` for ``remote``, at most ``timeout`` seconds.

        Returns either way (the caller looks for the link); raises what
        :meth:`fail_waiters` set.
        """
        fut = asyncio.get_running_loop().create_future()
        self.arrivals.setdefault(remote, []).append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            waiters = self.arrivals.get(remote)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self.arrivals[remote]

    def arrived(self, remote: EndPointAddress) -> None:
        """The link from ``remote`` was registered: wake the dials waiting for it."""
        for fut in self.arrivals.pop(remote, ()):
            if not fut.done():
                fut.set_result(None)

    def fail_waiters(self, error: BaseException) -> None:
        """Make every waiting dial raise ``error`` (the endpoint closed)."""
        arrivals, self.arrivals = self.arrivals, {}
        for futs in arrivals.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(error)


# --------------------------------------------------------------------------- endpoint


class DialingEndPoint(MultiplexedEndPoint, Generic[T]):
    """An endpoint whose links are dialed and accepted over a :class:`SetupChannel`.

    Implements :meth:`_open_link` with crossed-connect resolution (module docstring);
    the transport provides :meth:`_open_channel`.
    """

    def __init__(self, transport: T, address: EndPointAddress, endpoint_id: int) -> None:
        super().__init__(address)
        self._transport = transport
        self._id = endpoint_id
        self._crossing = CrossedConnects()
        #: remote -> number of our dials to it in progress (for crossing decisions).
        self._dialing = self._crossing.dialing
        #: remote -> futures waiting for the peer's link (after CROSSED_PENDING).
        self._arrivals = self._crossing.arrivals

    @abstractmethod
    async def _open_channel(
        self, remote: EndPointAddress, target: HostAddress
    ) -> SetupChannel[Any]:
        """A new pipe to ``target``, before the handshake.

        Raises:
            ConnectError: with the code for why no pipe could be opened.
        """

    async def _open_link(self, remote: EndPointAddress, timeout: float | None) -> Link:
        transport = self._transport
        try:
            target = parse_host_address(remote, transport._format.scheme)
        except ValueError as exc:
            raise ConnectError(
                ConnectErrorCode.FAILED, f"malformed address {remote!r}: {exc}"
            ) from None
        limit = timeout if timeout is not None else transport._connect_timeout
        with self._crossing.dialing_to(remote):
            try:
                return await asyncio.wait_for(self._dial(remote, target), limit)
            except asyncio.TimeoutError:
                raise ConnectError(
                    ConnectErrorCode.TIMEOUT, f"no answer from {remote!r} within {limit} s"
                ) from None

    def _live(self, remote: EndPointAddress) -> Link | None:
        link = self._links.get(remote)
        return link if link is not None and link.alive else None

    async def _dial(self, remote: EndPointAddress, target: HostAddress) -> Link:
        flags = 0
        while True:
            if (link := self._live(remote)) is not None:
                return link
            status, new = await self._dial_once(remote, target, flags)
            if new is not None:
                return new
            if status is Status.NOT_FOUND:
                raise ConnectError(ConnectErrorCode.NOT_FOUND, f"no endpoint at {remote!r}")
            if (link := self._live(remote)) is not None:
                return link
            if status is Status.CROSSED_LIVE:
                # The peer holds a link from us that we no longer have: it is stale.
                flags = FLAG_REPLACE
                continue
            await self._crossing.wait_for_arrival(remote, CROSS_WAIT)

    async def _dial_once(
        self, remote: EndPointAddress, target: HostAddress, flags: int
    ) -> tuple[Status, Link | None]:
        """One pipe and handshake; the started link if the peer accepted it."""
        transport = self._transport
        channel = await self._open_channel(remote, target)
        try:
            status, extra = await dial_handshake(
                channel, transport._format, transport._cookie, bytes(self.address), remote, flags
            )
            if status is not Status.ACCEPT:
                channel.drop()
                return status, None
            if self._closed:
                raise ConnectError(ConnectErrorCode.FAILED, "endpoint closed while connecting")
            link = channel.link(self, remote, extra)
            await channel.start(link)
            return status, link
        except BaseException:
            channel.drop()
            raise

    def _accept(self, link: Link, initiator: EndPointAddress, flags: int) -> Status:
        """Decide about an authenticated initiator's link (see the module docstring)."""
        if self._closed:
            return Status.NOT_FOUND
        crossing = self._crossing
        if crossing.dialing.get(initiator):
            if crossing.keeps_own_dial(initiator, self.address):
                return Status.CROSSED_PENDING
        elif (
            self._live(initiator) is not None
            and not flags & FLAG_REPLACE
            and initiator > self.address
        ):
            return Status.CROSSED_LIVE
        self._register_link(link)
        crossing.arrived(initiator)
        return Status.ACCEPT

    async def _release(self) -> None:
        self._transport._by_id.pop(self._id, None)
        for waiters in self._arrivals.values():
            for fut in waiters:
                if not fut.done():
                    fut.cancel()
        self._arrivals.clear()


# --------------------------------------------------------------------------- transport


class DialingTransport(MultiplexedTransport, Generic[E]):
    """Keeps a network transport's endpoints by id and runs the accepting side.

    Args:
        form: this transport's handshake format.
        cookie: the shared secret; default :func:`~hpcproc.auth.load_cookie`.
        connect_timeout: bound on ``connect`` when the caller gives no timeout.
        handshake_timeout: a peer that has not finished authenticating by then is
            dropped.

    Raises:
        CookieError: no cookie was given and the cookie file is unsafe or unusable.
    """

    def __init__(
        self,
        form: HandshakeFormat,
        *,
        cookie: bytes | str | None,
        connect_timeout: float,
        handshake_timeout: float,
    ) -> None:
        super().__init__()
        if cookie is None:
            cookie = load_cookie()
        self._cookie = cookie.encode() if isinstance(cookie, str) else bytes(cookie)
        self._format = form
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._instance = secrets.token_hex(4).encode()
        self._next_id = itertools.count(1)
        self._by_id: dict[int, E] = {}
        self._handshakes: set[asyncio.Task[None]] = set()

    def _new_dialing_endpoint(
        self, host: str, port: int, make: Callable[[EndPointAddress, int], E]
    ) -> E:
        """Create, number and keep an endpoint reachable at ``host:port``."""
        endpoint_id = next(self._next_id)
        address = format_host_address(self._format.scheme, host, port, self._instance, endpoint_id)
        endpoint = make(address, endpoint_id)
        self._by_id[endpoint_id] = endpoint
        self._add_endpoint(endpoint)
        return endpoint

    def _find(self, dst: bytes) -> E | None:
        """The open endpoint of this transport object at ``dst``, if any."""
        try:
            target = parse_host_address(dst, self._format.scheme)
        except ValueError:
            return None
        if target.instance != self._instance:
            return None
        endpoint = self._by_id.get(target.endpoint_id)
        return endpoint if endpoint is not None and not endpoint._closed else None

    def _admit(self, channel: SetupChannel[E]) -> None:
        """Run the acceptor's handshake on a new pipe, unless too many are running."""
        if len(self._handshakes) >= MAX_HANDSHAKES:
            self._format.log.warning(
                "%s: dropping %s: more than %d handshakes in progress",
                self._format.name,
                channel.peer,
                MAX_HANDSHAKES,
            )
            channel.drop()
            return
        task = asyncio.get_running_loop().create_task(self._handshake(channel))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, channel: SetupChannel[E]) -> None:
        form = self._format
        try:
            await asyncio.wait_for(self._authenticate(channel), self._handshake_timeout)
        except asyncio.TimeoutError:
            form.log.warning(
                "%s: dropping %s: no handshake within %s s",
                form.name,
                channel.peer,
                self._handshake_timeout,
            )
            channel.drop()
        except HandshakeError as exc:
            form.log.warning("%s: dropping %s: %s", form.name, channel.peer, exc)
            channel.drop()
        except channel.io_errors as exc:
            form.log.warning("%s: dropping %s: handshake failed: %r", form.name, channel.peer, exc)
            channel.drop()
        except BaseException:
            channel.drop()
            raise

    async def _authenticate(self, channel: SetupChannel[E]) -> None:
        hello = await accept_handshake(channel, self._format, self._cookie)
        # Authenticated from here on.
        endpoint = self._find(hello.dst)
        status = Status.NOT_FOUND
        if endpoint is not None and not self._closed:
            link = channel.link(endpoint, hello.src, hello.extra)
            status = endpoint._accept(link, hello.src, hello.flags)
            if status is Status.ACCEPT:
                await channel.start(link, hello.reply(status, channel.extra))
                return
        await channel.refuse(hello.reply(status, bytes(self._format.extra_len)))

    async def _cancel_handshakes(self, *others: asyncio.Task[None]) -> None:
        """Cancel the handshakes still running (and ``others``); wait until they end."""
        tasks = [*self._handshakes, *others]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
