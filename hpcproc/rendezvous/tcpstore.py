"""The rendezvous store: a small TCP server on rank 0 that gathers one payload per rank.

Protocol, per client connection (every message is a 4-byte big-endian length and
that many bytes; lengths above :data:`MAX_MESSAGE` are refused before reading):

1. client -> server: a fresh nonce; server -> client: its nonce and its proof;
   client -> server: its proof (:class:`hpcproc.auth.Handshake`, bound to
   the job's key so that a store of another job on the same port fails the check).
2. client -> server: ``{"rank": r, "payload": hex}`` (JSON).
3. server -> every client, once all ``size`` ranks arrived: ``{"payloads": [hex...]}``;
   or, when the deadline passes first, ``{"error": "..."}`` naming the missing ranks.

Nothing a client sends reaches the gathered table before it proved knowledge of the
cookie. The server only ever holds ``size`` connections' worth of state.

With TLS (``tls=`` a :class:`~hpcproc.tls.TlsConfig`, what ``--tls`` passes), every
connection runs mutual TLS first and the protocol above inside it. A client whose TLS
handshake fails stops at once with the reason (certificate of another CA, a store
without TLS, or a client without TLS: the store answers it with a TLS alert); it is
not retried, as no later attempt can succeed. The store itself cannot report a refused
client (asyncio's TLS server drops it silently), so its timeout message says to look
at the missing ranks' errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import ssl
import struct
import time
from collections.abc import Sequence
from typing import Any

from ..auth import NONCE_LEN, PROOF_LEN, Handshake
from ..tls import TlsConfig, describe_tls_error
from .errors import RendezvousError

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_MESSAGE", "StoreServer", "gather_as_client", "serve"]

log = logging.getLogger("hpcproc.rendezvous")

#: Bound on connecting to a port and getting the store's handshake answer.
HANDSHAKE_TIMEOUT = 2.0

#: Largest message accepted on a store connection.
MAX_MESSAGE = 64 << 20

_LEN = struct.Struct("!I")
#: A TLS alert record's first bytes: a TLS store's answer to a client without TLS.
_TLS_ALERT = b"\x15\x03"


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


async def _read(reader: asyncio.StreamReader, limit: int = MAX_MESSAGE) -> bytes:
    (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if length > limit:
        raise RendezvousError(f"store message of {length} bytes exceeds the limit {limit}")
    return await reader.readexactly(length)


class StoreServer:
    """Rank 0's side: accepts the other ranks and answers them all at once.

    Use :func:`serve` to bind it; then ``await server.gather(own_payload)``.
    """

    def __init__(
        self, *, size: int, cookie: bytes, key: bytes, describe: str, tls: bool = False
    ) -> None:
        self._size = size
        self._tls = tls
        self._cookie = cookie
        self._key = key
        self._describe = describe
        self._payloads: dict[int, bytes] = {}
        self._clients: dict[int, asyncio.StreamWriter] = {}
        self._complete = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        rank: int | None = None
        try:
            shake = Handshake(self._cookie, initiator=False, context=self._key)
            client_nonce = await _read(reader, NONCE_LEN)
            await _write(writer, shake.nonce + shake.proof(client_nonce))
            client_proof = await _read(reader, PROOF_LEN)
            if not shake.verify(client_nonce, client_proof):
                peer = writer.get_extra_info("peername")
                log.warning("rendezvous store: refused %s (wrong cookie or another job)", peer)
                return
            hello: dict[str, Any] = json.loads(await _read(reader))
            rank = int(hello["rank"])
            if not 0 < rank < self._size or rank in self._payloads:
                await _write(writer, json.dumps({"error": f"rank {rank} is unexpected"}).encode())
                rank = None
                return
            self._payloads[rank] = bytes.fromhex(hello["payload"])
            self._clients[rank] = writer
            if len(self._payloads) == self._size:
                self._complete.set()
            # Hold the connection until gather() answers; EOF means the client left.
            await reader.read(1)
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, RendezvousError) as exc:
            log.debug("rendezvous store: client dropped: %r", exc)
        finally:
            if rank is not None and not self._complete.is_set():
                self._payloads.pop(rank, None)
                self._clients.pop(rank, None)
            writer.close()
            if task is not None:
                self._handlers.discard(task)

    async def gather(self, own_payload: bytes, timeout: float) -> list[bytes]:
        """Wait for every rank (this one is rank 0), then send everyone the table.

        Raises:
            RendezvousError: ranks missing when ``timeout`` expired (named, and sent to
                every rank that did arrive).
        """
        self._payloads[0] = own_payload
        if self._size == 1:
            self._complete.set()
        try:
            await asyncio.wait_for(self._complete.wait(), timeout)
        except asyncio.TimeoutError:
            missing = [r for r in range(self._size) if r not in self._payloads]
            message = (
                f"rendezvous timed out after {timeout:g} s: ranks {_ranges(missing)} of"
                f" {self._size} did not arrive ({self._describe})"
            )
            if self._tls:
                message += "; with TLS, see their errors: the store refuses a rank silently"
            await self._broadcast(json.dumps({"error": message}).encode())
            raise RendezvousError(message) from None
        table = [self._payloads[r] for r in range(self._size)]
        await self._broadcast(json.dumps({"payloads": [p.hex() for p in table]}).encode())
        return table

    async def _broadcast(self, data: bytes) -> None:
        for writer in list(self._clients.values()):
            with contextlib.suppress(OSError):
                await _write(writer, data)

    async def close(self) -> None:
        """Stop listening and drop every client connection; idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._clients.values()):
            writer.close()
        # Closed connections end their handlers (EOF); cancel only stragglers.
        handlers = list(self._handlers)
        if handlers:
            _, stragglers = await asyncio.wait(handlers, timeout=HANDSHAKE_TIMEOUT)
            for task in stragglers:
                task.cancel()
            await asyncio.gather(*stragglers, return_exceptions=True)


