"""The cluster cookie and the HMAC-SHA256 challenge-response built on it.

Network transports (TCP, UCX) run :class:`Handshake` on every new link before
anything is delivered, and the rendezvous store (:mod:`hpcproc.rendezvous`) on every
connection: each side sends a fresh random nonce and proves knowledge of
the shared cookie by returning ``HMAC(cookie, label || their_nonce || my_nonce ||
context)``. The label differs per role, so a proof cannot be reflected back, and both
nonces are bound in, so a proof cannot be replayed. The cookie itself never crosses
the wire.

The cookie comes from ``HPCPROC_COOKIE`` or else ``~/.hpcproc/cookie`` (created with
mode 0600 on first use; refused, as ssh refuses keys, when group- or world-readable).
On a cluster the home directory is shared, so every node finds the same cookie.

It lives beside the layers that use it (transports, rendezvous), not inside either.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

__all__ = [
    "COOKIE_FIX",
    "NONCE_LEN",
    "PROOF_LEN",
    "CookieError",
    "Handshake",
    "cookie_mismatch",
    "cookie_path",
    "load_cookie",
]

NONCE_LEN = 32
PROOF_LEN = 32
_ENV = "HPCPROC_COOKIE"


#: What to do when two nodes' cookies differ (the end of every such message).
COOKIE_FIX = (
    "every node of a job needs the same cookie: set HPCPROC_COOKIE to one value for all"
    " ranks, or leave it unset and let every node read the same ~/.hpcproc/cookie"
    " (a home directory shared by the nodes)"
)


def cookie_mismatch(peer: str) -> str:
    """The message for a failed challenge-response with ``peer`` (named by the caller:
    host, port, rank or address, whatever is known)."""
    return f"authentication failed with {peer}: its cookie differs from ours; {COOKIE_FIX}"


class CookieError(Exception):
    """The cookie is missing, unreadable or unsafe; the message says how to fix it."""


def cookie_path() -> Path:
    """Where the cookie file lives: ``$HPCPROC_COOKIE_FILE`` or ``~/.hpcproc/cookie``."""
    override = os.environ.get("HPCPROC_COOKIE_FILE")
    return Path(override) if override else Path.home() / ".hpcproc" / "cookie"


def load_cookie(create: bool = True) -> bytes:
    """Return the cluster cookie.

    Raises:
        CookieError: the file is group- or world-accessible, empty, or cannot be read
            or created.
    """
    env = os.environ.get(_ENV)
    if env:
        return env.encode()
    path = cookie_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if not create:
            raise CookieError(f"no cookie: set {_ENV} or create {path}") from None
        return _create_cookie(path)
    except OSError as exc:
        raise CookieError(f"cannot read cookie file {path}: {exc}") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CookieError(
                f"cookie file {path} is accessible by group or others "
                f"(mode {stat.filemode(mode)}); run: chmod 600 {path}"
            )
        cookie = f.read().strip()
    if not cookie:
        raise CookieError(f"cookie file {path} is empty; delete it to get a new one")
    return cookie


def _create_cookie(path: Path) -> bytes:
    cookie = secrets.token_hex(32).encode()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_EXCL: if another process on a shared home creates it first, use theirs.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_cookie(create=False)
    except OSError as exc:
        raise CookieError(f"cannot create cookie file {path}: {exc}; set {_ENV}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(cookie + b"\n")
    return cookie


class Handshake:
    """One side's state in the challenge-response (sans I/O).

    Usage, on both sides: send :attr:`nonce`; on receiving the peer's nonce, send
    :meth:`proof`; on receiving the peer's proof, call :meth:`verify`. ``context``
    binds the proof to this link (for example both endpoint addresses); both sides
    must pass the same bytes.
    """

    def __init__(self, cookie: bytes, *, initiator: bool, context: bytes = b"") -> None:
        self._cookie = cookie
        self._initiator = initiator
        self._context = context
        self.nonce = secrets.token_bytes(NONCE_LEN)

    def _mac(self, label: bytes, challenge: bytes, response_nonce: bytes) -> bytes:
        msg = b"hpcproc-auth-v1|" + label + b"|" + challenge + response_nonce + self._context
        return hmac.new(self._cookie, msg, hashlib.sha256).digest()

    def proof(self, peer_nonce: bytes) -> bytes:
        """Our answer to the peer's challenge ``peer_nonce``."""
        label = b"initiator" if self._initiator else b"acceptor"
        return self._mac(label, peer_nonce, self.nonce)

    def verify(self, peer_nonce: bytes, peer_proof: bytes) -> bool:
        """Whether ``peer_proof`` answers our nonce; constant time."""
        if len(peer_nonce) != NONCE_LEN or len(peer_proof) != PROOF_LEN:
            return False
        label = b"acceptor" if self._initiator else b"initiator"
        return hmac.compare_digest(self._mac(label, self.nonce, peer_nonce), peer_proof)
