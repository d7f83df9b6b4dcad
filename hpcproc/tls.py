"""Mutual TLS for the tcp transport and the rendezvous store, and a job's throw-away CA.

With TLS on (``python -m hpcproc.run --tls``, or ``TcpTransport(tls=True)``), every tcp
link and every rendezvous store connection runs TLS 1.3 (the standard library's
:mod:`ssl`) before anything else; both sides present a certificate and both require the
peer's to be signed by the job's CA. The cookie handshake (:mod:`hpcproc.auth`) still
runs, inside TLS: TLS proves "a node of this job's CA" and encrypts, the cookie proves
"this cluster", and either failing refuses the peer.

Host names are not checked (``check_hostname`` off): the CA is made for one job and
signs only its nodes, so "signed by the job's CA" is the membership test, as the cookie
is; a node's address is whatever the launcher advertises (a Slurm ``NodeAddr``, an IP
address) and need not be a name in its certificate.

Where the files come from (:func:`tls_config`), first match wins, per file:

1. explicit options (``cert=``, ``key=``, ``ca=``);
2. ``HPCPROC_TLS_CERT``, ``HPCPROC_TLS_KEY``, ``HPCPROC_TLS_CA``;
3. a directory (``directory=`` or ``HPCPROC_TLS_DIR``) laid out as
   ``python -m hpcproc.tls init DIR`` writes it: ``DIR/ca.pem``, and the node's
   ``DIR/HOST/cert.pem`` + ``DIR/HOST/key.pem`` when a directory for this host's name
   exists, else ``DIR/cert.pem`` + ``DIR/key.pem``.

``python -m hpcproc.tls init DIR [--hosts h1,h2,...]`` creates a fresh CA (its private
key is never written: nothing can be signed by it later, so a leaked directory of an
old job signs nothing new), a certificate for any node (``DIR/cert.pem``) and one per
listed host (``DIR/HOST/``), keys mode 0600. It needs the ``cryptography`` package
(``pip install hpcproc[tls]``), imported only by this command.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CA_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "TlsConfig",
    "TlsError",
    "describe_tls_error",
    "init_directory",
    "main",
    "tls_config",
]

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
_ENV_CERT = "HPCPROC_TLS_CERT"
_ENV_KEY = "HPCPROC_TLS_KEY"
_ENV_CA = "HPCPROC_TLS_CA"
_ENV_DIR = "HPCPROC_TLS_DIR"


class TlsError(Exception):
    """TLS is asked for but its files are missing or unusable; the message says which."""


@dataclass(frozen=True)
class TlsConfig:
    """This node's certificate and key, and the job's CA (PEM files)."""

    cert: Path
    key: Path
    ca: Path

    def server_context(self) -> ssl.SSLContext:
        """The context for the accepting side (requires a client certificate).

        Raises:
            TlsError: a file is missing or unusable (named).
        """
        return _context(self, server=True)

    def client_context(self) -> ssl.SSLContext:
        """The context for the dialing side (presents this node's certificate).

        Raises:
            TlsError: a file is missing or unusable (named).
        """
        return _context(self, server=False)


@lru_cache(maxsize=16)
def _context(config: TlsConfig, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # see the module docstring
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        ctx.num_tickets = 0  # links are long-lived; resumption buys nothing
    try:
        ctx.load_verify_locations(cafile=str(config.ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the job's CA certificate {config.ca}: {exc}") from exc
    try:
        ctx.load_cert_chain(str(config.cert), str(config.key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"cannot load this node's certificate {config.cert} with key {config.key}: {exc}"
        ) from exc
    return ctx


def tls_config(
    *,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    directory: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    host: str | None = None,
) -> TlsConfig:
    """Find this node's TLS files (order in the module docstring) and check they load.

    ``host`` picks ``DIR/HOST/`` (default: this machine's host name).

    Raises:
        TlsError: a file is not given anywhere, or does not load (the message says
            which, and what to set).
    """
    env = os.environ if env is None else env
    folder = directory or env.get(_ENV_DIR) or None
    base = Path(folder) if folder else None
    node_dir = base
    if base is not None:
        own = base / (host or socket.gethostname())
        if (own / CERT_FILE).exists():
            node_dir = own

    def pick(given: object, var: str, name: str, where: Path | None) -> Path:
        if given:
            return Path(str(given))
        if env.get(var):
            return Path(env[var])
        if where is not None:
            return where / name
        raise TlsError(
            f"TLS needs this node's certificate, key and the job's CA: {name} is not given;"
            f" set {var} (or {_ENV_DIR} to a directory made by"
            " `python -m hpcproc.tls init DIR`)"
        )

    config = TlsConfig(
        cert=pick(cert, _ENV_CERT, CERT_FILE, node_dir),
        key=pick(key, _ENV_KEY, KEY_FILE, node_dir),
        ca=pick(ca, _ENV_CA, CA_FILE, base),
    )
    for path in (config.ca, config.cert, config.key):
        if not path.is_file():
            raise TlsError(f"TLS file {path} does not exist (make one with hpcproc.tls init)")
    config.server_context()
    config.client_context()
    return config


def describe_tls_error(exc: BaseException, peer: str) -> str:
    """A one-line reason for a failed TLS handshake with ``peer``, saying what to fix.

    Tells apart: the peer's certificate not signed by the job's CA; the peer refusing
    ours (its CA did not sign it); a peer that does not speak TLS; anything else.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"{peer}'s certificate was not signed by the job's CA ({exc.verify_message}):"
            " it belongs to another job's CA, refused"
        )
    reason = getattr(exc, "reason", None) or ""
    if (
        isinstance(exc, ssl.SSLError)
        and "ALERT" in reason
        and ("UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE" in reason)
    ):
        return (
            f"{peer} refused this node's certificate ({reason.lower()}): it was not signed"
            " by the CA that peer trusts; the two sides use different jobs' CAs"
        )
    if isinstance(exc, ssl.SSLError) and reason in (
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
    ):
        return f"{peer} does not speak TLS: start every rank with --tls, or none"
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, EOFError)) or (
        isinstance(exc, ssl.SSLError) and "EOF" in str(exc)
    ):
        return (
            f"{peer} closed the connection during the TLS handshake: it does not use TLS"
            " (start every rank with --tls, or none), or it refused this node"
        )
    return f"TLS handshake with {peer} failed: {exc}"