async def serve(
    ports: Sequence[int],
    *,
    size: int,
    cookie: bytes,
    key: bytes,
    describe: str,
    tls: TlsConfig | None = None,
) -> StoreServer:
    """Bind a :class:`StoreServer` to the first free port of ``ports`` (all interfaces).

    Raises:
        RendezvousError: every port is in use (the message lists them).
        TlsError: ``tls`` files do not load.
    """
    store = StoreServer(size=size, cookie=cookie, key=key, describe=describe, tls=tls is not None)
    context = None if tls is None else tls.server_context()
    for port in ports:
        try:
            store._server = await asyncio.start_server(
                store._handle,
                port=port,
                reuse_address=True,
                ssl=context,
                ssl_handshake_timeout=None if context is None else HANDSHAKE_TIMEOUT,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                log.debug("rendezvous store: port %d in use, trying the next", port)
                continue
            raise RendezvousError(f"rendezvous store cannot listen on port {port}: {exc}") from exc
        store.port = port
        return store
    raise RendezvousError(
        f"rendezvous store: ports {ports[0]}..{ports[-1]} are all in use ({describe});"
        " set HPCPROC_PORT to a free port"
    )


async def gather_as_client(
    host: str,
    ports: Sequence[int],
    *,
    rank: int,
    payload: bytes,
    cookie: bytes,
    key: bytes,
    timeout: float,
    describe: str,
    tls: TlsConfig | None = None,
) -> list[bytes]:
    """Send ``payload`` to the store at ``host`` and return every rank's payload.

    Tries ``ports`` in order (the server took the first free one), retrying while
    the server is not up yet, until ``timeout``; the answer itself is awaited for
    ``timeout`` plus a grace period (the server reports missing ranks at its own
    deadline).

    Raises:
        RendezvousError: the store was not reachable, refused us, or reported missing
            ranks (its message is passed on); at once when TLS failed (module docstring).
        TlsError: ``tls`` files do not load.
    """
    context = None if tls is None else tls.client_context()
    deadline = time.monotonic() + timeout
    delay = 0.02
    last_problem = "no answer"
    while True:
        for port in ports:
            try:
                return await _try_port(
                    host, port, rank, payload, cookie, key, timeout, deadline, context
                )
            except ssl.SSLError as exc:
                store = f"rank 0's store at {host}:{port}"
                raise RendezvousError(
                    f"rendezvous: {describe_tls_error(exc, store)} ({describe})"
                ) from exc
            except _WrongServer as exc:
                last_problem = str(exc)
            except (OSError, asyncio.TimeoutError) as exc:
                last_problem = f"{host}:{port}: {exc!r}"
        if time.monotonic() >= deadline:
            raise RendezvousError(
                f"rendezvous: rank 0's store on {host} (ports {ports[0]}..{ports[-1]}) was not"
                f" reachable within {timeout:g} s ({describe}); last problem: {last_problem}"
            )
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.5)


class _WrongServer(Exception):
    """The port answered, but not as our job's store (next port, or retry)."""


