"""Mutual TLS for the tcp transport and the rendezvous store (hpcproc.tls).

The conformance suite runs every scenario over TLS too (``tcp-tls`` in
tests/transport_specs.py, two-process scenarios included); here: the certificate
helper, where the files are found, refusals (a certificate of another CA, TLS on one
side only) with their messages on both sides, the store over TLS, and
``python -m hpcproc.run --tls`` between OS processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hpcproc.rendezvous import RendezvousError
from hpcproc.rendezvous.tcpstore import gather_as_client, serve
from hpcproc.tls import TlsConfig, TlsError, init_directory, tls_config
from hpcproc.transports.base import ConnectError, ConnectErrorCode, Received
from hpcproc.transports.tcp import TcpTransport

pytest.importorskip("cryptography", reason="pip install hpcproc[tls] to make certificates")

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0
COOKIE = b"tls-test-cookie"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_directory(tmp_path_factory.mktemp("tls") / "job", ["host1", "host2"])


@pytest.fixture(scope="module")
def other_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_directory(tmp_path_factory.mktemp("tls") / "other")


def foreign(job: Path, other_job: Path) -> TlsConfig:
    """This job's CA, but a node certificate another job's CA signed."""
    return TlsConfig(cert=other_job / "cert.pem", key=other_job / "key.pem", ca=job / "ca.pem")


def run(coro: object, timeout: float = 30.0) -> object:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


# ------------------------------------------------------------ certificates and config


def test_init_writes_a_ca_and_private_node_keys_but_not_the_ca_key(job: Path) -> None:
    names = sorted(str(p.relative_to(job)) for p in job.rglob("*") if p.is_file())
    assert names == [
        "ca.pem",
        "cert.pem",
        "host1/cert.pem",
        "host1/key.pem",
        "host2/cert.pem",
        "host2/key.pem",
        "key.pem",
    ]
    for key in job.rglob("key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Every node certificate verifies against the CA.
    for cert in job.rglob("cert.pem"):
        ctx = ssl.create_default_context(cafile=str(job / "ca.pem"))
        ctx.load_cert_chain(str(cert), str(cert.parent / "key.pem"))


def test_init_refuses_to_overwrite_a_jobs_ca(job: Path) -> None:
    with pytest.raises(TlsError, match="exists"):
        init_directory(job)


def test_init_command_line_exits_zero_and_names_the_variable(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hpcproc.tls", "init", str(tmp_path / "d"), "--hosts", "a,b"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "HPCPROC_TLS_DIR=" in out.stdout
    assert (tmp_path / "d" / "b" / "cert.pem").is_file()


def test_directory_gives_the_hosts_own_certificate_else_the_shared_one(job: Path) -> None:
    assert tls_config(directory=job, host="host1", env={}) == TlsConfig(
        job / "host1" / "cert.pem", job / "host1" / "key.pem", job / "ca.pem"
    )
    assert tls_config(directory=job, host="elsewhere", env={}) == TlsConfig(
        job / "cert.pem", job / "key.pem", job / "ca.pem"
    )


def test_options_win_over_variables_which_win_over_the_directory(job: Path) -> None:
    env = {
        "HPCPROC_TLS_DIR": str(job),
        "HPCPROC_TLS_CERT": str(job / "host2" / "cert.pem"),
        "HPCPROC_TLS_KEY": str(job / "host2" / "key.pem"),
    }
    config = tls_config(env=env, host="host1")
    assert config.cert == job / "host2" / "cert.pem"
    assert config.ca == job / "ca.pem"
    config = tls_config(
        cert=job / "cert.pem", key=job / "key.pem", env=env, host="host1"
    )
    assert config.cert == job / "cert.pem"


def test_missing_files_name_the_variables_to_set(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match=r"HPCPROC_TLS_CERT.*HPCPROC_TLS_DIR"):
        tls_config(env={})
    with pytest.raises(TlsError, match="does not exist"):
        tls_config(directory=tmp_path, env={})


def test_a_key_that_does_not_match_the_certificate_is_named(job: Path) -> None:
    with pytest.raises(TlsError, match=r"host1/cert\.pem"):
        tls_config(
            cert=job / "host1" / "cert.pem", key=job / "host2" / "key.pem", ca=job / "ca.pem"
        )


# ------------------------------------------------------------ the tcp transport


def test_tls_link_carries_messages_both_ways(job: Path) -> None:
    async def main() -> None:
        config = tls_config(directory=job, env={})
        one = TcpTransport(tls=config, cookie=COOKIE)
        two = TcpTransport(tls=config, cookie=COOKIE)
        try:
            a, b = await one.new_endpoint(), await two.new_endpoint()
            conn = await a.connect(b.address, timeout=WAIT)
            await asyncio.wait_for(b.receive(), WAIT)  # ConnectionOpened
            big = os.urandom(3 << 20)
            await conn.send([b"small", big])
            event = await asyncio.wait_for(b.receive(), WAIT)
            assert isinstance(event, Received)
            assert [bytes(f) for f in event.frames] == [b"small", big]
            back = await b.connect(a.address, timeout=WAIT)
            await back.send([b"reply"])
            await asyncio.wait_for(a.receive(), WAIT)  # ConnectionOpened
            event = await asyncio.wait_for(a.receive(), WAIT)
            assert isinstance(event, Received) and bytes(event.frames[0]) == b"reply"
        finally:
            await one.close()
            await two.close()

    run(main())


def test_certificate_of_another_ca_is_refused_on_both_sides(
    job: Path, other_job: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each side names the other and says the certificate was not signed by the job's
    CA (the dialer's: the acceptor's certificate; the acceptor: ours refused)."""

    async def main() -> None:
        good = TcpTransport(tls=tls_config(directory=job, env={}), cookie=COOKIE)
        bad = TcpTransport(tls=foreign(job, other_job), cookie=COOKIE, connect_timeout=WAIT)
        try:
            a, b = await good.new_endpoint(), await bad.new_endpoint()
            # The foreign node dials: the job's node refuses its certificate.
            with pytest.raises(ConnectError) as refused:
                await b.connect(a.address, timeout=WAIT)
            assert refused.value.code is ConnectErrorCode.FAILED
            assert bytes(a.address).decode() in str(refused.value)
            assert "refused this node's certificate" in str(refused.value)
            assert "not signed" in str(refused.value)
            # The job's node dials the foreign one: its certificate is not the job CA's.
            with pytest.raises(ConnectError) as rejected:
                await a.connect(b.address, timeout=WAIT)
            assert bytes(b.address).decode() in str(rejected.value)
            assert "was not signed by the job's CA" in str(rejected.value)
            await _until_logged(caplog, "was not signed by the job's CA")
            await _until_logged(caplog, "refused this node's certificate")
        finally:
            await good.close()
            await bad.close()

    with caplog.at_level(logging.WARNING, logger="hpcproc.transports.tcp"):
        run(main())
    # The acceptors log the peer they drop by its socket address.
    drops = [r.getMessage() for r in caplog.records if "dropping peer 127.0.0.1:" in r.getMessage()]
    assert any("the peer's certificate was not signed by the job's CA" in m for m in drops)
    assert any("the peer refused this node's certificate" in m for m in drops)