# --------------------------------------------------------------------------- init


def init_directory(directory: str | os.PathLike[str], hosts: Sequence[str] = ()) -> Path:
    """Write a fresh CA and node certificates into ``directory`` (layout above).

    The CA's key is not kept. Certificates are valid for 30 days; each names
    ``localhost``, ``127.0.0.1`` and its host (``DIR/cert.pem`` every listed host).

    Raises:
        TlsError: ``cryptography`` is not installed, or ``directory`` holds a CA
            already (not overwritten: a running job may use it).
    """
    try:
        from ._tls_init import write_job_certificates
    except ImportError as exc:
        raise TlsError(
            "python -m hpcproc.tls init needs the cryptography package: pip install 'hpcproc[tls]'"
        ) from exc
    path = Path(directory)
    for host in hosts:
        if not host or "/" in host or host.startswith(".") or host in (CA_FILE, CERT_FILE):
            raise TlsError(f"--hosts: {host!r} is not a host name")
    if (path / CA_FILE).exists():
        raise TlsError(f"{path / CA_FILE} exists; remove {path} or pick another directory")
    write_job_certificates(path, list(hosts))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpcproc.tls init DIR [--hosts h1,h2]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m hpcproc.tls", description="TLS certificates for an hpcproc job."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a throw-away CA and node certificates in DIR")
    init.add_argument("directory", metavar="DIR")
    init.add_argument(
        "--hosts",
        default="",
        help="comma-separated host names: one certificate each, in DIR/HOST/",
    )
    args = parser.parse_args(argv)
    hosts = [h for h in args.hosts.split(",") if h]
    try:
        path = init_directory(args.directory, hosts)
    except TlsError as exc:
        print(f"hpcproc.tls: {exc}", file=sys.stderr)
        return 2
    print(
        f"hpcproc.tls: wrote a new CA and certificates to {path}; use: --tls with"
        f" {_ENV_DIR}={path.resolve()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