async def _try_port(
    host: str,
    port: int,
    rank: int,
    payload: bytes,
    cookie: bytes,
    key: bytes,
    timeout: float,
    deadline: float,
    context: ssl.SSLContext | None,
) -> list[bytes]:
    # A live store answers the nonce at once; a port held by something else may accept
    # and stay silent, which must not use up the whole timeout.
    connect_budget = max(0.1, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic()))
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=context,
                server_hostname=None if context is None else "",
                ssl_handshake_timeout=None if context is None else connect_budget,
            ),
            connect_budget,
        )
    except ConnectionResetError as exc:
        if context is None:
            raise
        # What asyncio reports when the server dropped our ClientHello: not TLS. (A
        # port of another job's plain store fails the same way: set HPCPROC_PORT.)
        raise RendezvousError(
            f"rendezvous: rank 0's store at {host}:{port} closed the connection during the"
            " TLS handshake: it does not use TLS (start every rank with --tls, or none)"
        ) from exc
    try:
        shake = Handshake(cookie, initiator=True, context=key)
        await _write(writer, shake.nonce)
        try:
            head = await asyncio.wait_for(reader.readexactly(_LEN.size), connect_budget)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.startswith(_TLS_ALERT):
                raise RendezvousError(
                    f"rendezvous: rank 0's store at {host}:{port} answered with a TLS alert:"
                    " it uses TLS and this rank does not (start every rank with --tls, or none)"
                ) from None
            if context is None and not exc.partial and await _speaks_tls(host, port, connect_budget):
                raise RendezvousError(
                    f"rendezvous: rank 0's store at {host}:{port} uses TLS and this rank does"
                    " not (start every rank with --tls, or none)"
                ) from None
            if context is not None and not exc.partial:
                # TLS 1.3: the client's handshake ends before the server checked the
                # client's certificate; asyncio reports the server's refusal as EOF.
                raise RendezvousError(
                    f"rendezvous: rank 0's store at {host}:{port} refused this node's"
                    " certificate right after the TLS handshake: it was not signed by the CA"
                    " the store trusts (the two sides use different jobs' CAs)"
                ) from None
            raise _WrongServer(f"{host}:{port} is not a rendezvous store") from exc
        except asyncio.TimeoutError as exc:
            raise _WrongServer(f"{host}:{port} is not a rendezvous store") from exc
        if head.startswith(_TLS_ALERT):
            raise RendezvousError(
                f"rendezvous: rank 0's store at {host}:{port} answered with a TLS alert:"
                " it uses TLS and this rank does not (start every rank with --tls, or none)"
            )
        (length,) = _LEN.unpack(head)
        if length != NONCE_LEN + PROOF_LEN:
            raise _WrongServer(f"{host}:{port} is not a rendezvous store")
        try:
            answer = await asyncio.wait_for(reader.readexactly(length), connect_budget)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            raise _WrongServer(f"{host}:{port} is not a rendezvous store") from exc
        server_nonce, server_proof = answer[:NONCE_LEN], answer[NONCE_LEN:]
        if not shake.verify(server_nonce, server_proof):
            raise _WrongServer(f"{host}:{port} failed authentication (another job, or cookie)")
        await _write(writer, shake.proof(server_nonce))
        await _write(writer, json.dumps({"rank": rank, "payload": payload.hex()}).encode())
        grace = min(10.0, timeout) + 1.0
        try:
            raw = await asyncio.wait_for(_read(reader), timeout + grace)
        except asyncio.IncompleteReadError as exc:
            raise _WrongServer(f"{host}:{port} closed the connection (cookie refused?)") from exc
        except asyncio.TimeoutError:
            raise RendezvousError(
                f"rendezvous: rank 0's store at {host}:{port} did not answer within"
                f" {timeout + grace:g} s"
            ) from None
        reply: dict[str, Any] = json.loads(raw)
        if "error" in reply:
            raise RendezvousError(str(reply["error"]))
        return [bytes.fromhex(p) for p in reply["payloads"]]
    finally:
        writer.close()


async def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` answers a TLS ClientHello (probe without certificates).

    Asked only when a port closed on our plain hello without a word, which a plain
    store never does: a TLS store does (asyncio's TLS server drops what is not TLS).
    """
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=probe, server_hostname=""), timeout
        )
    except ssl.SSLError as exc:
        # A TLS server that wants a client certificate may refuse already.
        return "CERTIFICATE" in (exc.reason or "")
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _ranges(ranks: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    parts: list[str] = []
    start = prev = None
    for r in ranks:
        if prev is not None and r == prev + 1:
            prev = r
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = r
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)