async def _until_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """The acceptor logs from its own task; wait (bounded) until it has."""
    async def seen() -> None:
        while not any(text in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(seen(), WAIT)


@pytest.mark.parametrize("tls_side", ["acceptor", "dialer"])
def test_tls_and_plain_endpoints_refuse_each_other_at_once_saying_so(
    job: Path, tls_side: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No hang until a timeout: the connect fails within the (generous) bound and
    both sides say that TLS is on one side only."""

    async def main() -> None:
        config = tls_config(directory=job, env={})
        secure = TcpTransport(tls=config, cookie=COOKIE, connect_timeout=60)
        plain = TcpTransport(cookie=COOKIE, connect_timeout=60)
        dialer, acceptor = (plain, secure) if tls_side == "acceptor" else (secure, plain)
        try:
            a, b = await dialer.new_endpoint(), await acceptor.new_endpoint()
            with pytest.raises(ConnectError) as failed:
                # Well below connect_timeout: a refusal, not a timeout.
                await asyncio.wait_for(a.connect(b.address), WAIT)
            assert failed.value.code is ConnectErrorCode.FAILED
            assert "--tls" in str(failed.value)
            expected = (
                "speaks plain tcp and this endpoint requires TLS"
                if tls_side == "acceptor"
                else "speaks TLS and this endpoint does not"
            )
            await _until_logged(caplog, expected)
        finally:
            await secure.close()
            await plain.close()

    with caplog.at_level(logging.WARNING, logger="hpcproc.transports.tcp"):
        run(main())


# ------------------------------------------------------------ the rendezvous store


def _port(store: object) -> int:
    """The IPv4 port of a store bound to port 0 (IPv6 may have got another one)."""
    server = store._server  # type: ignore[attr-defined]
    return next(s.getsockname()[1] for s in server.sockets if s.family == socket.AF_INET)  # type: ignore[no-any-return]


def _gather(
    server_tls: TlsConfig | None, client_tls: TlsConfig | None, timeout: float = 20.0
) -> list[bytes]:
    async def main() -> list[bytes]:
        store = await serve(
            [0], size=2, cookie=COOKIE, key=b"k", describe="test", tls=server_tls
        )
        port = _port(store)
        try:
            gathered = asyncio.ensure_future(store.gather(b"zero", timeout))
            client = await gather_as_client(
                "127.0.0.1",
                [port],
                rank=1,
                payload=b"one",
                cookie=COOKIE,
                key=b"k",
                timeout=timeout,
                describe="test",
                tls=client_tls,
            )
            assert await gathered == client
            return client
        finally:
            gathered.cancel()
            await asyncio.gather(gathered, return_exceptions=True)
            await store.close()

    return run(main(), 60)  # type: ignore[return-value]


def test_store_gathers_over_mutual_tls(job: Path) -> None:
    config = tls_config(directory=job, env={})
    assert _gather(config, config) == [b"zero", b"one"]


def test_store_refuses_a_client_of_another_ca_and_the_client_stops_at_once(
    job: Path, other_job: Path
) -> None:
    # timeout=60: the client must not retry until then (the test's bound is WAIT-ish).
    async def main() -> None:
        store = await serve(
            [0], size=2, cookie=COOKIE, key=b"k", describe="test",
            tls=tls_config(directory=job, env={}),
        )  # fmt: skip
        port = _port(store)
        try:
            with pytest.raises(RendezvousError, match="refused this node's certificate"):
                await asyncio.wait_for(
                    gather_as_client(
                        "127.0.0.1", [port], rank=1, payload=b"one", cookie=COOKIE, key=b"k",
                        timeout=60, describe="test", tls=foreign(job, other_job),
                    ),
                    WAIT,
                )  # fmt: skip
        finally:
            await store.close()

    run(main())


@pytest.mark.parametrize("tls_side", ["store", "client"])
def test_store_and_client_with_tls_on_one_side_only_fail_at_once(
    job: Path, tls_side: str
) -> None:
    config = tls_config(directory=job, env={})

    async def main() -> None:
        store = await serve(
            [0], size=2, cookie=COOKIE, key=b"k", describe="test",
            tls=config if tls_side == "store" else None,
        )  # fmt: skip
        port = _port(store)
        try:
            with pytest.raises(RendezvousError, match="--tls"):
                await asyncio.wait_for(
                    gather_as_client(
                        "127.0.0.1", [port], rank=1, payload=b"one", cookie=COOKIE, key=b"k",
                        timeout=60, describe="test",
                        tls=config if tls_side == "client" else None,
                    ),
                    WAIT,
                )  # fmt: skip
        finally:
            await store.close()

    run(main())


# ------------------------------------------------------------ python -m hpcproc.run --tls


def _run_env(tls_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCPROC_", "SLURM_"))}
    env.update(
        HPCPROC_COOKIE="tls-run-test",
        HPCPROC_TLS_DIR=str(tls_dir),
        HPCPROC_LOG_LEVEL="INFO",
        PYTHONPATH=str(ROOT),
    )
    return env


def test_run_np_2_tls_pingpong_exits_zero_over_tls_links(job: Path) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "hpcproc.run", "--np", "2", "--tls", "--timeout", "30",
            f"{Path(__file__).resolve()}:app_report_tls",
        ],
        env=_run_env(job),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tls-link TLSv1.3 peer-cn=hpcproc node" in out.stdout, out.stdout + out.stderr
    pingpong = subprocess.run(
        [sys.executable, "-m", "hpcproc.run", "--np", "2", "--tls", "examples/pingpong.py:main"],
        env=_run_env(job),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert pingpong.returncode == 0, pingpong.stdout + pingpong.stderr
    assert "round trips" in pingpong.stdout


def test_run_tls_without_certificates_exits_naming_what_to_set(tmp_path: Path) -> None:
    env = _run_env(tmp_path)
    del env["HPCPROC_TLS_DIR"]
    out = subprocess.run(
        [sys.executable, "-m", "hpcproc.run", "--tls", "examples/pingpong.py:main"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "HPCPROC_TLS_DIR" in out.stderr


def test_run_tls_refuses_a_transport_it_does_not_secure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hpcproc.run", "--tls", "--transport", "shm", "x:y"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "--tls secures the tcp transport only" in out.stderr


async def app_report_tls(cluster: object) -> None:
    """Rank 0 spawns on every worker, then prints each link's TLS version and the
    common name of the certificate the peer presented."""
    import hpcproc as hp

    async def hello(master: hp.Pid) -> None:
        await hp.send(master, "hello")

    for peer in cluster.peers:  # type: ignore[attr-defined]
        await hp.spawn(peer, hello, hp.self_pid())
        await hp.expect(str, timeout=30)
    endpoint = cluster.node._endpoint  # type: ignore[attr-defined]
    for link in list(endpoint._links.values()):
        sock = link._sock
        cert = sock.getpeercert()
        names = dict(item[0] for item in cert["subject"])
        print(f"tls-link {sock.version()} peer-cn={names['commonName']}", flush=True)
